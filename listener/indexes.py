"""The indexes the daemons' own queries need, made (or changed) by each daemon at start.

Every daemon looks for work by status every few seconds: pending requests and models to claim, running ones whose
lease ran out or whose daemon stopped beating, its own heartbeat and its peers'. Without an index each of those reads
every request ever answered (on the embedded server 22 ms a read at 2,000 requests, against 0.5 ms with one), so the
cost of an idle daemon grew with the history of everyone sharing the database. Also here: the feedback counts' index
and the operator's TTL on answered requests. Each is made by name, so daemons starting together agree; a server or a
role that refuses one only makes its queries scan (or, for the TTL, keeps the documents), with a warning.
"""

import functools
import logging

from pymongo.errors import OperationFailure

from training import defaults
from training.errors import said

log = logging.getLogger(__name__)

# (collection, name, keys): what the periodic reads select on first.
LOOKUPS = ((defaults.REQUESTS, "requests_status", [("status", 1)]),
           (defaults.MODELS, "models_status", [("status", 1)]),
           (defaults.LISTENER, "listener_kind", [("kind", 1)]))
FEEDBACK = "requests_feedback"
FEEDBACK_KEYS = [("model", 1), ("feedback_run", 1), ("feedback.rating", 1)]
# Every feedback count, stamp and read selects `feedback.rating` in [-1, 1], which MongoDB's planner sees implies this.
RATED_ONLY = {"feedback.rating": {"$exists": True}}
TTL = "requests_ttl"
INDEX_SPECS_CONFLICT = 86  # IndexKeySpecsConflict: an index of this name exists with other options


async def make(db, ttl_s: int | None) -> None:
    """Every index below, on `db`."""
    for collection, name, keys in LOOKUPS:
        await _made(db[collection], f"{collection} by {keys[0][0]}", keys, name=name)
    await feedback_counts(db)
    await expire_requests(db, ttl_s)


async def feedback_counts(db) -> None:
    """The index the feedback stamps are counted on, over rated requests only (`RATED_ONLY`): the many answers nobody
    rates cost it nothing. One of its name an older version made over every request is dropped and made again."""
    requests = db[defaults.REQUESTS]
    create = functools.partial(requests.create_index, FEEDBACK_KEYS, name=FEEDBACK, partialFilterExpression=RATED_ONLY)
    try:
        try:
            await create()
        except OperationFailure as exc:
            if exc.code != INDEX_SPECS_CONFLICT:
                raise
            await requests.drop_index(FEEDBACK)
            await create()
    except OperationFailure as exc:
        log.warning("could not index %s for feedback counts (%s)", defaults.REQUESTS, said(exc))


async def expire_requests(db, ttl_s: int | None) -> None:
    """Make the TTL index on answered requests' `completed_at` match the operator's `requests_ttl_s`: made,
    changed or dropped; a server that refuses it only keeps the documents."""
    requests = db[defaults.REQUESTS]
    try:
        existing = (await requests.index_information()).get(TTL)
        if existing and existing.get("expireAfterSeconds") != ttl_s:
            await requests.drop_index(TTL)
            existing = None
        if ttl_s and not existing:
            await requests.create_index("completed_at", name=TTL, expireAfterSeconds=ttl_s)
    except OperationFailure as exc:
        log.warning("could not set the TTL index on %s (%s); answered requests are kept", defaults.REQUESTS,
                    said(exc))


async def _made(collection, what: str, keys: list, **options) -> None:
    try:
        await collection.create_index(keys, **options)
    except OperationFailure as exc:
        log.warning("could not index %s (%s); its reads scan", what, said(exc))
