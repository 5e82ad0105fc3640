"""QLoRA through bitsandbytes: the 4-bit and 8-bit paths train and serve (on a CPU here, a GPU for users)."""

import pytest

from listener.demo import load_samples
from tests.conftest import finished, wait_for
from training import defaults

pytest.importorskip("bitsandbytes", reason="QLoRA needs the qlora extra: pip install 'mongotune[qlora]'")


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_base_trains_an_adapter_and_serves(db, start_daemon, tiny_model_path, bits):
    load_samples(db)
    start_daemon()
    db[defaults.MODELS].insert_one({
        "_id": "q", "model_name_or_path": tiny_model_path, "data": {"collection": "pirate_chat", "key": "messages"},
        "trainer": {"bits": bits, "max_steps": 3, "per_device_train_batch_size": 2, "max_seq_length": 64,
                    "learning_rate": 1e-3},
    })
    model = wait_for(db[defaults.MODELS], "q", finished, timeout_s=300)
    assert model["status"] == "succeeded", model.get("error")
    assert model["checkpoints"][-1]["step"] == 3
    db[defaults.REQUESTS].insert_one({"_id": "r", "model": "q", "input": "ahoy", "params": {"max_new_tokens": 3}})
    answer = wait_for(db[defaults.REQUESTS], "r", finished, timeout_s=120)
    assert answer["status"] == "done", answer.get("error")
    assert answer["checkpoint_used"] == {"run": 1, "step": 3}


@pytest.mark.parametrize(("bits", "layer"), [(4, "Linear4bit"), (8, "Linear8bitLt")])
def test_bits_load_the_base_model_quantized(tiny_model_path, limits, bits, layer):
    from training.config import parse_model
    from training.models import load_model

    spec = parse_model({"_id": 1, "model_name_or_path": tiny_model_path, "data": {"collection": "c"},
                        "trainer": {"bits": bits}}, limits)
    assert type(load_model(spec, limits).model.layers[0].self_attn.q_proj).__name__ == layer
