"""A dead daemon's requests are answered by another within seconds; a paused one never writes a second answer.

Real `listener start` processes, killed and paused with real signals. Each test sets a request lease of
ten minutes, so a takeover seen here can only have come from `leases.take_over` (a heartbeat that stopped,
or, on this host, a daemon process that is gone), which the requests' `history` names. No timing is asserted: the tests wait for what must happen.
"""

import signal
import threading

from listener.leases import HEARTBEAT_STOPPED, PROCESS_GONE
from listener.processes import wait_until
from tests.conftest import finished, wait_for
from tests.documents import request
from tests.test_serving import served_model
from training import defaults

FAST_BEATS = {"MONGOTUNE_HEARTBEAT_S": "0.5", "MONGOTUNE_REQUEST_LEASE_S": "600"}
COUNT = 6


def claimed_by_one(db, ids: list) -> str:
    """Wait until every request is claimed by the same daemon (its first load keeps them unanswered); its owner."""
    def held() -> str | None:
        owners = {d.get("lease", {}).get("owner") for d in db[defaults.REQUESTS].find({"_id": {"$in": ids}})}
        return owners.pop() if len(owners) == 1 and None not in owners else None

    return wait_until(held, 60, "one daemon's claim of every request", poll_s=0.02)


class DoneWrites:
    """Counts, per request, the updates that set it `done`, from a change stream: each must be one."""

    def __init__(self, db):
        self.counts: dict = {}
        self._stream = db[defaults.REQUESTS].watch([{"$match": {
            "operationType": "update", "updateDescription.updatedFields.status": "done"}}])
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for change in self._stream:
                key = change["documentKey"]["_id"]
                self.counts[key] = self.counts.get(key, 0) + 1
        except Exception:  # closed at the end of the test
            pass

    def close(self) -> None:
        self._stream.close()


def ask_all(db, model_id) -> list:
    ids = [f"r{n}" for n in range(COUNT)]
    db[defaults.REQUESTS].insert_many([request(i, model_id, max_new_tokens=8, checkpoint="base") for i in ids])
    return ids


def test_a_killed_daemons_requests_are_answered_by_another_well_before_their_lease(db, start_daemon,
                                                                                    tiny_model_path):
    """Every daemon here runs on this host: the second sees the first's process gone, and that alone hands its
    requests over (the first's heartbeat, every 60 s, still promises it minutes of life, so no lapse can)."""
    db[defaults.MODELS].insert_one(served_model("m", tiny_model_path))
    first = start_daemon("first", env={**FAST_BEATS, "MONGOTUNE_HEARTBEAT_S": "60"})
    wait_until(lambda: db[defaults.LISTENER].find_one({"kind": "daemon"}), 60, "the first daemon's heartbeat")
    ids = ask_all(db, "m")
    dead = claimed_by_one(db, ids)
    first.stop(signal.SIGKILL)
    answered_before = {d["_id"] for d in db[defaults.REQUESTS].find({"_id": {"$in": ids}, "status": "done"})}
    start_daemon("second", env=FAST_BEATS)
    for doc_id in ids:
        answer = wait_for(db[defaults.REQUESTS], doc_id, finished, timeout_s=120)
        assert answer["status"] == "done", answer.get("error")
        if doc_id not in answered_before:
            assert [(e["event"], e["owner"]) for e in answer["history"]] == [(PROCESS_GONE, dead)]
            assert answer["attempts"] == 2
    assert len(answered_before) < COUNT, "the first daemon answered everything before it was killed"


def test_a_paused_daemon_never_writes_an_answer_another_daemon_wrote(db, start_daemon, tiny_model_path):
    db[defaults.MODELS].insert_one(served_model("m", tiny_model_path))
    done_writes = DoneWrites(db)
    try:
        paused = start_daemon("paused", env=FAST_BEATS)
        wait_until(lambda: db[defaults.LISTENER].find_one({"kind": "daemon"}), 60, "the first daemon's heartbeat")
        ids = ask_all(db, "m")
        claimed_by_one(db, ids)
        paused.process.send_signal(signal.SIGSTOP)
        try:
            start_daemon("other", env=FAST_BEATS)
            for doc_id in ids:
                assert wait_for(db[defaults.REQUESTS], doc_id, finished, timeout_s=120)["status"] == "done"
        finally:
            paused.process.send_signal(signal.SIGCONT)
        taken = [d["_id"] for d in db[defaults.REQUESTS].find({"history.event": HEARTBEAT_STOPPED})]
        assert taken, "the other daemon took the paused one's requests over"
        # The paused daemon finishes the batch it had and finds its writes fenced out.
        wait_until(lambda: "answer(s) not written" in paused.log(), 120, "the paused daemon's late answers")
        assert paused.stop() == 0
        wait_until(lambda: all(done_writes.counts.get(i) for i in ids), 30, "every done write seen")
        assert {i: done_writes.counts[i] for i in ids} == {i: 1 for i in ids}
    finally:
        done_writes.close()
