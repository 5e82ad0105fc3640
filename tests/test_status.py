"""`listener.status` and `listener.leases` against the real server: transitions happen once, claims count."""

import asyncio
import datetime as dt

import pytest
from pymongo import AsyncMongoClient

from listener.leases import claim_model, renew
from listener.records import ModelState, parse
from listener.status import FINAL, MODEL_TRANSITIONS, REQUEST_TRANSITIONS, Status, status_filter, transition

S = Status


def run_with(server_uri, db_name, work):
    """Run `work(database)` with an async client on the test database, and close the client."""
    async def main():
        client = AsyncMongoClient(server_uri)
        try:
            return await work(client[db_name])
        finally:
            await client.close()

    return asyncio.run(main())


def test_concurrent_transitions_happen_once(server_uri, db):
    db.models.insert_one({"_id": "m", "status": "pending"})

    async def work(adb):
        return await asyncio.gather(
            transition(adb.models, "m", S.PENDING, S.RUNNING, MODEL_TRANSITIONS, fields={"by": "a"}),
            transition(adb.models, "m", S.PENDING, S.RUNNING, MODEL_TRANSITIONS, fields={"by": "b"}),
        )

    results = run_with(server_uri, db.name, work)
    won = [r for r in results if r is not None]
    assert len(won) == 1
    assert won[0]["status"] == "running"
    assert db.models.find_one({"_id": "m"})["by"] == won[0]["by"]


def test_many_concurrent_claims_one_winner(server_uri, db):
    db.models.insert_one({"_id": "m"})
    document = db.models.find_one({"_id": "m"})

    async def work(adb):
        return await asyncio.gather(*(claim_model(adb.models, parse(ModelState, document), f"owner{i}", 60, []) for i in range(6)))

    results = run_with(server_uri, db.name, work)
    won = [r for r in results if r is not None]
    assert len(won) == 1
    stored = db.models.find_one({"_id": "m"})
    assert stored["attempts"] == 1 and stored["run"] == 1
    assert stored["lease"]["owner"] == won[0]["lease"]["owner"]


def test_transition_returns_none_when_not_in_the_old_status(server_uri, db):
    db.models.insert_one({"_id": "m", "status": "succeeded"})

    async def work(adb):
        return await transition(adb.models, "m", S.PENDING, S.RUNNING, MODEL_TRANSITIONS)

    assert run_with(server_uri, db.name, work) is None
    assert db.models.find_one({"_id": "m"})["status"] == "succeeded"


def test_a_document_without_status_counts_as_pending(server_uri, db):
    db.requests.insert_one({"_id": "r"})

    async def work(adb):
        return await transition(adb.requests, "r", S.PENDING, S.FAILED, REQUEST_TRANSITIONS,
                                fields={"error": {"type": "x"}})

    after = run_with(server_uri, db.name, work)
    assert after["status"] == "failed" and after["error"] == {"type": "x"}
    assert status_filter(S.RUNNING) == {"status": "running"}


@pytest.mark.parametrize("old, new, table", [
    (S.PENDING, S.SUCCEEDED, MODEL_TRANSITIONS),
    (S.SUCCEEDED, S.RUNNING, MODEL_TRANSITIONS),
    (S.FAILED, S.CANCELLED, MODEL_TRANSITIONS),
    (S.RUNNING, S.DONE, MODEL_TRANSITIONS),
    (S.DONE, S.PENDING, REQUEST_TRANSITIONS),
    (S.PENDING, S.DONE, REQUEST_TRANSITIONS),
    (S.RUNNING, S.SUCCEEDED, REQUEST_TRANSITIONS),
])
def test_disallowed_transitions_raise(server_uri, db, old, new, table):
    db.models.insert_one({"_id": "m", "status": old.value})

    async def work(adb):
        return await transition(adb.models, "m", old, new, table)

    with pytest.raises(ValueError, match=f"{old.value} -> {new.value}"):
        run_with(server_uri, db.name, work)
    assert db.models.find_one({"_id": "m"})["status"] == old.value


