"""trl's options that change what a step trains on, end to end: packing, and loss on the assistant's turns only.

The trainings share the module's daemon and database, each with its own model ids.
"""

import math
import shutil

import pytest

from tests.conftest import finished, wait_for
from training import defaults, packing

EPOCH = {"num_train_epochs": 1, "per_device_train_batch_size": 4, "max_length": 256, "logging_steps": 1,
         "lora_r": 4, "lora_alpha": 8}
# The tiny model's chat template with the assistant's turns marked, as assistant_only_loss needs.
MARKED = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['role'] == 'assistant' %}"
          "{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ message['content'] }}"
          "<|im_end|>{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def trained(db, model_id) -> dict:
    done = wait_for(db[defaults.MODELS], model_id, finished, timeout_s=300)
    assert done["status"] == "succeeded", done.get("error")
    return done


def losses(document: dict) -> list[float]:
    return [m["loss"] for m in document["metrics"] if "loss" in m]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packing_is_allowed_only_for_a_model_that_keeps_packed_examples_apart(tiny_model_path, attention):
    from transformers import AutoModelForCausalLM

    packing.check(AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation=attention))
    assert packing.arguments({"packing": True}) == {"packing_strategy": "bfd"}
    assert packing.arguments({"packing": False}) == {}


def test_packing_trains_fewer_fuller_rows_and_the_run_records_it(module_samples, module_daemon, tiny_model_path):
    db = module_samples
    data = {"collection": "pirate_text", "key": "text"}
    db[defaults.MODELS].insert_many([
        {"_id": "unpacked", "model_name_or_path": tiny_model_path, "data": data, "trainer": EPOCH},
        {"_id": "packed", "model_name_or_path": tiny_model_path, "data": data, "trainer": {**EPOCH, "packing": True}},
    ])
    unpacked, packed = trained(db, "unpacked"), trained(db, "packed")
    steps = unpacked["progress"]["total_steps"], packed["progress"]["total_steps"]
    assert 1 <= steps[1] < steps[0] / 2, f"steps per epoch, unpacked and packed: {steps}"
    assert len(losses(packed)) == steps[1] and all(math.isfinite(loss) for loss in losses(packed))
    arguments = packed["runs"][0]["arguments"]
    assert arguments["given"]["packing"] is True and arguments["defaults"]["packing_strategy"] == "bfd"
    assert "packing_strategy" not in unpacked["runs"][0]["arguments"]["defaults"]
    assert packed["checkpoints"][-1]["metrics"]["eval_loss"] > 0


def test_assistant_only_loss_trains_on_the_assistants_turns(module_samples, module_daemon, tiny_model_path,
                                                            model_root):
    from transformers import AutoTokenizer

    marked = model_root / "tiny-marked"
    if not marked.exists():
        shutil.copytree(tiny_model_path, marked)
        tokenizer = AutoTokenizer.from_pretrained(marked)
        tokenizer.chat_template = MARKED
        tokenizer.save_pretrained(marked)
    db = module_samples
    trainer = {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1, "max_length": 128, "lora_r": 4}
    for model_id, only in (("whole", False), ("assistant", True)):
        db[defaults.MODELS].insert_one({"_id": model_id, "model_name_or_path": str(marked),
                                        "data": {"collection": "pirate_chat", "key": "messages"},
                                        "trainer": {**trainer, "assistant_only_loss": only}})
    whole, assistant = trained(db, "whole"), trained(db, "assistant")
    assert assistant["runs"][0]["arguments"]["given"]["assistant_only_loss"] is True
    assert len(losses(assistant)) == 2 and all(math.isfinite(loss) for loss in losses(assistant))
    # Same model, data and seed: only which tokens count differs, so the first step's loss does.
    assert losses(assistant)[0] != pytest.approx(losses(whole)[0], rel=1e-3)
