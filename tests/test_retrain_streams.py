"""Users' change streams and the daemon's own bookkeeping (issue 21, class 3: capacity apportioned).

A writer of model documents decides how many models follow new documents; the daemon decides how many
streams that costs (one per followed collection, within the operator's bound) and keeps its heartbeat,
claims and leases on a client of their own, so no number of users' streams makes a live daemon look dead.
"""

import asyncio
import datetime as dt
import threading

from listener import retrain
from tests.conftest import DaemonProcess, wait_for
from tests.test_retrain import notes, retraining, solo, until
from training import defaults


def test_class3_users_change_streams_never_make_a_live_daemon_look_dead(db, server_uri, tmp_path, model_root,
                                                                     tiny_model_path):
    """48 models with `retrain.on_new_documents` that never retrain (failed), on a daemon whose operator gave
    it a pool of 4 connections: the heartbeat's `alive_until` is never seen past, or the other daemons would
    take the live daemon for dead and take its requests over."""
    db[defaults.MODELS].insert_many([{"_id": f"idle{n}", "model_name_or_path": tiny_model_path, "status": "failed",
                                      "data": {"collection": "feed"}, "retrain": {"on_new_documents": 1}}
                                     for n in range(48)])
    uri = server_uri + ("&" if "?" in server_uri else "?") + "maxPoolSize=4"
    daemon = DaemonProcess(uri, db.name, tmp_path, "pooled", model_root=model_root)
    try:
        record = wait_for(db[defaults.LISTENER], {"$regex": "^daemon:pooled:"}, lambda d: True, timeout_s=60)
        lapsed = []
        deadline = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=45)
        while dt.datetime.now(dt.timezone.utc) < deadline and daemon.process.poll() is None:
            beat = db[defaults.LISTENER].find_one({"_id": record["_id"]})
            now = dt.datetime.now(dt.timezone.utc)
            if beat["alive_until"].replace(tzinfo=dt.timezone.utc) < now:
                lapsed.append(now - beat["alive_until"].replace(tzinfo=dt.timezone.utc))
            threading.Event().wait(0.5)
        assert daemon.process.poll() is None, daemon.log()[-3000:]
        assert lapsed == [], (f"a live daemon's heartbeat lapsed {len(lapsed)} times (by up to {max(lapsed)}): "
                              "the others take it for dead")
    finally:
        daemon.stop()


def counts(db, daemon: str) -> dict:
    record = db[defaults.LISTENER].find_one({"kind": retrain.TALLY, "daemon": daemon}) or {"counts": []}
    return {c["model"]: c["count"] for c in record["counts"]}


def test_models_on_one_collection_share_one_stream_each_counting_what_matches_its_own_filter(db, server_uri,
                                                                                              tmp_path):
    """One stream for a collection, whatever the number of models and filters that follow it; a failed model is
    not followed (it never retrains by itself); a collection beyond the operator's bound is not followed."""
    english = lambda doc_id, n: {**retraining(doc_id, "/models/never-loaded", on_new_documents=n),  # noqa: E731
                                 "status": "succeeded", "run": 1}
    db[defaults.MODELS].insert_many([
        english("en3", 3), english("en9", 9), {**english("gave-up", 1), "status": "failed"},
        {**english("fr2", 2), "data": {"collection": "notes", "key": "text", "filter": {"lang": "fr"}}},
        {**english("all5", 5), "data": {"collection": "notes", "key": "text"}},
        {**english("elsewhere", 1), "data": {"collection": "letters", "key": "text"}},
    ])

    async def scenario() -> None:
        async with solo(server_uri, db.name, tmp_path, environ={"MONGOTUNE_RETRAIN_MAX_COLLECTIONS": "1"}) as retrainer:
            await retrainer.check()
            assert list(retrainer.watchers) == ["notes"]  # "letters" is the second collection: over the bound
            await until(lambda: counts(db, "solo"))
            db.letters.insert_one({"text": "not counted"})
            db.notes.insert_many(notes("en", 3) + notes("fr", 2))
            await until(lambda: db[defaults.MODELS].count_documents({"status": "pending"}) == 3)
            assert counts(db, "solo") == {"all5": 5, "en3": 3, "en9": 3, "fr2": 2}

    asyncio.run(scenario())
    status = {d["_id"]: (d["status"], d.get("trigger")) for d in db[defaults.MODELS].find()}
    assert status == {"en3": ("pending", "new_documents"), "fr2": ("pending", "new_documents"),
                      "all5": ("pending", "new_documents"), "en9": ("succeeded", None),
                      "gave-up": ("failed", None), "elsewhere": ("succeeded", None)}
