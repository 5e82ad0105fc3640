"""Claiming requests in batches (`listener.intake`) and taking over a dead daemon's (`leases.take_over`).

Fast tier: the intake and the real `Serving` queues run in this process against the real server; no
worker is started (nothing here generates), but in the one (slow) test of starting it before the first claim.
The same paths with real daemons, kills and pauses are in test_takeover.py.
"""

import asyncio
import datetime as dt
import signal
import subprocess
import sys
from collections import Counter

import pytest
from pymongo import AsyncMongoClient, monitoring


from listener.forks import Forks
from listener.intake import Intake
from listener import liveness
from listener.leases import HEARTBEAT_STOPPED, PROCESS_GONE, alive_until, take_over
from listener.records import RequestState, SkipLog
from listener.serving import Serving
from listener.settings import Settings
from listener.status import REQUEST_TRANSITIONS
from tests.documents import request
from tests.test_claims import until
from tests.test_status import run_with
from training import defaults
from training.lifeline import stat


def settings(db, **options) -> Settings:
    return Settings.load({"db": db.name, "validators": False, **options}, environ={})


def intake_for(adb, owner: str, **options) -> Intake:
    """An intake feeding a real `Serving` (its queues only, unless a test warms its worker up)."""
    chosen = settings(adb, **options)
    counters = {"requests_done": 0, "requests_failed": 0}
    serving = Serving(adb, chosen, owner, counters, Forks(gpus=False), collection_job=None)
    return Intake(adb, chosen, owner, serving, counters, SkipLog(), stopping=lambda: False)


class Commands(monitoring.CommandListener):
    """The commands one client sends, by name: the server's own counters are shared with other tests' daemons."""

    def __init__(self):
        self.sent: Counter = Counter()

    def started(self, event) -> None:
        self.sent[event.command_name] += 1

    def succeeded(self, event) -> None:
        pass

    def failed(self, event) -> None:
        pass


def test_racing_daemons_split_a_burst_and_each_request_is_claimed_once(server_uri, db, client):
    db[defaults.REQUESTS].insert_many([request(f"r{n}", f"m{n % 3}") for n in range(90)])

    async def work(adb):
        intakes = [intake_for(adb, f"d{n}", max_queued_requests=40, max_queue_per_model=40) for n in range(3)]
        await asyncio.gather(*(intake.round() for intake in intakes))
        return {intake.owner: set(intake.serving.queues.held()) for intake in intakes}

    held = run_with(server_uri, db.name, work)
    assert sum(map(len, held.values())) == 90
    for owner, keys in held.items():
        assert len(keys) <= 40
        for other, theirs in held.items():
            assert other == owner or not keys & theirs
    for document in db[defaults.REQUESTS].find():
        assert document["status"] == "running" and document["attempts"] == 1
        assert f'"{document["_id"]}"' in held[document["lease"]["owner"]]


def test_a_claim_costs_the_same_few_round_trips_whatever_its_size(server_uri, db):
    db[defaults.REQUESTS].insert_many([request(f"r{n}", "m") for n in range(32)])
    commands = Commands()

    async def work():
        client = AsyncMongoClient(server_uri, event_listeners=[commands])
        try:
            return await intake_for(client[db.name], "d").round()
        finally:
            await client.close()

    assert asyncio.run(work()) == 32
    # One find per kind of request with room (the 32, and none over a collection) and one update_many claiming
    # them all: no daemon raced, so no read-back.
    assert {name: commands.sent[name] for name in ("find", "update", "getMore")} == {"find": 2, "update": 1,
                                                                                      "getMore": 0}


def test_one_models_flood_does_not_hide_another_models_lone_request(server_uri, db):
    db[defaults.REQUESTS].insert_many([request(f"flood{n}", "busy") for n in range(50)])
    db[defaults.REQUESTS].insert_one(request("lone", "quiet"))

    async def work(adb):
        intake = intake_for(adb, "d", max_queued_requests=20, max_queue_per_model=8)
        await intake.round()
        first = dict(intake.serving.queues.queued())
        await intake.round()  # nothing more for "busy" until its requests leave
        return first, dict(intake.serving.queues.queued())

    first, again = run_with(server_uri, db.name, work)
    assert first == {'"busy"': 8, '"quiet"': 1} == again
    assert db[defaults.REQUESTS].count_documents({"status": "running"}) == 9