def test_final_statuses_stamp_finished_at(server_uri, db):
    db.models.insert_many([{"_id": status.value, "status": "running"} for status in
                           (S.SUCCEEDED, S.FAILED, S.CANCELLED, S.PENDING)])

    async def work(adb):
        return {new: await transition(adb.models, new.value, S.RUNNING, new, MODEL_TRANSITIONS)
                for new in (S.SUCCEEDED, S.FAILED, S.CANCELLED, S.PENDING)}

    before = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - dt.timedelta(seconds=5)
    after = run_with(server_uri, db.name, work)
    for new in (S.SUCCEEDED, S.FAILED, S.CANCELLED):
        assert new in FINAL
        assert after[new]["status"] == new.value
        assert isinstance(after[new]["finished_at"], dt.datetime)
        assert after[new]["finished_at"].replace(tzinfo=None) >= before
    assert "finished_at" not in after[S.PENDING]


def test_request_done_is_final(server_uri, db):
    db.requests.insert_one({"_id": "r", "status": "running"})

    async def work(adb):
        return await transition(adb.requests, "r", S.RUNNING, S.DONE, REQUEST_TRANSITIONS,
                                fields={"output": "arr"}, inc={"n": 2}, unset=("lease",))

    after = run_with(server_uri, db.name, work)
    assert after["status"] == "done" and after["output"] == "arr" and after["n"] == 2
    assert "finished_at" in after and "lease" not in after


# --- claims --------------------------------------------------------------------------------------

def claim(server_uri, db, document, owner):
    async def work(adb):
        return await claim_model(adb.models, parse(ModelState, document), owner, 60, [])

    return run_with(server_uri, db.name, work)


def test_claim_fresh_document(server_uri, db):
    db.models.insert_one({"_id": "m", "model_name_or_path": "x"})
    document = db.models.find_one({"_id": "m"})
    claimed = claim(server_uri, db, document, "daemon-a")
    assert claimed["status"] == "running"
    assert claimed["run"] == 1
    assert claimed["attempts"] == 1
    assert claimed["lease"]["owner"] == "daemon-a"
    assert claimed["lease"]["expires_at"] > dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    assert "started_at" in claimed
    assert claim(server_uri, db, document, "daemon-b") is None
    assert db.models.find_one({"_id": "m"})["lease"]["owner"] == "daemon-a"


def test_unfinished_run_is_resumed(server_uri, db):
    started = dt.datetime(2024, 1, 1)
    db.models.insert_one({"_id": "m", "status": "pending", "run": 1, "attempts": 1, "started_at": started,
                          "progress": {"step": 30}, "lease": {"owner": "dead", "expires_at": started}})
    document = db.models.find_one({"_id": "m"})
    assert parse(ModelState, document).interrupted()
    claimed = claim(server_uri, db, document, "daemon-b")
    assert claimed["run"] == 1
    assert claimed["attempts"] == 2
    assert claimed["lease"]["owner"] == "daemon-b"
    assert claimed["started_at"] == started
    assert claimed["progress"] == {"step": 30}


def test_finished_run_starts_a_new_one(server_uri, db):
    started = dt.datetime(2024, 1, 1)
    db.models.insert_one({"_id": "m", "status": "pending", "run": 1, "attempts": 3, "started_at": started,
                          "finished_at": started, "error": {"type": "x"}, "history": [{"event": "lease expired"}],
                          "progress": {"step": 30}, "checkpoints": [{"run": 1, "step": 30}]})
    document = db.models.find_one({"_id": "m"})
    assert not parse(ModelState, document).interrupted()
    claimed = claim(server_uri, db, document, "daemon-a")
    assert claimed["run"] == 2
    assert claimed["attempts"] == 1
    assert claimed["started_at"] > started
    for gone in ("finished_at", "error", "history", "progress"):
        assert gone not in claimed
    assert claimed["checkpoints"] == [{"run": 1, "step": 30}]


def test_a_claim_never_overrides_a_cancel(server_uri, db):
    db.models.insert_one({"_id": "m", "status": "pending"})
    document = db.models.find_one({"_id": "m"})
    db.models.update_one({"_id": "m"}, {"$set": {"cancel": True}})  # arrives after the daemon's snapshot
    assert claim(server_uri, db, document, "daemon-a") is None
    assert db.models.find_one({"_id": "m"})["cancel"] is True


