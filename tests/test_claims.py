"""The fast tier: the daemon driven in this process against the real server, training stood in for.

Claim, slot, cancel-before-claim, invalid-document, reap and release logic run here in
milliseconds; the same paths with real `listener start` processes and real kills are in
test_daemon.py, test_recovery.py and test_robustness.py.
"""

import asyncio
import contextlib
import datetime as dt

from listener.connection import connect
from listener.daemon import Daemon
from listener.periodic import Periodic
from listener.settings import Settings
from listener.status import MODEL_TRANSITIONS, Status, now, transition
from tests.documents import model
from training import defaults

PATH = "/models/never-loaded"  # parse_model checks the shape; the stand-in never loads it


class StandIn:
    """Stands in for the training child: records each run it is given and ends it when told."""

    def __init__(self, outcome: Status = Status.SUCCEEDED):
        self.outcome = outcome
        self.runs: list[tuple] = []
        self.finish = asyncio.Event()

    async def __call__(self, db, settings, model_id, run: int, owner: str, forks=None, devices=None) -> Status:
        self.runs.append((model_id, run, owner))
        await self.finish.wait()
        await transition(db[defaults.MODELS], model_id, Status.RUNNING, self.outcome, MODEL_TRANSITIONS,
                         match={"lease.owner": owner}, unset=("lease",))
        return self.outcome


@contextlib.asynccontextmanager
async def daemon(uri: str, db_name: str, home, stand_in: StandIn, name: str = "fast", **options):
    settings = Settings.load({"uri": uri, "db": db_name, "home": home, "name": name, "validators": False,
                              "limits": {"model_roots": ("/models",)}, **options}, environ={})
    client = await connect(uri)
    try:
        yield Daemon(client, settings, train=stand_in)
    finally:
        await client.close()


async def until(check, timeout_s: float = 10.0) -> None:
    """Let the daemon's tasks run until `check()` holds."""
    async with asyncio.timeout(timeout_s):
        while not check():
            await asyncio.sleep(0.01)


def read(db, doc_id) -> dict:
    return db[defaults.MODELS].find_one({"_id": doc_id})


def test_two_daemons_racing_for_one_model_claim_it_once(server_uri, db, tmp_path):
    db[defaults.MODELS].insert_one(model("m", PATH))
    stand_in = StandIn()

    async def body():
        async with daemon(server_uri, db.name, tmp_path, stand_in, "a") as a, \
                daemon(server_uri, db.name, tmp_path, stand_in, "b") as b:
            document = read(db, "m")
            await asyncio.gather(a.consider_model(document), b.consider_model(document))
            await until(lambda: bool(stand_in.runs))
            assert len(a.trainings) + len(b.trainings) == 1
            stand_in.finish.set()
            await asyncio.gather(*[t for t in [*a.trainings.values(), *b.trainings.values()] if t])

    asyncio.run(body())
    assert [run for _, run, _ in stand_in.runs] == [1]
    assert read(db, "m")["status"] == "succeeded"


def test_a_full_daemon_leaves_the_next_model_pending_and_takes_it_when_a_slot_frees(server_uri, db, tmp_path):
    db[defaults.MODELS].insert_many([model("first", PATH), model("second", PATH)])
    stand_in = StandIn()

    async def body():
        async with daemon(server_uri, db.name, tmp_path, stand_in, max_jobs=1) as d:
            await d.scan()
            await until(lambda: stand_in.runs)  # the claimed run's task starts
            assert [m for m, _, _ in stand_in.runs] == ["first"]
            assert read(db, "second").get("status") is None  # untouched: another daemon may take it
            stand_in.finish.set()  # the first ends; its slot frees and the daemon scans again
            await until(lambda: len(stand_in.runs) == 2)
            await until(lambda: not d.trainings)

    asyncio.run(body())
    assert [m for m, _, _ in stand_in.runs] == ["first", "second"]
    assert {read(db, m)["status"] for m in ("first", "second")} == {"succeeded"}


def test_a_model_cancelled_before_any_claim_is_never_trained(server_uri, db, tmp_path):
    db[defaults.MODELS].insert_one(model("m", PATH, cancel=True))
    stand_in = StandIn()

    async def body():
        async with daemon(server_uri, db.name, tmp_path, stand_in) as d:
            await d.scan()

    asyncio.run(body())
    assert stand_in.runs == []
    document = read(db, "m")
    assert document["status"] == "cancelled" and "cancel" not in document and "run" not in document


def one_scan(uri: str, db_name: str, home) -> tuple[list, dict]:
    """The models one scan of a daemon (whose trainings end at once) claims, in order, and its counters."""
    stand_in = StandIn()
    stand_in.finish.set()

    async def body():
        async with daemon(uri, db_name, home, stand_in) as d:
            await d.scan()
            await until(lambda: not d.trainings)
            return dict(d.counters)

    counters = asyncio.run(body())
    return [m for m, _, _ in stand_in.runs], counters


def test_an_invalid_model_fails_naming_its_field_and_the_next_one_is_claimed(server_uri, db, tmp_path):
    db[defaults.MODELS].insert_many([model("bad", PATH, trainer={"learnin_rate": 0.1}), model("good", PATH)])
    claimed, counters = one_scan(server_uri, db.name, tmp_path)
    assert claimed == ["good"] and counters["invalid_documents"] == 1
    bad = read(db, "bad")
    assert bad["status"] == "failed" and bad["error"]["field"] == "trainer.learnin_rate"
    assert "learning_rate" in bad["error"]["message"]  # did you mean


