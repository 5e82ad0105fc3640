"""Crashes are normal: daemons stopped or killed mid-training, and the run still finishes once."""

import signal
import time

from listener import defaults
from listener.demo import load_samples
from tests.conftest import finished, wait_for

STEPS = 400
TRAINER = {"max_steps": STEPS, "per_device_train_batch_size": 2, "logging_steps": 1, "max_seq_length": 64,
           "save_steps": 40}
SHORT_LEASE = {"MONGOTUNE_LEASE_S": "3", "MONGOTUNE_SCAN_S": "2"}


def long_model(path):
    return {"_id": "long", "model_name_or_path": path, "data": {"collection": "pirate_chat", "key": "messages"},
            "trainer": TRAINER}


def child_log(home) -> str:
    return (home / "logs" / "long-run1.log").read_text()


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
    wait_for(models, "long", lambda d: (d.get("progress") or {}).get("step", 0) >= 5, timeout=120)

    started = time.monotonic()
    assert first.stop(signal.SIGTERM, timeout=60) == 0
    stop_s = time.monotonic() - started
    released = models.find_one({"_id": "long"})
    assert released["status"] == "pending" and "lease" not in released
    saved = released["checkpoints"][-1]["step"]
    assert 5 <= saved < STEPS, "a checkpoint was saved at the stop"
    print(f"SIGTERM to exit: {stop_s:.1f} s, checkpoint at step {saved}")

    start_daemon("second")
    done = wait_for(models, "long", finished, timeout=300)
    assert_resumed_not_restarted(done, saved)
    assert f"resuming run 1 from its checkpoint at step {saved}" in child_log(tmp_path)


def test_sigkill_mid_training_resumes_from_the_last_checkpoint(db, start_daemon, tiny_model_path, tmp_path):
    load_samples(db)
    models = db[defaults.MODELS]
    victim = start_daemon("victim", env=SHORT_LEASE)
    models.insert_one(long_model(tiny_model_path))
    wait_for(models, "long", lambda d: len(d.get("checkpoints") or []) >= 1, timeout=120)
    victim.stop(signal.SIGKILL)
    killed_at = models.find_one({"_id": "long"})
    assert killed_at["status"] == "running", "nobody is told: the lease must run out"
    last_saved = killed_at["checkpoints"][-1]["step"]

    start_daemon("survivor", env=SHORT_LEASE)
    done = wait_for(models, "long", finished, timeout=300)
    assert_resumed_not_restarted(done, min(c["step"] for c in done["checkpoints"] if c["step"] >= last_saved))
    assert [e["event"] for e in done["history"]] == ["lease expired"]
    assert done["history"][0]["owner"].startswith("victim:")
    assert "the daemon that started this training is gone" in child_log(tmp_path)


def test_a_run_whose_daemons_keep_dying_fails_with_its_history(db, start_daemon, tiny_model_path):
    load_samples(db)
    models = db[defaults.MODELS]
    models.insert_one(long_model(tiny_model_path))
    env = {**SHORT_LEASE, "MONGOTUNE_MAX_ATTEMPTS": "2"}
    for attempt in (1, 2):
        daemon = start_daemon(f"doomed{attempt}", env=env)
        wait_for(models, "long", lambda d: d.get("status") == "running" and d.get("attempts") == attempt, timeout=60)
        daemon.stop(signal.SIGKILL)
    start_daemon("judge", env=env)
    failed = wait_for(models, "long", finished, timeout=60)
    assert failed["status"] == "failed"
    assert failed["error"]["type"] == "too_many_attempts"
    assert "doomed1" in failed["error"]["message"] and "doomed2" in failed["error"]["message"]
