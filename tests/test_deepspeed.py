"""DeepSpeed ZeRO from a document's `trainer.deepspeed` object, outside any launcher (one process)."""

import pytest

from safetensors.torch import load_file

from listener.demo import load_samples
from tests.conftest import finished, wait_for
from training import checkpoints, defaults

pytest.importorskip("deepspeed", reason="needs the deepspeed extra: DS_BUILD_OPS=0 pip install 'mongotune[deepspeed]'")


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_checkpoints_and_serves(db, start_daemon, tiny_model_path, tmp_path, stage):
    load_samples(db)
    start_daemon()
    db[defaults.MODELS].insert_one({
        "_id": "ds", "model_name_or_path": tiny_model_path, "data": {"collection": "pirate_chat", "key": "messages"},
        "trainer": {"deepspeed": {"zero_optimization": {"stage": stage}}, "max_steps": 3,
                    "per_device_train_batch_size": 2, "max_seq_length": 64, "learning_rate": 1e-3},
    })
    model = wait_for(db[defaults.MODELS], "ds", finished, timeout_s=300)
    assert model["status"] == "succeeded", model.get("error")
    assert model["checkpoints"][-1]["step"] == 3
    folder = checkpoints.download(db, model["checkpoints"][-1]["files_id"], tmp_path / "ckpt")
    weights = load_file(folder / "adapter_model.safetensors")
    assert weights and all(t.numel() > 0 for t in weights.values()), "ZeRO gathered the adapter before saving"
    db[defaults.REQUESTS].insert_one({"_id": "r", "model": "ds", "input": "ahoy", "params": {"max_new_tokens": 3}})
    assert wait_for(db[defaults.REQUESTS], "r", finished, timeout_s=120)["status"] == "done"