def test_a_dead_daemons_run_is_reaped_and_resumed_as_the_same_run(server_uri, db, tmp_path):
    expired = {"owner": "dead:1:abc", "expires_at": now() - dt.timedelta(seconds=5)}
    db[defaults.MODELS].insert_one({**model("m", PATH), "status": "running", "run": 1, "attempts": 1,
                                    "started_at": now(), "lease": expired})
    stand_in = StandIn()

    async def body():
        async with daemon(server_uri, db.name, tmp_path, stand_in) as d:
            await d.reap_models()  # requeues, then scans: the same run is claimed again
            await until(lambda: bool(stand_in.runs))
            held = read(db, "m")
            assert held["status"] == "running" and held["lease"]["owner"] == d.owner
            stand_in.finish.set()
            await until(lambda: not d.trainings)

    asyncio.run(body())
    assert [(m, run) for m, run, _ in stand_in.runs] == [("m", 1)]
    document = read(db, "m")
    assert document["status"] == "succeeded" and document["attempts"] == 2
    assert [e["event"] for e in document["history"]] == ["lease expired"]


def test_a_daemon_paused_past_its_lease_keeps_the_training_it_still_supervises(server_uri, db, tmp_path):
    """Its own reaper leaves alone what it trains, however late the renewal; a lease of its own that nothing here
    renews any more (a supervisor that gave up on an unreachable database) is reaped like any other."""
    db[defaults.MODELS].insert_one(model("m", PATH))
    stand_in = StandIn()
    past = now() - dt.timedelta(seconds=5)

    async def body():
        async with daemon(server_uri, db.name, tmp_path, stand_in, max_jobs=2) as d:
            await d.scan()
            await until(lambda: bool(stand_in.runs))
            # Paused past its lease: no renewal for longer than the lease, which a reaper sees as expired.
            db[defaults.MODELS].update_one({"_id": "m"}, {"$set": {"lease.expires_at": past}})
            db[defaults.MODELS].insert_one({**model("left", PATH), "status": "running", "run": 1, "attempts": 1,
                                            "started_at": now(), "lease": {"owner": d.owner, "expires_at": past}})
            await d.reap_models()
            kept = read(db, "m")
            assert kept["status"] == "running" and kept["lease"]["owner"] == d.owner and "history" not in kept
            await until(lambda: len(stand_in.runs) == 2)  # "left" was handed back, then claimed as the same run
            stand_in.finish.set()
            await until(lambda: not d.trainings)
            return d.owner

    owner = asyncio.run(body())
    assert [(m, run) for m, run, _ in stand_in.runs] == [("m", 1), ("left", 1)]
    trained = read(db, "m")
    assert trained["status"] == "succeeded" and trained["attempts"] == 1 and "history" not in trained
    left = read(db, "left")
    assert left["status"] == "succeeded" and left["attempts"] == 2
    assert [(e["event"], e["owner"]) for e in left["history"]] == [("lease expired", owner)]


def test_a_run_whose_lease_expired_too_often_fails_instead_of_looping(server_uri, db, tmp_path):
    past = [{"at": now(), "event": "lease expired", "owner": f"dead{i}", "attempt": i} for i in (1, 2)]
    expired = {"owner": "dead3", "expires_at": now() - dt.timedelta(seconds=5)}
    db[defaults.MODELS].insert_one({**model("m", PATH), "status": "running", "run": 1, "attempts": 3,
                                    "lease": expired, "history": past})
    stand_in = StandIn()

    async def body():
        async with daemon(server_uri, db.name, tmp_path, stand_in, max_attempts=3) as d:
            await d.reap_models()

    asyncio.run(body())
    document = read(db, "m")
    assert stand_in.runs == []
    assert document["status"] == "failed" and document["error"]["type"] == "too_many_attempts"
    assert "dead1" in document["error"]["message"] and "dead3" in document["error"]["message"]


def test_a_stopping_daemon_gives_its_runs_back_and_deregisters(server_uri, db, tmp_path):
    db[defaults.MODELS].insert_one(model("m", PATH))
    stand_in = StandIn()  # never told to finish: the run is still going when the daemon stops

    async def body():
        async with daemon(server_uri, db.name, tmp_path, stand_in) as d:
            work = asyncio.create_task(d.work())
            await until(lambda: bool(stand_in.runs))
            assert db[defaults.LISTENER].find_one({"_id": f"daemon:{d.owner}"}) is not None
            d.stop_event.set()
            await asyncio.wait_for(work, 30)
            return d.owner

    owner = asyncio.run(body())
    document = read(db, "m")
    assert document["status"] == "pending" and "lease" not in document and document["run"] == 1
    assert db[defaults.LISTENER].find_one({"_id": f"daemon:{owner}"}) is None


def test_closing_periodic_work_awaits_a_job_in_flight():
    finished = []

    async def slow_job():
        await asyncio.sleep(0.2)
        finished.append(True)

    async def body():
        periodic = Periodic()
        periodic.every(0.05, slow_job)
        periodic.start()
        await until(lambda: bool(periodic.running))
        await periodic.close(timeout_s=5)
        assert not periodic.running

    asyncio.run(body())
    assert finished == [True]
