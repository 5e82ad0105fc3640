"""Retraining the daemons start by themselves: after N new matching documents, and on a schedule.

What must hold with any number of daemons: one run per threshold or tick, never while a run is
going, and a count that a daemon restart neither loses nor repeats.
"""

import asyncio
import contextlib
import datetime as dt
import sys
import time

import pytest
from pymongo import AsyncMongoClient

from listener import retrain, tasks
from listener.connection import connect
from listener.periodic import Periodic
from listener.processes import wait_until
from listener.records import SkipLog
from listener.retrain import Retrainer
from listener.settings import Settings
from tests.conftest import wait_for
from tests.documents import model
from training import defaults, schedule
from training.config import SpecError, parse_model
from training.limits import Limits

FAST_CHECKS = {"MONGOTUNE_RETRAIN_CHECK_S": "0.5"}
TICK = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)


def notes(lang: str, count: int, start: int = 0) -> list[dict]:
    return [{"text": f"note {start + i} in {lang}: the tide turns at dawn", "lang": lang} for i in range(count)]


def retraining(doc_id, path, **retrain_spec) -> dict:
    """A model trained on the English notes only, retrained as `retrain_spec` says."""
    return model(doc_id, path, data={"collection": "notes", "key": "text", "filter": {"lang": "en"}},
                 retrain=retrain_spec)


def succeeded_run(number: int):
    return lambda d: d.get("run") == number and d.get("status") == "succeeded"


def tally(db, daemon: str) -> dict | None:
    """The daemon's count for the one model of these tests (its tally of the model's collection holds one)."""
    record = db[defaults.LISTENER].find_one({"kind": retrain.TALLY, "daemon": daemon})
    return record["counts"][0] if record and record["counts"] else None


def wait_tally(db, daemon: str, count: int, timeout: float = 60) -> dict:
    """Until `daemon` has counted `count` inserts (it counts in insertion order, so earlier ones are seen)."""
    try:
        return wait_until(lambda: (found := tally(db, daemon)) and found["count"] >= count and found, timeout,
                          f"{daemon} counting {count} inserts", poll_s=0.2)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; its tally: {tally(db, daemon)}") from None


def requested(document: dict, before_run: int | None = None) -> list[dict]:
    """The retrain requests in the document's events; with `before_run`, those before that run was claimed."""
    found = []
    for event in document.get("events", []):
        if before_run is not None and event.get("kind") == "claimed" and event.get("run") == before_run:
            break
        if event.get("kind") == "retrain_requested":
            found.append(event)
    return found


def ended_run(number: int):
    """Run `number` has ended: its entry says how. Not `succeeded_run`, which a schedule's next tick may end at once
    (succeeded -> pending), so that a poll can miss it."""
    return lambda d: len(d.get("runs") or []) >= number and d["runs"][number - 1].get("outcome") is not None


def test_retrain_fields_are_checked_against_the_operators_minimum():
    base = {"_id": "m", "model_name_or_path": "org/name", "data": {"collection": "notes"}}
    every_minute = {**base, "retrain": {"schedule": "* * * * *"}}
    with pytest.raises(SpecError) as refused:
        parse_model(every_minute)
    assert refused.value.field == "retrain.schedule" and "MONGOTUNE_MIN_RETRAIN_INTERVAL_S" in str(refused.value)
    assert parse_model(every_minute, Limits(min_retrain_interval_s=60)).retrain.schedule == "* * * * *"
    for bad in ({"schedule": "every day"}, {"schedule": "0 0 31 2 *"}, {"on_new_documents": 0}, {"from": "latest"}):
        with pytest.raises(SpecError) as refused:
            parse_model({**base, "retrain": bad})
        assert refused.value.field.startswith("retrain.")
    spec = parse_model({**base, "retrain": {"on_new_documents": 20, "schedule": "0 3 * * mon", "from": "base"}})
    assert spec.retrain.on_new_documents == 20 and spec.retrain.from_ == "base"


