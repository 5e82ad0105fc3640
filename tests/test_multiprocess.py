"""One job in two processes (torchrun, gloo on the CPU): it trains as one, stops as one and dies as one."""

import os
import re
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

from listener.demo import load_samples
from listener.processes import gone, wait_until
from tests import documents
from tests.conftest import finished, job_log, wait_for
from training import checkpoints, defaults

SHORT_LEASE = {"MONGOTUNE_LEASE_S": "3", "MONGOTUNE_SCAN_S": "2"}


def model(path, _id: str, processes: int, steps: int, **trainer) -> dict:
    return documents.model(_id, path, {**documents.QUICK, "num_processes": processes, "max_steps": steps,
                                       "learning_rate": 1e-3, "save_steps": 4, **trainer})


def epochs(document) -> dict[int, float]:
    return {m["step"]: m["epoch"] for m in document["metrics"] if "loss" in m}


def agent_pid(daemon, run: int = 1) -> int:
    """The training child, torchrun's agent, from the pid the daemon logs."""
    found = wait_until(lambda: re.findall(rf"run {run} started \(pid (\d+)", daemon.log()), 120, "the child's pid")
    return int(found[-1])


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def ranks_of(daemon) -> list[int]:
    """The two rank processes under the job's torchrun agent, once both run."""
    agent = agent_pid(daemon)
    return wait_until(lambda: (lambda c: c if len(c) == 2 else None)(children(agent)), 120, "two ranks")


def assert_gone(pids: list[int]) -> None:
    wait_until(lambda: all(gone(p) for p in pids), 30, f"the end of processes {pids}")


def training_in_two_ranks(db, start_daemon, path, _id: str, steps_done: int):
    """A long two-rank job started on a fresh daemon, once it has trained `steps_done` steps: (daemon, rank pids)."""
    load_samples(db)
    daemon = start_daemon()
    db[defaults.MODELS].insert_one(model(path, _id, 2, 100_000, save_steps=100_000))
    pids = ranks_of(daemon)
    wait_for(db[defaults.MODELS], _id, lambda d: (d.get("progress") or {}).get("step", 0) >= steps_done,
             timeout_s=300)
    return daemon, pids


def trained_adapter(db, start_daemon, document: dict, tmp_path) -> dict:
    """The last checkpoint's adapter weights of a short job that must succeed."""
    load_samples(db)
    start_daemon()
    db[defaults.MODELS].insert_one(document)
    done = wait_for(db[defaults.MODELS], document["_id"], finished, timeout_s=600)
    assert done["status"] == "succeeded", done.get("error")
    assert done["checkpoints"][-1]["step"] == document["trainer"]["max_steps"]
    return load_file(checkpoints.download(db, done["checkpoints"][-1]["files_id"], tmp_path / "c")
                     / "adapter_model.safetensors")


def test_two_processes_double_the_batch_learn_and_store_whole_checkpoints(db, start_daemon, tiny_model_path,
                                                                           tmp_path):
    load_samples(db)
    start_daemon(max_jobs=1)
    models = db[defaults.MODELS]
    models.insert_many([model(tiny_model_path, "one", 1, 8), model(tiny_model_path, "two", 2, 8)])
    one, two = (wait_for(models, _id, finished, timeout_s=600) for _id in ("one", "two"))
    assert one["status"] == two["status"] == "succeeded", (one.get("error"), two.get("error"))
    assert epochs(two)[8] == 2 * epochs(one)[8], "each step takes one batch from each of two ranks"
    losses = [m["loss"] for m in two["metrics"] if "loss" in m]
    assert sum(losses[-3:]) < sum(losses[:3]), f"the loss goes down: {losses}"
    assert [c["step"] for c in two["checkpoints"]] == [4, 8]
    folder = checkpoints.download(db, two["checkpoints"][-1]["files_id"], tmp_path / "ckpt", kind="resume")
    names = {p.name for p in folder.iterdir()}
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "adapter_model.safetensors"} <= names
    log = job_log(tmp_path)
    assert "starting 2 training processes through torchrun" in log and " rank1 " in log
    assert not list((tmp_path / "work").glob("*/launch.json")), "the URI does not stay on disk"


def test_cancel_stops_both_ranks_after_one_checkpoint(db, start_daemon, tiny_model_path):
    _, pids = training_in_two_ranks(db, start_daemon, tiny_model_path, "c", steps_done=3)
    models = db[defaults.MODELS]
    models.update_one({"_id": "c"}, {"$set": {"cancel": True}})
    done = wait_for(models, "c", finished, timeout_s=120)
    assert done["status"] == "cancelled", done.get("error")
    assert len(done["checkpoints"]) == 1 and done["checkpoints"][0]["step"] >= 3
    assert_gone(pids)


