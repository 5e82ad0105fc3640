"""Crashes are normal: daemons stopped or killed mid-training, and the run still finishes once."""

import os
import re
import signal
import time

from listener.demo import load_samples
from listener.processes import gone, wait_until
from tests.conftest import finished, job_log, wait_for
from training import defaults

STEPS = 80  # long enough that a kill lands mid-run (the first checkpoint is at step 10)
TRAINER = {"max_steps": STEPS, "per_device_train_batch_size": 2, "logging_steps": 1, "max_seq_length": 64,
           "save_steps": 10}
# A dead daemon's run is handed on within seconds. Short is safe on a loaded host: a live daemon starved or paused
# past its lease never reaps what it still supervises (`leases.reap`), and no test keeps two daemons alive at once.
SHORT_LEASE = {"MONGOTUNE_LEASE_S": "3", "MONGOTUNE_SCAN_S": "2"}


def long_model(path):
    return {"_id": "long", "model_name_or_path": path, "data": {"collection": "pirate_chat", "key": "messages"},
            "trainer": TRAINER}


def child_log(home) -> str:
    return job_log(home)


def assert_resumed_not_restarted(document, resumed_from: int):
    assert document["status"] == "succeeded", document.get("error")
    assert document["run"] == 1 and document["attempts"] == 2
    assert document["progress"]["total_steps"] == STEPS and document["checkpoints"][-1]["step"] == STEPS
    steps = [m["step"] for m in document["metrics"] if "loss" in m]
    assert steps.count(1) == 1, "step 1 was trained once: the second attempt resumed"
    assert min(s for s in steps if s > resumed_from) == resumed_from + 1


def test_sigterm_saves_releases_and_another_daemon_resumes(db, start_daemon, tiny_model_path, tmp_path):
    load_samples(db)
    models = db[defaults.MODELS]
    first = start_daemon("first")
    models.insert_one(long_model(tiny_model_path))
    wait_for(models, "long", lambda d: (d.get("progress") or {}).get("step", 0) >= 5, timeout_s=300)

    started = time.monotonic()
    assert first.stop(signal.SIGTERM, timeout=60) == 0
    stop_s = time.monotonic() - started
    released = models.find_one({"_id": "long"})
    assert released["status"] == "pending" and "lease" not in released
    saved = released["checkpoints"][-1]["step"]
    assert 5 <= saved < STEPS, "a checkpoint was saved at the stop"
    print(f"SIGTERM to exit: {stop_s:.1f} s, checkpoint at step {saved}")

    start_daemon("second")
    done = wait_for(models, "long", finished, timeout_s=900)
    assert_resumed_not_restarted(done, saved)
    assert f"resuming run 1 from its checkpoint at step {saved}" in child_log(tmp_path)


def child_pid(daemon) -> int:
    found = re.search(r"run 1 started \(pid (\d+)", daemon.log())
    assert found, "the daemon logs its training child's pid"
    return int(found.group(1))


def assert_gone(pid: int, timeout: float = 10) -> None:
    wait_until(lambda: gone(pid), timeout, f"the end of training child {pid}")


def test_sigkill_mid_training_resumes_from_the_last_checkpoint(db, start_daemon, tiny_model_path):
    load_samples(db)
    models = db[defaults.MODELS]
    victim = start_daemon("victim", env=SHORT_LEASE)
    models.insert_one(long_model(tiny_model_path))
    wait_for(models, "long", lambda d: len(d.get("checkpoints") or []) >= 1, timeout_s=300)
    victim.stop(signal.SIGKILL)
    assert_gone(child_pid(victim))
    killed_at = models.find_one({"_id": "long"})
    assert killed_at["status"] == "running", "nobody is told: the lease must run out"
    last_saved = killed_at["checkpoints"][-1]["step"]

    start_daemon("survivor", env=SHORT_LEASE)
    done = wait_for(models, "long", finished, timeout_s=900)
    assert_resumed_not_restarted(done, min(c["step"] for c in done["checkpoints"] if c["step"] >= last_saved))
    assert [e["event"] for e in done["history"]] == ["lease expired"]
    assert done["history"][0]["owner"].startswith("victim:")