def test_claim_with_a_stale_run_fails(server_uri, db):
    db.models.insert_one({"_id": "m", "status": "pending", "run": 2, "started_at": dt.datetime(2024, 1, 1)})
    stale = {"_id": "m", "status": "pending", "run": 1, "started_at": dt.datetime(2024, 1, 1)}
    assert claim(server_uri, db, stale, "daemon-a") is None
    assert db.models.find_one({"_id": "m"})["status"] == "pending"


def test_renew(server_uri, db):
    db.models.insert_one({"_id": "m"})
    document = db.models.find_one({"_id": "m"})
    claimed = claim(server_uri, db, document, "daemon-a")

    async def work(adb):
        return (await renew(adb.models, "m", "daemon-a", 60), await renew(adb.models, "m", "daemon-b", 60),
                await renew(adb.models, "nope", "daemon-a", 60))

    mine, theirs, missing = run_with(server_uri, db.name, work)
    assert mine == {"_id": "m"}
    assert theirs is None
    assert missing is None
    stored = db.models.find_one({"_id": "m"})
    assert stored["lease"]["owner"] == "daemon-a"
    assert stored["lease"]["expires_at"] >= claimed["lease"]["expires_at"]


def test_a_run_whose_lease_passed_on_ends_only_for_the_daemon_holding_it(server_uri, db):
    """A daemon paused past its lease while its child finished: the next owner resumes the run, so the late one
    writes neither its outcome nor its status, and says the run is still running."""
    from listener.jobs import _end

    lease = {"owner": "daemon-b", "expires_at": dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=1)}
    db.models.insert_one({"_id": "m", "status": "running", "run": 1, "runs": [{"number": 1}], "lease": lease})

    async def late(adb):
        return await _end(adb.models, "m", 1, "daemon-a", S.SUCCEEDED, {})

    assert run_with(server_uri, db.name, late) is S.RUNNING
    kept = db.models.find_one({"_id": "m"})
    assert kept["status"] == "running" and kept["lease"]["owner"] == "daemon-b" and kept["runs"] == [{"number": 1}]

    async def holder(adb):
        return await _end(adb.models, "m", 1, "daemon-b", S.SUCCEEDED, {})

    assert run_with(server_uri, db.name, holder) is S.SUCCEEDED
    ended = db.models.find_one({"_id": "m"})
    assert ended["status"] == "succeeded" and ended["runs"][0]["outcome"] == "succeeded" and "lease" not in ended


def test_renew_after_the_job_finished_is_none(server_uri, db):
    db.models.insert_one({"_id": "m", "status": "succeeded", "lease": {"owner": "daemon-a"}})

    async def work(adb):
        return await renew(adb.models, "m", "daemon-a", 60)

    assert run_with(server_uri, db.name, work) is None


def test_a_running_document_without_a_lease_is_failed_naming_it(server_uri, db):
    from listener.leases import reap
    from listener.records import RequestState, SkipLog

    db.requests.insert_many([{"_id": "forged", "status": "running"},
                             {"_id": "odd", "status": "running", "lease": {"owner": "x", "expires_at": "soon"}}])

    async def work(adb):
        return await reap(adb.requests, REQUEST_TRANSITIONS, RequestState, 3, SkipLog())

    run_with(server_uri, db.name, work)
    for doc_id in ("forged", "odd"):
        failed = db.requests.find_one({"_id": doc_id})
        assert failed["status"] == "failed" and failed["error"]["field"] == "lease"


@pytest.mark.parametrize(("code", "cancel", "expected"), [
    (0, False, S.SUCCEEDED), (0, True, S.SUCCEEDED), (4, False, S.CANCELLED), (5, False, S.PENDING),
    (5, True, S.CANCELLED), (3, False, S.FAILED), (1, True, S.CANCELLED), (-9, False, S.FAILED), (42, False, S.FAILED),
    (8, False, S.SUCCEEDED), (8, True, S.SUCCEEDED),  # a feedback run with nothing to train: the model serves on
])
def test_a_childs_exit_maps_to_one_status(code, cancel, expected):
    from listener.jobs import outcome

    assert outcome(code, cancel) is expected
