"""A model's `events`: written by daemon and child as things happen, bounded, and never broken by a user's write."""

import asyncio
import datetime as dt
import signal

from pymongo import AsyncMongoClient

from listener.demo import load_samples
from listener.leases import reap
from listener.records import ModelState, SkipLog
from listener.status import MODEL_TRANSITIONS, Status, transition
from tests.conftest import finished, wait_for
from training import defaults, events
from training.config import parse_model

STEPS = 60
TRAINER = {"max_steps": STEPS, "per_device_train_batch_size": 2, "logging_steps": 1, "max_seq_length": 64,
           "save_steps": 20}


def move(server_uri, db_name, steps: list[tuple[Status, Status]], model_id="m"):
    """Run real transitions, as the daemon does, on one model document."""
    async def run():
        client = AsyncMongoClient(server_uri)
        try:
            for old, new in steps:
                assert await transition(client[db_name][defaults.MODELS], model_id, old, new, MODEL_TRANSITIONS)
        finally:
            await client.close()
    asyncio.run(run())


def test_events_keep_only_the_newest(server_uri, db):
    db[defaults.MODELS].insert_one({"_id": "m", "status": "failed"})
    cycle = [(Status.FAILED, Status.PENDING), (Status.PENDING, Status.FAILED)]
    move(server_uri, db.name, cycle * (events.KEEP // 2 + 5))
    kept = db[defaults.MODELS].find_one({"_id": "m"})["events"]
    assert len(kept) == events.KEEP and kept[-1]["kind"] == "failed" and kept[-2]["kind"] == "retrain_requested"
    assert [e["at"] for e in kept] == sorted(e["at"] for e in kept)


def test_the_reaper_records_whose_lease_expired(server_uri, db):
    expired = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)
    db[defaults.MODELS].insert_one({"_id": "m", "status": "running", "run": 1, "attempts": 1,
                                    "lease": {"owner": "gone:1:abc", "expires_at": expired}})

    async def reap_once():
        client = AsyncMongoClient(server_uri, **defaults.CODEC)
        try:
            return await reap(client[db.name][defaults.MODELS], MODEL_TRANSITIONS, ModelState, 3, SkipLog())
        finally:
            await client.close()

    assert asyncio.run(reap_once()) == 1
    requeued = db[defaults.MODELS].find_one({"_id": "m"})
    assert requeued["status"] == "pending"
    assert [(e["kind"], e["owner"]) for e in requeued["events"]] == [("lease_expired", "gone:1:abc")]


def test_a_users_events_that_are_not_a_list_are_replaced(server_uri, db):
    db[defaults.MODELS].insert_one({"_id": "m", "events": "forged"})
    move(server_uri, db.name, [(Status.PENDING, Status.CANCELLED)])
    assert [e["kind"] for e in db[defaults.MODELS].find_one({"_id": "m"})["events"]] == ["cancelled"]


def test_events_are_the_listeners_not_part_of_the_definition(tiny_model_path, limits):
    document = {"_id": "m", "model_name_or_path": tiny_model_path, "data": {"collection": "c"},
                "events": [{"kind": "succeeded"}]}
    assert parse_model(document, limits).id == "m"


def test_a_stopped_and_resumed_run_records_who_held_it_and_where_it_resumed(db, start_daemon, tiny_model_path):
    load_samples(db)
    models = db[defaults.MODELS]
    first = start_daemon("first")
    models.insert_one({"_id": "long", "model_name_or_path": tiny_model_path, "trainer": TRAINER,
                       "data": {"collection": "pirate_chat", "key": "messages"}})
    wait_for(models, "long", lambda d: (d.get("progress") or {}).get("step", 0) >= 3, timeout_s=300)
    assert first.stop(signal.SIGTERM, timeout=60) == 0
    saved = models.find_one({"_id": "long"})["checkpoints"][-1]["step"]
    start_daemon("second")
    done = wait_for(models, "long", finished, timeout_s=600)
    assert done["status"] == "succeeded", done.get("error")

    kinds = [e["kind"] for e in done["events"]]
    claims = [e for e in done["events"] if e["kind"] == "claimed"]
    assert [c["owner"].split(":")[0] for c in claims] == ["first", "second"] and {c["run"] for c in claims} == {1}
    stop = kinds.index("stop_requested")
    assert kinds[stop:stop + 3] == ["stop_requested", "checkpoint_stored", "released"], kinds
    assert done["events"][stop]["reason"] == "sigterm"
    resumed = [e for e in done["events"] if e["kind"] == "resumed"]
    assert [(e["run"], e["step"]) for e in resumed] == [(1, saved)]
    assert kinds.index("released") < kinds.index("resumed") < len(kinds) - 1 and kinds[-1] == "succeeded"
    stored = [e["step"] for e in done["events"] if e["kind"] == "checkpoint_stored"]
    assert stored == sorted(stored) and stored[-1] == STEPS
