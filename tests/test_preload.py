"""No cold start: a promoted checkpoint is loaded before anyone asks, and a model in training answers from its best."""

import asyncio
import json
import logging

import pytest
from bson import ObjectId
from pymongo import AsyncMongoClient

from listener import streams
from listener.leases import lease
from listener.preload import watch_promotions
from listener.processes import wait_until
from tests.test_serving import answer, ask, served_model, stored_checkpoint
from training import defaults


# Tests that neither stop the daemon nor need settings of their own share the module's daemon and database (each its
# own model and request ids): preloading on, and one request a batch, so a steady load makes many batches.
DAEMON_ENV = {"MONGOTUNE_PRELOAD_BEST": "1", "MONGOTUNE_MAX_BATCH": "1"}


def test_a_promoted_checkpoint_is_loaded_before_the_first_request(module_db, module_daemon, tiny_model_path):
    db, daemon = module_db, module_daemon
    db[defaults.MODELS].insert_one(served_model("promoted", tiny_model_path))
    wait_until(lambda: "for promoted checkpoints to preload" in daemon.log(), 60, "the preload stream")
    entry = stored_checkpoint(db, tiny_model_path, "promoted", step=1)
    db[defaults.MODELS].update_one({"_id": "promoted"}, {"$set": {"checkpoints": [entry],
                                                                  "best_checkpoint": {"run": 1, "step": 1}}})
    wait_until(lambda: 'preloaded model "promoted", checkpoint run 1 step 1' in daemon.log(), 120, "the preload")
    ask(db, "first", "promoted", "best")
    done = answer(db, "first")
    assert done["status"] == "done" and done["checkpoint_used"] == {"run": 1, "step": 1}
    assert daemon.log().count(f"with checkpoint {entry['files_id']}") == 1  # loaded once, by the preload


def test_a_promotion_is_preloaded_between_the_batches_of_a_steady_load(module_db, module_daemon, tiny_model_path):
    """Another model's requests never stop coming while the promotion arrives: its preload takes the next turn."""
    db, daemon = module_db, module_daemon
    db[defaults.MODELS].insert_many([served_model("busy", tiny_model_path), served_model("steady", tiny_model_path)])
    wait_until(lambda: "for promoted checkpoints to preload" in daemon.log(), 60, "the preload stream")
    load = [f"busy-{n}" for n in range(60)]
    db[defaults.REQUESTS].insert_many([{"_id": rid, "model": "busy", "input": "ahoy", "checkpoint": "base",
                                        "params": {"max_new_tokens": 8}} for rid in load])
    answer(db, load[0])
    entry = stored_checkpoint(db, tiny_model_path, "steady", step=1)
    db[defaults.MODELS].update_one({"_id": "steady"}, {"$set": {"checkpoints": [entry],
                                                                "best_checkpoint": {"run": 1, "step": 1}}})
    wait_until(lambda: 'preloaded model "steady"' in daemon.log(), 120, "the preload")
    assert all(answer(db, rid)["status"] == "done" for rid in load)
    log = daemon.log()
    assert log.index('preloaded model "steady"') < log.rindex('generating 1 answer(s) for model "busy"'), \
        "the preload ran while the load went on, not after it"


def test_a_model_in_training_answers_from_its_best_checkpoint_so_far(module_db, module_daemon, tiny_model_path):
    db = module_db
    entries = [stored_checkpoint(db, tiny_model_path, "training", step=step) for step in (1, 2)]
    training = {**served_model("training", tiny_model_path, entries), "status": "running", "run": 1,
                "best_checkpoint": {"run": 1, "step": 1}, "lease": lease("another-daemon", 3600)}
    db[defaults.MODELS].insert_one(training)
    ask(db, "meanwhile", "training", "best")
    done = answer(db, "meanwhile")
    assert done["status"] == "done" and done["checkpoint_used"] == {"run": 1, "step": 1}
    assert db[defaults.MODELS].find_one({"_id": "training"})["status"] == "running"