def test_a_late_job_finds_the_tick_it_fired_for():
    every_ten = schedule.trigger("*/10 * * * * *")
    assert schedule.latest_tick(every_ten, TICK + dt.timedelta(seconds=13), 60) == TICK + dt.timedelta(seconds=10)
    assert schedule.latest_tick(every_ten, TICK + dt.timedelta(seconds=20), 60) == TICK + dt.timedelta(seconds=20)


def test_a_filter_moves_onto_the_inserted_document_or_is_checked_by_the_server():
    query = {"lang": "en", "$or": [{"score": {"$gt": 3}}, {"tags": "gold"}]}
    assert retrain.on_full_document(query) == {"fullDocument.lang": "en", "$or": [
        {"fullDocument.score": {"$gt": 3}}, {"fullDocument.tags": "gold"}]}
    pipeline, checked = retrain.insert_pipeline([{"$expr": {"$gt": ["$a", "$b"]}}])
    assert checked and pipeline[0]["$match"] == {"operationType": "insert"}


def test_one_claim_per_tick_and_one_start_per_run_however_many_daemons_race(db, server_uri):
    """The two fences of every retrain, raced by eight clients at once."""
    db[defaults.MODELS].insert_one({"_id": "raced", "status": "succeeded", "run": 1})

    async def race() -> tuple[list, list, list]:
        client = AsyncMongoClient(server_uri, tz_aware=True)
        records, models = client[db.name][defaults.LISTENER], client[db.name][defaults.MODELS]
        try:
            first = await asyncio.gather(*(retrain.claim_tick(records, "raced", TICK, f"d{i}") for i in range(8)))
            later = await asyncio.gather(*(retrain.claim_tick(records, "raced", TICK + dt.timedelta(minutes=5), f"d{i}")
                                           for i in range(8)))
            again = await asyncio.gather(*(retrain.claim_tick(records, "raced", TICK, f"d{i}") for i in range(8)))
            starts = await asyncio.gather(*(retrain.start(models, "raced", 1, "schedule") for _ in range(8)))
            return first + later + again, starts, [await retrain.start(models, "raced", 1, "schedule")]
        finally:
            await client.close()

    claims, starts, after = asyncio.run(race())
    assert claims.count(True) == 2 and claims[16:] == [False] * 8  # a tick once claimed is never claimed again
    assert starts.count(True) == 1 and after == [False]
    document = db[defaults.MODELS].find_one({"_id": "raced"})
    assert document["status"] == "pending" and document["trigger"] == "schedule" and len(requested(document)) == 1


def test_a_running_model_is_never_retrained(db, server_uri):
    db[defaults.MODELS].insert_one({"_id": "busy", "status": "running", "run": 3})

    async def attempt() -> bool:
        client = AsyncMongoClient(server_uri, tz_aware=True)
        try:
            return await retrain.start(client[db.name][defaults.MODELS], "busy", 3, "new_documents")
        finally:
            await client.close()

    assert asyncio.run(attempt()) is False
    assert db[defaults.MODELS].find_one({"_id": "busy"})["status"] == "running"


@contextlib.asynccontextmanager
async def solo(server_uri: str, db_name: str, home, environ: dict | None = None, **limits):
    """One daemon's `Retrainer`, driven in this process: `check` is called by the test, not on a timer."""
    settings = Settings.load({"uri": server_uri, "db": db_name, "home": home, "name": "solo",
                              "limits": {"model_roots": ("/models",), **limits}}, environ=environ or {})
    client = await connect(server_uri)
    retrainer = Retrainer(client[db_name], settings, "solo:1", Periodic(), SkipLog())
    try:
        yield retrainer
    finally:
        await retrainer.close()
        await client.close()