def test_a_run_lost_after_its_last_checkpoint_trains_no_step_past_its_end(db, start_daemon, tiny_model_path, tmp_path):
    """The daemon died between the final checkpoint and the end of the run (the gate, the outcome): the next attempt
    resumes at the last step, where transformers would train and save one more step; it only finishes the run."""
    load_samples(db)
    models = db[defaults.MODELS]
    last = 4  # midway through the first epoch (90 batches of 2): a resume there is where the extra step came from
    trainer = {**TRAINER, "max_steps": last, "save_steps": 2}
    first = start_daemon("first")
    models.insert_one({**long_model(tiny_model_path), "trainer": trainer})
    trained = wait_for(models, "long", finished, timeout_s=300)
    assert trained["status"] == "succeeded" and trained["checkpoints"][-1]["step"] == last
    assert first.stop() == 0
    # As a SIGKILL after the last checkpoint was listed leaves it: running, an expired lease, no outcome yet.
    dead = {"owner": "gone:1:abc", "expires_at": trained["started_at"]}
    models.update_one({"_id": "long"}, {"$set": {"status": "running", "lease": dead},
                                        "$unset": {"finished_at": "", "runs.0.outcome": "", "runs.0.ended_at": ""}})

    start_daemon("survivor", env=SHORT_LEASE)
    done = wait_for(models, "long", lambda d: d.get("attempts") == 2 and finished(d), timeout_s=300)
    assert done["status"] == "succeeded", done.get("error")
    assert done["progress"]["step"] == done["progress"]["total_steps"] == last
    assert [c["step"] for c in done["checkpoints"]][-1] == last, "no checkpoint past the last step"
    assert max(m["step"] for m in done["metrics"]) == last, "no step trained past the last"
    assert [e["event"] for e in done["history"]] == ["lease expired"]
    log = child_log(tmp_path)
    assert f"resuming run 1 from its checkpoint at step {last}" in log
    assert f"already trained to its last step ({last})" in log


def test_sigkill_right_after_the_claim_starts_the_run_again(db, start_daemon, tiny_model_path):
    load_samples(db)
    models = db[defaults.MODELS]
    victim = start_daemon("early-victim", env=SHORT_LEASE)
    models.insert_one(long_model(tiny_model_path))
    wait_for(models, "long", lambda d: d.get("status") == "running", timeout_s=60)
    victim.stop(signal.SIGKILL)
    assert not (models.find_one({"_id": "long"}).get("progress") or {}).get("step")

    start_daemon("late-survivor", env=SHORT_LEASE)
    done = wait_for(models, "long", finished, timeout_s=900)
    assert done["status"] == "succeeded" and done["attempts"] == 2
    assert done["checkpoints"][-1]["step"] == STEPS
    listed = {c["files_id"] for c in done["checkpoints"]}
    stored = {f["_id"] for f in db[f"{defaults.CHECKPOINTS}.files"].find({"metadata.model": "long"})}
    assert listed <= stored, "every listed checkpoint is whole in GridFS"


def training_under_way(db, start_daemon, path):
    """A daemon, and the long model past its second step."""
    load_samples(db)
    daemon = start_daemon()
    db[defaults.MODELS].insert_one(long_model(path))
    wait_for(db[defaults.MODELS], "long", lambda d: (d.get("progress") or {}).get("step", 0) >= 2, timeout_s=300)
    return db[defaults.MODELS], daemon


def test_a_training_child_killed_outright_fails_with_the_signal(db, start_daemon, tiny_model_path):
    models, daemon = training_under_way(db, start_daemon, tiny_model_path)
    os.kill(child_pid(daemon), signal.SIGKILL)
    failed = wait_for(models, "long", finished, timeout_s=60)
    assert failed["status"] == "failed" and failed["error"]["type"] == "training_crashed"
    assert "SIGKILL" in failed["error"]["message"] and "out of memory" in failed["error"]["message"]
    assert daemon.process.poll() is None, "the daemon lives on"


def test_a_run_whose_daemons_keep_dying_fails_with_its_history(db, start_daemon, tiny_model_path):
    load_samples(db)
    models = db[defaults.MODELS]
    models.insert_one(long_model(tiny_model_path))
    env = {**SHORT_LEASE, "MONGOTUNE_MAX_ATTEMPTS": "2"}
    for attempt in (1, 2):
        daemon = start_daemon(f"doomed{attempt}", env=env)
        wait_for(models, "long", lambda d: d.get("status") == "running" and d.get("attempts") == attempt, timeout_s=60)
        daemon.stop(signal.SIGKILL)
    start_daemon("judge", env=env)
    failed = wait_for(models, "long", finished, timeout_s=60)
    assert failed["status"] == "failed"
    assert failed["error"]["type"] == "too_many_attempts"
    assert "doomed1" in failed["error"]["message"] and "doomed2" in failed["error"]["message"]


def test_a_child_whose_lease_passed_to_another_daemon_stops_writing(db, start_daemon, tiny_model_path):
    models, daemon = training_under_way(db, start_daemon, tiny_model_path)
    models.update_one({"_id": "long"}, {"$set": {"lease.owner": "another-daemon"}})
    assert_gone(child_pid(daemon), timeout=60)
    frozen = models.find_one({"_id": "long"})
    time.sleep(2)
    assert models.find_one({"_id": "long"})["metrics"] == frozen["metrics"], "no write after the takeover"
    assert frozen["status"] == "running" and frozen["lease"]["owner"] == "another-daemon"
    assert daemon.process.poll() is None