def test_what_cannot_be_answered_ends_with_a_reason_and_is_never_handed_to_serving(server_uri, db):
    requests = db[defaults.REQUESTS]
    requests.insert_many([
        request("good", "m"),
        request("cancelled", "m", cancel=True),
        request("tried", "m", attempts=3),
        {"_id": "no-input", "model": "m"},
        request("bad-lease", "m", lease="mine"),
    ])

    async def work(adb):
        intake = intake_for(adb, "d")
        handed = await intake.round()
        return handed, set(intake.serving.queues.held())

    handed, held = run_with(server_uri, db.name, work)
    assert handed == 1 and held == {'"good"'}
    assert requests.find_one({"_id": "cancelled"})["status"] == "cancelled"
    tried = requests.find_one({"_id": "tried"})
    assert tried["status"] == "failed" and tried["error"]["type"] == "too_many_attempts"
    invalid = requests.find_one({"_id": "no-input"})
    assert invalid["status"] == "failed" and invalid["error"]["field"] == "input" and "lease" not in invalid
    malformed = requests.find_one({"_id": "bad-lease"})
    assert malformed["status"] == "failed" and malformed["error"]["field"] == "lease"


def daemon_record(owner: str, alive_for_s: float) -> dict:
    return {"_id": f"daemon:{owner}", "kind": "daemon", "owner": owner, "name": owner, "host": "h", "pid": 1,
            "heartbeat_at": defaults.now(), "alive_until": defaults.now() + dt.timedelta(seconds=alive_for_s)}


def running(doc_id, owner: str) -> dict:
    return {**request(doc_id, "m"), "status": "running", "attempts": 1,
            "lease": {"owner": owner, "expires_at": defaults.now() + dt.timedelta(hours=1)}}


def test_a_dead_daemons_requests_are_requeued_at_once_and_a_live_ones_are_not(server_uri, db):
    db[defaults.LISTENER].insert_many([daemon_record("dead", -1), daemon_record("live", 60)])
    db[defaults.REQUESTS].insert_many([running("of-dead", "dead"), running("of-live", "live"),
                                       running("of-me", "me"), running("of-unknown", "never-registered")])

    async def work(adb):
        return await take_over(adb[defaults.REQUESTS], REQUEST_TRANSITIONS, RequestState, 3, SkipLog(),
                               adb[defaults.LISTENER], "me")

    assert run_with(server_uri, db.name, work) == 2  # its lease has an hour left: the heartbeat said it died
    for doc_id in ("of-dead", "of-unknown"):
        requeued = db[defaults.REQUESTS].find_one({"_id": doc_id})
        assert requeued["status"] == "pending" and "lease" not in requeued
        assert [event["event"] for event in requeued["history"]] == [HEARTBEAT_STOPPED]
    for doc_id, owner in (("of-live", "live"), ("of-me", "me")):
        kept = db[defaults.REQUESTS].find_one({"_id": doc_id})
        assert kept["status"] == "running" and kept["lease"]["owner"] == owner


def test_a_daemon_whose_process_is_gone_loses_its_requests_before_its_heartbeat_stops(server_uri, db):
    """A heartbeat that still promises life, written by a process of this host that has exited, is not believed:
    its requests are requeued at once (`liveness.dead`). A paused process, or one on another host, keeps them."""
    here = liveness.identity()
    exited, paused = (subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) for _ in range(2))
    try:
        paused.send_signal(signal.SIGSTOP)
        records = {}
        for name, process in (("exited", exited), ("paused", paused)):
            started = int(stat(process.pid)[19])
            records[name] = {**daemon_record(name, 60), **here, "pid": process.pid, "pid_started": started}
        records["elsewhere"] = {**records["exited"], "_id": "daemon:elsewhere", "owner": "elsewhere",
                                "boot_id": "another host"}
        exited.kill()
        exited.wait()
        db[defaults.LISTENER].insert_many(list(records.values()))
        db[defaults.REQUESTS].insert_many([running(f"of-{name}", name) for name in records])

        async def work(adb):
            return await take_over(adb[defaults.REQUESTS], REQUEST_TRANSITIONS, RequestState, 3, SkipLog(),
                                   adb[defaults.LISTENER], "me")

        assert run_with(server_uri, db.name, work) == 1
    finally:
        for process in (exited, paused):
            process.kill()
            process.wait()
    requeued = db[defaults.REQUESTS].find_one({"_id": "of-exited"})
    assert requeued["status"] == "pending" and [e["event"] for e in requeued["history"]] == [PROCESS_GONE]
    for name in ("paused", "elsewhere"):
        assert db[defaults.REQUESTS].find_one({"_id": f"of-{name}"})["status"] == "running"