async def until(check, retrainer: Retrainer | None = None, timeout_s: float = 30):
    """Let the retrainer's stream tasks run until `check()` returns something truthy, and return that; where
    `retrainer` is given, run its periodic pass each second meanwhile, as a daemon does."""
    async with asyncio.timeout(timeout_s):
        while not (found := check()):
            if retrainer is not None:
                await retrainer.check()
            await asyncio.sleep(0.05 if retrainer is None else 1)
    return found


def test_a_watcher_that_lost_its_cancellation_is_cancelled_again_until_it_ends():
    """How `Retrainer.close` hung: a watcher cancelled in the loop tick in which PyMongo's connect completed.

    PyMongo opens a socket inside `asyncio.wait_for`, which before Python 3.12 returns the result and drops
    a cancellation arriving in that tick (python/cpython#86296): the watcher carried on, stream open, getMore
    after getMore, and `close`'s gather awaited it forever. Here the same `wait_for` loses the same cancel.
    """
    async def scenario():
        connected = asyncio.get_running_loop().create_future()
        carried_on = []

        async def watcher():
            await asyncio.wait_for(connected, 60)  # as pool_shared._async_create_connection does
            carried_on.append(True)
            while True:  # as a change stream waits for changes
                await asyncio.sleep(0.05)

        task = asyncio.create_task(watcher())
        await asyncio.sleep(0)  # it awaits its connection
        connected.set_result(None)
        task.cancel()  # in the same tick
        left = await tasks.cancel_and_wait([task], timeout_s=20, what="watchers")
        return task, left, carried_on

    task, left, carried_on = asyncio.run(scenario())
    assert not left and task.cancelled()
    assert carried_on == ([True] if sys.version_info < (3, 12) else [])  # the first cancel was lost before 3.12


def test_a_filter_the_stream_cannot_hold_is_checked_per_insert_and_counts_the_same(db, server_uri, tmp_path):
    """A `$jsonSchema` filter: every insert streams and the server checks it; the third match starts the run."""
    document = retraining("scored", "/models/never-loaded", on_new_documents=3)
    document["data"]["filter"] = {"$jsonSchema": {"required": ["score"], "properties": {"score": {"minimum": 6}}}}
    db[defaults.MODELS].insert_one({**document, "status": "succeeded", "run": 1})

    async def scenario() -> None:
        async with solo(server_uri, db.name, tmp_path) as retrainer:
            await retrainer.check()
            await until(lambda: tally(db, "solo"))
            db.notes.insert_many([{"text": "low", "score": 1}, {"text": "high", "score": 7},
                                  {"text": "low", "score": 2}, {"text": "high", "score": 8}])
            await until(lambda: tally(db, "solo")["count"] == 2)
            assert db[defaults.MODELS].find_one({"_id": "scored"})["status"] == "succeeded"
            db.notes.insert_one({"text": "high", "score": 9})
            started = await until(lambda: db[defaults.MODELS].find_one({"_id": "scored", "status": "pending"}))
            assert started["trigger"] == "new_documents" and tally(db, "solo")["count"] == 3
            db[defaults.MODELS].delete_one({"_id": "scored"})
            await retrainer.check()  # a deleted model is no longer watched, and its count is dropped
            assert not retrainer.watchers and tally(db, "solo") is None

    asyncio.run(scenario())


def test_schedules_follow_the_model_documents(db, server_uri, tmp_path):
    """Given later, changed, removed: each daemon's scheduler holds one job per scheduled model, as it is now."""
    models = db[defaults.MODELS]
    models.insert_one(retraining("tidal", "/models/never-loaded"))

    async def scenario() -> list:
        seen = []
        async with solo(server_uri, db.name, tmp_path, min_retrain_interval_s=1) as retrainer:
            for change in ({"retrain.schedule": "0 3 * * *"}, {"retrain.schedule": "*/5 * * * * *"},
                           {"retrain": {"on_new_documents": 4}}):
                models.update_one({"_id": "tidal"}, {"$set": change})
                await retrainer.check()
                seen.append([str(job.trigger) for job in retrainer.periodic.scheduler.get_jobs()])
        return seen

    assert asyncio.run(scenario()) == [
        ["cron[month='*', day='*', day_of_week='*', hour='3', minute='0']"],
        ["cron[month='*', day='*', day_of_week='*', hour='*', minute='*', second='*/5']"], []]


