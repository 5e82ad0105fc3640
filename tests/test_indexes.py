"""The indexes a daemon makes at start (`listener.indexes`), on the real server, in this process."""

import asyncio
import logging

from pymongo import AsyncMongoClient

from listener import indexes
from training import defaults


def made(server_uri, db, ttl_s=None) -> None:
    async def run():
        client = AsyncMongoClient(server_uri)
        try:
            await indexes.make(client[db.name], ttl_s)
        finally:
            await client.close()
    asyncio.run(run())


def test_a_daemons_lookups_by_status_and_kind_are_indexed(server_uri, db):
    """An operator whose database holds every request ever answered expects an idle daemon's reads for work (by
    status, every few seconds, from every daemon) to use an index rather than read them all."""
    made(server_uri, db)
    for collection, name, keys in indexes.LOOKUPS:
        assert db[collection].index_information()[name]["key"] == keys
    requests = db[defaults.REQUESTS].index_information()
    assert requests[indexes.FEEDBACK].get("partialFilterExpression") == indexes.RATED_ONLY
    assert indexes.TTL not in requests, "no TTL unless the operator sets one"
    made(server_uri, db, ttl_s=3600)  # a second daemon, or a restart with a TTL: the same indexes, and the TTL
    assert db[defaults.REQUESTS].index_information()[indexes.TTL]["expireAfterSeconds"] == 3600


def test_an_older_feedback_index_over_every_request_is_made_over_rated_ones(server_uri, db):
    """An operator who upgrades expects the daemon to start on a database where an older version made the feedback
    index over every request (same name, no partial filter), and that index to cover rated requests only after."""
    db[defaults.REQUESTS].create_index(indexes.FEEDBACK_KEYS, name=indexes.FEEDBACK)
    made(server_uri, db)
    index = db[defaults.REQUESTS].index_information()[indexes.FEEDBACK]
    assert index.get("partialFilterExpression") == indexes.RATED_ONLY


def test_an_index_the_server_refuses_costs_a_warning_and_no_other_index(server_uri, db, caplog):
    """A user who made an index of one of these names on other keys (or a role that may not index) costs the daemon a
    warning: its reads scan, and every other index is still made."""
    db[defaults.REQUESTS].create_index([("model", 1)], name="requests_status")
    with caplog.at_level(logging.WARNING, logger="listener.indexes"):
        made(server_uri, db)
    assert "could not index _requests by status" in caplog.text
    assert "models_status" in db[defaults.MODELS].index_information()
    assert indexes.FEEDBACK in db[defaults.REQUESTS].index_information()