def test_sigterm_then_sigkill_of_daemons_and_the_run_still_finishes_once(db, start_daemon, tiny_model_path):
    load_samples(db)
    models = db[defaults.MODELS]
    steps, every = 24, 5  # long enough that both stops land mid-run
    models.insert_one(model(tiny_model_path, "r", 2, steps, save_steps=every))
    first = start_daemon("first", env=SHORT_LEASE)
    pids = ranks_of(first)
    wait_for(models, "r", lambda d: (d.get("progress") or {}).get("step", 0) >= 5, timeout_s=300)
    assert first.stop(signal.SIGTERM, timeout=60) == 0
    assert_gone(pids)
    stopped = models.find_one({"_id": "r"})
    assert stopped["status"] == "pending", stopped.get("error")
    saved = stopped["checkpoints"][-1]["step"]
    assert 5 <= saved < steps, "both ranks saved one checkpoint at the stop"

    victim = start_daemon("victim", env=SHORT_LEASE)
    pids = ranks_of(victim) + [agent_pid(victim)]
    wait_for(models, "r", lambda d: d["checkpoints"][-1]["step"] > saved, timeout_s=300)
    victim.stop(signal.SIGKILL)
    assert_gone(pids)
    last = models.find_one({"_id": "r"})["checkpoints"][-1]["step"]

    start_daemon("survivor", env=SHORT_LEASE)
    done = wait_for(models, "r", finished, timeout_s=900)
    assert done["status"] == "succeeded", done.get("error")
    assert done["checkpoints"][-1]["step"] == steps
    trained = [m["step"] for m in done["metrics"] if "loss" in m]
    assert trained.count(1) == 1, "never started over"
    assert min(s for s in trained if s > last) <= last + every + 1, "the survivor resumed from a late checkpoint"


def test_a_rank_killed_outright_fails_the_job_naming_it(db, start_daemon, tiny_model_path):
    daemon, pids = training_in_two_ranks(db, start_daemon, tiny_model_path, "k", steps_done=2)
    victim = int(re.search(r"rank 1 of 2: pid (\d+)", job_log(daemon.home)).group(1))
    assert victim in pids
    os.kill(victim, signal.SIGKILL)
    failed = wait_for(db[defaults.MODELS], "k", finished, timeout_s=120)
    assert failed["status"] == "failed"
    assert "rank 1 of 2 was killed by SIGKILL" in failed["error"]["message"], failed["error"]
    assert_gone(pids)
    assert daemon.process.poll() is None


# ZeRO-2 in two processes: tests/test_deepspeed.py, killed and resumed, its adapter checked whole.
def test_deepspeed_zero3_in_two_processes(db, start_daemon, tiny_model_path, tmp_path):
    pytest.importorskip("deepspeed", reason="needs the deepspeed extra")
    document = model(tiny_model_path, "ds", 2, 4, deepspeed={"zero_optimization": {"stage": 3}})
    weights = trained_adapter(db, start_daemon, document, tmp_path)
    assert weights and all(t.numel() > 0 for t in weights.values()), "ZeRO gathered the adapter before saving"


def test_a_stopped_fsdp_run_resumes_from_its_checkpoint_and_stores_the_adapter_whole(db, start_daemon,
                                                                                    tiny_model_path, tmp_path):
    load_samples(db)
    models = db[defaults.MODELS]
    models.insert_one(model(tiny_model_path, "s", 2, 40, save_steps=100_000, fsdp=True, fsdp_config={"version": 2}))
    first = start_daemon("first", env=SHORT_LEASE)
    wait_for(models, "s", lambda d: (d.get("progress") or {}).get("step", 0) >= 3, timeout_s=300)
    assert first.stop(signal.SIGTERM, timeout=60) == 0
    saved = models.find_one({"_id": "s"})["checkpoints"][-1]["step"]
    assert 3 <= saved < 40, "both ranks saved one checkpoint at the stop"
    start_daemon("second", env=SHORT_LEASE)
    done = wait_for(models, "s", finished, timeout_s=600)
    assert done["status"] == "succeeded", done.get("error")
    trained = [m["step"] for m in done["metrics"] if "loss" in m]
    assert trained.count(1) == 1 and min(s for s in trained if s > saved) == saved + 1, trained
    rates = {m["step"]: m["learning_rate"] for m in done["metrics"] if "learning_rate" in m}
    assert rates[saved + 1] < rates[saved], f"the schedule resumed where it stopped, not from its start: {rates}"
    weights = load_file(checkpoints.download(db, done["checkpoints"][-1]["files_id"], tmp_path / "c")
                        / "adapter_model.safetensors")
    assert weights and all(t.numel() > 0 for t in weights.values()), "the adapter was gathered whole"