async def full_round(intake: Intake) -> None:
    """Until one whole pass of the intake's loop, begun after this call, has ended: woken twice, the loop takes the
    second wake-up only once the first one's pass is over."""
    for _ in range(2):
        intake.wake()
        await until(lambda: not intake._woken.is_set(), 30)


@pytest.mark.slow  # starts a real serving worker (the fork server's imports)
def test_a_daemon_claims_nothing_before_its_worker_runs_and_starts_it_for_a_pending_request(server_uri, db, tmp_path):
    """`warm_first` (every daemon's intake): a pending request starts serving's real worker (`Seat.warm_up`) and
    stays pending through whole claim rounds while the worker starts (held up here behind serving's turn, as behind
    a batch generating); once it runs, serving wakes the intake and the request is claimed. A cancelled one starts
    nothing and ends at once."""
    db[defaults.MODELS].insert_one({"_id": "m"})  # a request for a model that exists: one that might be answered
    db[defaults.REQUESTS].insert_one({**request("cancelled", "m"), "cancel": True})

    async def work(adb):
        intake = intake_for(adb, "d", uri=server_uri, home=str(tmp_path))
        serving = intake.serving
        intake.warm_first, serving.on_room = True, intake.wake  # as the daemon sets them
        task = asyncio.create_task(intake.run())
        try:
            intake.wake()
            async with asyncio.timeout(30):
                while await adb[defaults.REQUESTS].find_one({"_id": "cancelled", "status": "cancelled"}) is None:
                    await asyncio.sleep(0.02)
            await full_round(intake)
            started_for_cancelled = serving.seat.warming is not None  # only a cancelled request was pending
            async with serving.seat.turn:  # the worker's start waits for it
                await adb[defaults.REQUESTS].insert_one(request("lone", "m"))
                await full_round(intake)
                warming = serving.seat.warming is not None
                await full_round(intake)  # a whole round while the worker is starting
                claimed_early = bool(serving.queues.held()) or await adb[defaults.REQUESTS].find_one(
                    {"_id": "lone", "lease": {"$exists": True}}) is not None
            await until(lambda: '"lone"' in serving.queues.held(), 120)
            worker_runs = serving.seat.started and serving.seat.worker is not None and serving.seat.worker.alive
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await serving.seat.close()
        return started_for_cancelled, warming, claimed_early, worker_runs

    assert run_with(server_uri, db.name, work) == (False, True, False, True)


def test_requests_that_can_only_fail_end_without_a_worker_and_one_for_a_model_that_exists_starts_it(server_uri, db,
                                                                                                    tmp_path):
    """A worker costs seconds of imports: pending requests naming no model that exists (a missing one, an id of no
    model's shape, none at all) fail without one. A request for a model that exists, inserted behind more junk than
    any one find reads, starts it and stays pending while it starts (held up here, so nothing is imported)."""
    junk = [request(f"missing{i}", "no-such-model") for i in range(105)]
    junk += [{**request("shaped", "m"), "model": {"$gt": ""}}, {k: v for k, v in request("none", "m").items()
                                                                  if k != "model"}]
    db[defaults.REQUESTS].insert_many(junk)
    more = [{**request(f"odd{i}", "m"), "model": {"x": i}} for i in range(105)]

    async def failed(adb, count: int) -> None:
        async with asyncio.timeout(60):
            while await adb[defaults.REQUESTS].count_documents({"status": "failed"}) < count:
                await asyncio.sleep(0.05)

    async def work(adb):
        intake = intake_for(adb, "d", uri=server_uri, home=str(tmp_path))
        serving = intake.serving
        intake.warm_first, serving.on_room = True, intake.wake
        tasks = [asyncio.create_task(intake.run()), asyncio.create_task(serving.serve())]
        try:
            intake.wake()
            await failed(adb, len(junk))
            await full_round(intake)
            warmed_for_junk = serving.seat.warming is not None or serving.seat.worker is not None
            async with serving.seat.turn:  # the worker's start waits for it: nothing is imported here
                await adb[defaults.MODELS].insert_one({"_id": "m"})
                await adb[defaults.REQUESTS].insert_many([*more, request("real", "m")])
                intake.wake()
                await failed(adb, len(junk) + len(more))
                await full_round(intake)
                warmed_for_real = serving.seat.warming is not None
                real_claimed = await adb[defaults.REQUESTS].find_one({"_id": "real", "lease": {"$exists": True}})
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await serving.seat.close()
        return warmed_for_junk, warmed_for_real, real_claimed is not None

    assert run_with(server_uri, db.name, work) == (False, True, False)
    errors = {d["error"]["type"] for d in db[defaults.REQUESTS].find({"status": "failed"})}
    assert errors and None not in errors


