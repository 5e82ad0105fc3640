"""A training child started ahead (`MONGOTUNE_WARM_CHILD`, on by default) once a training ends: it
imports the training libraries while the daemon waits, runs the next job, writes that job's log, and
never outlives its daemon. A daemon that has not trained (one that only serves) starts none."""

import re
import signal
from pathlib import Path

from listener.demo import load_samples
from listener.processes import wait_until
from tests import documents
from tests.conftest import finished, wait_for
from tests.test_recovery import assert_gone
from tests.test_serving import served_model
from training import defaults

WARM = {"MONGOTUNE_WARM_CHILD": "1"}


def ahead(daemon) -> list[int]:
    return [int(pid) for pid in re.findall(r"training child started ahead of the next job \(pid (\d+)\)", daemon.log())]


def started(daemon, model_id: str) -> int:
    return int(re.search(rf"training '{model_id}' run 1 started \(pid (\d+)", daemon.log()).group(1))


def trained(db, model_id: str, path: str) -> dict:
    db[defaults.MODELS].insert_one(documents.model(model_id, path))
    done = wait_for(db[defaults.MODELS], model_id, finished, timeout_s=300)
    assert done["status"] == "succeeded", done.get("error")
    return done


def test_the_child_started_ahead_runs_the_next_job_into_its_own_log(db, start_daemon, tiny_model_path, tmp_path):
    load_samples(db)
    daemon = start_daemon("warm", env=WARM)
    db[defaults.MODELS].insert_one(served_model("served", tiny_model_path))
    db[defaults.REQUESTS].insert_one(documents.request("asked", "served", checkpoint="base"))
    assert wait_for(db[defaults.REQUESTS], "asked", finished)["status"] == "done"
    assert not ahead(daemon), "a daemon that has only served starts no training child"

    trained(db, "first", tiny_model_path)
    assert started(daemon, "first") not in ahead(daemon), "the first job started its own child"
    wait_until(lambda: len(ahead(daemon)) == 1, 30, "a child started ahead once the first training ended")
    trained(db, "second", tiny_model_path)
    assert started(daemon, "second") == ahead(daemon)[0], "the next job ran in the child started after the first"
    logs = {p.name: p.read_text(errors="replace") for p in (tmp_path / "logs").glob("*.log")}
    second = next(text for name, text in logs.items() if ".second-" in name)
    assert "dataset: " in second, "the job's lines are in its own log"
    assert "dataset: " not in logs["starting.log"], "nothing of a job goes to the start-up log"

    wait_until(lambda: len(ahead(daemon)) == 2, 30, "the next child started ahead")
    assert daemon.stop(signal.SIGTERM) == 0
    assert_gone(ahead(daemon)[1], timeout=60)


def test_a_daemon_without_warm_children_starts_a_child_per_job(db, start_daemon, tiny_model_path):
    load_samples(db)
    daemon = start_daemon("cold", env={"MONGOTUNE_WARM_CHILD": "0"})
    trained(db, "only", tiny_model_path)
    assert not ahead(daemon) and started(daemon, "only")


def test_a_killed_daemon_takes_its_waiting_child_with_it(db, start_daemon, tiny_model_path):
    load_samples(db)
    daemon = start_daemon("doomed", env=WARM)
    trained(db, "once", tiny_model_path)
    wait_until(lambda: ahead(daemon), 30, "a child started ahead once the training ended")
    assert Path(f"/proc/{ahead(daemon)[0]}").exists()
    daemon.stop(signal.SIGKILL)
    assert_gone(ahead(daemon)[0], timeout=60)  # at once, or once its imports end and it finds no daemon