def test_twenty_new_matching_documents_start_a_second_run_and_a_restart_loses_none(db, start_daemon,
                                                                                   tiny_model_path):
    db.notes.insert_many(notes("en", 16))
    models = db[defaults.MODELS]
    daemon = start_daemon("counter", env=FAST_CHECKS)
    models.insert_one(retraining("living", tiny_model_path, on_new_documents=20))
    wait_for(models, "living", succeeded_run(1))
    wait_tally(db, "counter", 0)
    db.notes.insert_many(notes("en", 12, start=100))
    wait_tally(db, "counter", 12)
    daemon.stop()
    db.notes.insert_many(notes("fr", 10) + notes("en", 7, start=200))  # arrive while no daemon runs
    start_daemon("counter", env=FAST_CHECKS)
    counted = wait_tally(db, "counter", 19)
    assert counted["count"] == 19 and counted["run"] == 1  # resumed after the 12th: none lost, none twice, no French
    time.sleep(2)  # several checks pass: 19 is not enough
    assert models.find_one({"_id": "living"})["run"] == 1
    db.notes.insert_one(notes("en", 1, start=300)[0])
    second = wait_for(models, "living", succeeded_run(2))
    assert len(requested(second)) == 1 and requested(second)[0]["trigger"] == "new_documents"
    assert [r.get("trigger") for r in second["runs"]] == ["insert", "new_documents"]
    assert "trigger" not in wait_for(models, "living", lambda d: "trigger" not in d, timeout_s=30)


def test_two_daemons_start_exactly_one_second_run(db, start_daemon, tiny_model_path):
    db.notes.insert_many(notes("en", 16))
    models = db[defaults.MODELS]
    for name in ("left", "right"):
        start_daemon(name, env=FAST_CHECKS)
    models.insert_one(retraining("shared", tiny_model_path, on_new_documents=5))
    wait_for(models, "shared", succeeded_run(1))
    for name in ("left", "right"):
        wait_tally(db, name, 0)
    db.notes.insert_many(notes("en", 5, start=100))
    wait_for(models, "shared", succeeded_run(2))
    time.sleep(3)  # both daemons check several times more; a stale count must not start a third run
    document = models.find_one({"_id": "shared"})
    assert document["run"] == 2 and len(requested(document)) == 1 and len(document["runs"]) == 2


def test_a_schedule_starts_one_run_per_tick_across_two_daemons(db, start_daemon, tiny_model_path):
    """Ticks every 5 s (the operator lowers the minimum for the test); ticks during a run are skipped."""
    db.notes.insert_many(notes("en", 16))
    models = db[defaults.MODELS]
    for name in ("early", "late"):
        start_daemon(name, env={**FAST_CHECKS, "MONGOTUNE_MIN_RETRAIN_INTERVAL_S": "1"})
    models.insert_one(retraining("clockwork", tiny_model_path, schedule="*/5 * * * * *"))
    third = wait_for(models, "clockwork", ended_run(3), timeout_s=240)
    ticks = db[defaults.LISTENER].find_one({"kind": retrain.TICK, "model": "clockwork"})["ticks"]
    when = [t["tick"] for t in ticks]
    assert len(when) == len(set(when)) and when == sorted(when)  # each tick taken by one daemon, once
    started = [t["outcome"] for t in ticks if t["outcome"].startswith("started")]
    assert len(started) == len(set(started)) and "started run 3" in started
    assert [e["trigger"] for e in requested(third, before_run=3)] == ["schedule", "schedule"]  # two runs, two requests
    assert [(r["trigger"], r["outcome"]) for r in third["runs"][:3]] == [
        ("insert", "succeeded"), ("schedule", "succeeded"), ("schedule", "succeeded")]