def test_a_worker_start_that_fails_in_any_way_still_lets_the_intake_claim(server_uri, db, caplog):
    """Only a `Failure` starting the worker let the daemon claim: any other exception (a bug) left it claiming
    nothing, ever, while it heartbeat as healthy. However the start fails, the intake is woken to claim (its
    requests then fail saying why) and the exception is logged with its traceback."""
    async def work(adb):
        intake = intake_for(adb, "d")
        seat, woken = intake.serving.seat, []

        async def broken():
            raise RuntimeError("a bug starting the worker")

        seat.running_worker = broken
        seat.warm_up(lambda: woken.append(True))
        await seat.warming
        return seat.started, woken

    assert run_with(server_uri, db.name, work) == (True, [True])
    # The text, not `exc_info`: a test before this one in the worker may have made the root handlers' records inert
    # (`training.inert`), which moves a traceback into `exc_text`.
    assert "Traceback" in caplog.text and "RuntimeError: a bug starting the worker" in caplog.text, caplog.text


def test_takeovers_count_toward_max_attempts(server_uri, db):
    past = [{"event": HEARTBEAT_STOPPED, "owner": f"dead{n}"} for n in range(2)]
    db[defaults.REQUESTS].insert_one({**running("poison", "dead2"), "attempts": 3, "history": past})

    async def work(adb):
        return await take_over(adb[defaults.REQUESTS], REQUEST_TRANSITIONS, RequestState, 3, SkipLog(),
                               adb[defaults.LISTENER], "me")

    run_with(server_uri, db.name, work)
    failed = db[defaults.REQUESTS].find_one({"_id": "poison"})
    assert failed["status"] == "failed" and failed["error"]["type"] == "too_many_attempts"


def test_a_daemon_of_an_older_release_keeps_its_requests_while_it_beats(server_uri, db):
    """During an upgrade, a daemon whose record has no `alive_until` is alive by its recent heartbeat."""
    older = {k: v for k, v in daemon_record("older", 0).items() if k != "alive_until"}
    db[defaults.LISTENER].insert_many([older, {**older, "_id": "daemon:gone", "owner": "gone",
                                               "heartbeat_at": defaults.now() - dt.timedelta(minutes=5)}])
    db[defaults.REQUESTS].insert_many([running("of-older", "older"), running("of-gone", "gone")])

    async def work(adb):
        return await take_over(adb[defaults.REQUESTS], REQUEST_TRANSITIONS, RequestState, 3, SkipLog(),
                               adb[defaults.LISTENER], "me")

    assert run_with(server_uri, db.name, work) == 1
    assert db[defaults.REQUESTS].find_one({"_id": "of-older"})["status"] == "running"
    assert db[defaults.REQUESTS].find_one({"_id": "of-gone"})["status"] == "pending"


def test_a_heartbeat_promises_life_for_a_few_intervals_only():
    soon = alive_until(heartbeat_s=2)
    assert defaults.now() + dt.timedelta(seconds=5) < soon < defaults.now() + dt.timedelta(seconds=9)


def test_a_round_that_raises_anything_ends_the_round_not_the_intake(server_uri, db):
    """The loop's boundary holds whatever one document makes a round raise: the next wake-up claims again."""
    db[defaults.REQUESTS].insert_one(request("after", "m"))

    async def work(adb):
        intake = intake_for(adb, "d")
        real, raised = intake.round, []

        async def round_once_broken():
            if not raised:
                raised.append(True)
                raise ValueError("what one document made this round raise")
            return await real()

        intake.round = round_once_broken
        task = asyncio.create_task(intake.run())
        try:
            intake.wake()
            await asyncio.sleep(0.2)
            assert not task.done(), "the intake loop ended"
            intake.wake()
            await until(lambda: '"after"' in intake.serving.queues.held(), 30)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return raised

    assert run_with(server_uri, db.name, work) == [True]