def test_hostile_model_updates_never_stop_the_preloading_of_a_later_promotion(db, start_daemon, tiny_model_path):
    """Each hostile write is a promotion event for a model that cannot be preloaded; the next good one still is."""
    models = db[defaults.MODELS]
    models.insert_many([served_model("llm", tiny_model_path), served_model("hostile", tiny_model_path)])
    daemon = start_daemon(env={"MONGOTUNE_PRELOAD_BEST": "1"}, args=("--log-format", "json"))
    wait_until(lambda: "for promoted checkpoints to preload" in daemon.log(), 60, "the preload stream")
    hostile = [{"best_checkpoint": "bestt"},
               {"checkpoints": [{"run": 1, "step": 1, "files_id": ObjectId()}],
                "best_checkpoint": {"run": 2**62, "step": "x" * 1_000_000}},
               {"checkpoints": "many", "best_checkpoint": [[[]]] * 1000},
               {"checkpoints": [{"run": [1], "step": {"$gt": 0}}], "status": "succeeded", "best_checkpoint": None}]
    for number, fields in enumerate(hostile, 1):
        models.update_one({"_id": "hostile"}, {"$set": fields})
        wait_until(lambda: len(preloads_of(daemon, "hostile")) >= number, 60, f"hostile write {number} handled")
    assert "preloaded model" not in " ".join(preloads_of(daemon, "hostile"))

    entry = stored_checkpoint(db, tiny_model_path, "llm", step=1)
    models.update_one({"_id": "llm"}, {"$set": {"checkpoints": [entry], "best_checkpoint": {"run": 1, "step": 1}}})
    wait_until(lambda: preloads_of(daemon, "llm"), 120, "the preload of llm")
    assert preloads_of(daemon, "llm") == ['preloaded model "llm", checkpoint run 1 step 1']


def preloads_of(daemon, model: str) -> list[str]:
    """What the daemon's `--log-format json` log says of each preload of `model`."""
    records = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    return [r["message"] for r in records if f'model "{model}"' in r["message"] and "preload" in r["message"]]


def test_the_promotion_stream_carries_promotions_only_and_keeps_no_resume_token(client, db, caplog):
    """Driven in-process on the real server: progress and other status writes never reach the preloader."""
    caplog.set_level(logging.INFO, logger="listener")
    models = db[defaults.MODELS]
    models.insert_many([{"_id": "a", "status": "running"}, {"_id": "b", "status": "running"}])
    writes = [("a", {"progress.step": 3}), ("a", {"best_checkpoint": {"run": 1, "step": 3}}),
              ("b", {"status": "failed"}), ("b", {"status": "succeeded"}), ("a", {"progress.step": 4}), ("a", None)]

    async def promoted_ids() -> list:
        async_client = AsyncMongoClient(client.address[0], client.address[1], directConnection=True)
        seen: list = []
        task = asyncio.create_task(watch_promotions(async_client[db.name], seen.append))
        try:
            await until(lambda: "for promoted checkpoints to preload" in caplog.text, "the stream")
            for model_id, fields in writes:
                if fields is None:
                    await asyncio.to_thread(models.replace_one, {"_id": model_id}, {"status": "succeeded"})
                else:
                    await asyncio.to_thread(models.update_one, {"_id": model_id}, {"$set": fields})
            await until(lambda: len(seen) >= 3, "three promotions")
            return seen
        finally:
            task.cancel()
            await async_client.close()

    assert asyncio.run(promoted_ids()) == ["a", "b", "a"]  # in order: the writes between were never delivered
    assert db[defaults.LISTENER].count_documents({}) == 0


async def until(check, what: str, timeout_s: float = 30.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{what} did not happen within {timeout_s:.0f} s")


@pytest.mark.parametrize("change", [{"operationType": 7}, {"operationType": "update", "fullDocument": "x"}, {}])
def test_a_malformed_change_event_is_skipped_with_a_log_line(change, caplog):
    handled: list = []

    async def handle(document: dict) -> None:
        handled.append(document)

    asyncio.run(streams._deliver(change, handle))
    assert handled == [] and "skipping a change event of an unexpected shape" in caplog.text
