"""DeepSpeed ZeRO from a document's `trainer.deepspeed` object, outside any launcher (one process) and in two
ranks: it trains, serves, and resumes from its last stored checkpoint with its states read weights-only."""

import signal

import pytest
import torch
from safetensors.torch import load_file

from listener.demo import load_samples
from tests import documents
from tests.conftest import finished, job_log, wait_for
from tests.test_hostile_checkpoints import Exploit
from tests.test_recovery import SHORT_LEASE, assert_gone, child_pid
from training import checkpoints, defaults

pytest.importorskip("deepspeed", reason="needs the deepspeed extra: DS_BUILD_OPS=0 pip install 'mongotune[deepspeed]'")


def test_deepspeed_reads_its_states_weights_only(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    marker, engine = tmp_path / "pwned", TorchCheckpointEngine()
    torch.save({"loss_scaler": LossScaler(4), "fp16": DynamicLossScaler(2**16, 1000, 1, 2, False),
                "zero_stage": ZeroStageEnum.gradients,
                "address": fragment_address(numel=3, start=1), "state": torch.ones(3)}, tmp_path / "states.pt")
    torch.save(Exploit(marker), tmp_path / "crafted.pt")
    with checkpoints.weights_only_loads():
        states = engine.load(str(tmp_path / "states.pt"))
    with pytest.raises(checkpoints.CheckpointRefused, match="more than tensors and numbers"):
        with checkpoints.weights_only_loads():
            engine.load(str(tmp_path / "crafted.pt"))
    assert not marker.exists()
    assert states["loss_scaler"].cur_scale == 4 and states["zero_stage"] == 2 and states["address"].numel == 3
    assert states["fp16"].cur_scale == 2**16 and states["fp16"].dtype == torch.half
    engine.load(str(tmp_path / "crafted.pt"))
    assert marker.exists(), "outside weights_only_loads DeepSpeed's own load runs what the file says"


STEPS = 30


def killed_after_its_first_checkpoint(db, start_daemon, path, stage: int, processes: int = 1) -> int:
    """A long ZeRO job whose daemon was SIGKILLed once a checkpoint was stored; the last step listed."""
    load_samples(db)
    models = db[defaults.MODELS]
    trainer = {**documents.QUICK, "max_steps": STEPS, "save_steps": 5, "learning_rate": 1e-3,
               "num_processes": processes, "deepspeed": {"zero_optimization": {"stage": stage}}}
    victim = start_daemon("victim", env=SHORT_LEASE)
    models.insert_one(documents.model("ds", path, trainer))
    wait_for(models, "ds", lambda d: len(d.get("checkpoints") or []) >= 1, timeout_s=600)
    victim.stop(signal.SIGKILL)
    assert_gone(child_pid(victim), timeout=60)
    saved = models.find_one({"_id": "ds"})["checkpoints"][-1]["step"]
    assert saved < STEPS, "killed mid-training"
    return saved


# ZeRO-2 alone: the crafted-state test below; ZeRO-3 in two processes: tests/test_multiprocess.py.
@pytest.mark.parametrize("stage, processes", [(3, 1), (2, 2)])
def test_a_killed_daemons_deepspeed_run_resumes_from_its_last_checkpoint_and_serves(db, start_daemon, tiny_model_path,
                                                                                     tmp_path, stage, processes):
    saved = killed_after_its_first_checkpoint(db, start_daemon, tiny_model_path, stage, processes)
    start_daemon("survivor", env=SHORT_LEASE)
    done = wait_for(db[defaults.MODELS], "ds", finished, timeout_s=900)
    assert done["status"] == "succeeded", done.get("error")
    assert done["attempts"] == 2 and done["checkpoints"][-1]["step"] == STEPS
    resumed = [e["step"] for e in done["events"] if e["kind"] == "resumed"]
    assert len(resumed) == 1 and resumed[0] >= saved > 0, done["events"]
    trained = [m["step"] for m in done["metrics"] if "loss" in m]
    assert trained.count(1) == 1, "never started over"
    assert min(s for s in trained if s > resumed[0]) == resumed[0] + 1
    train_s = done["runs"][-1].get("phases", {}).get("train")
    print(f"ZeRO-{stage} in {processes} process(es): killed after the checkpoint at step {saved}, resumed at step "
          f"{resumed[0]}" + (f", {train_s / (STEPS - resumed[0]):.2f} s/step after the resume" if train_s else ""))
    folder = checkpoints.download(db, done["checkpoints"][-1]["files_id"], tmp_path / "ckpt")
    weights = load_file(folder / "adapter_model.safetensors")
    assert weights and all(t.numel() > 0 for t in weights.values()), "ZeRO gathered the adapter before saving"
    assert "shm_comm" not in job_log(tmp_path), "no C++ kernel built on a CPU host (`ranks.no_cpu_kernel_builds`)"
    db[defaults.REQUESTS].insert_one({"_id": "r", "model": "ds", "input": "ahoy", "params": {"max_new_tokens": 3}})
    assert wait_for(db[defaults.REQUESTS], "r", finished, timeout_s=120)["status"] == "done"


def test_zero_3_full_fine_tuning_stores_its_weights_whole_and_serves(db, start_daemon, tiny_model_path, tmp_path):
    """DeepSpeed leaves ZeRO-3's weights in its own shards unless told to gather them at each save: the listener's
    default gathers them, so the checkpoint holds safetensors, checked finite, that serve."""
    load_samples(db)
    models = db[defaults.MODELS]
    start_daemon()
    models.insert_one(documents.model("full", tiny_model_path, {**documents.QUICK, "use_lora": False,
                                                                "deepspeed": {"zero_optimization": {"stage": 3}}}))
    done = wait_for(models, "full", finished, timeout_s=600)
    assert done["status"] == "succeeded", done.get("error")
    weights = load_file(checkpoints.download(db, done["checkpoints"][-1]["files_id"], tmp_path / "c") / "model.safetensors")
    assert weights and all(t.numel() > 0 for t in weights.values()), "ZeRO gathered the weights before saving"
    db[defaults.REQUESTS].insert_one(documents.request("r", "full"))
    assert wait_for(db[defaults.REQUESTS], "r", finished, timeout_s=120)["status"] == "done"


def test_a_crafted_deepspeed_state_fails_the_resume_without_running(db, start_daemon, tiny_model_path, tmp_path):
    """Whoever may insert into the bucket stores a newer checkpoint of the run, its optimizer state a pickle
    that runs a command: the survivor resumes from it, and DeepSpeed's forced weights-only load refuses it."""
    saved = killed_after_its_first_checkpoint(db, start_daemon, tiny_model_path, stage=2)
    last = checkpoints.latest(db, "ds", 1)
    crafted = checkpoints.download(db, last.files_id, tmp_path / "crafted", kind="resume")
    marker = tmp_path / "pwned"
    for state in crafted.glob("global_step*/*optim_states.pt"):
        torch.save(Exploit(marker), state)
    checkpoints.upload(db, crafted, model_id="ds", run=1, step=STEPS - 1)
    start_daemon("survivor", env=SHORT_LEASE)
    failed = wait_for(db[defaults.MODELS], "ds", finished, timeout_s=900)
    assert failed["status"] == "failed" and "holds more than tensors and numbers" in failed["error"]["message"], \
        failed["error"]
    assert not marker.exists() and saved < STEPS - 1
