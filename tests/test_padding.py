"""`training.padding`: padding-free batches only for a model that keeps packed sequences apart, with the padded loss."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM
from trl import SFTTrainer

from listener.demo import load_samples
from tests.conftest import finished, wait_for
from training import defaults, padding
from training.arguments import resolved_arguments, to_sft_config
from training.config import SpecError, TrainerSpec

SIZES = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 400}


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(intermediate_size=128, num_key_value_heads=2, **SIZES))


def opt():
    """OPT derives positions from the attention mask, so packed sequences run on as one."""
    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(ffn_dim=128, word_embed_proj_dim=64, **SIZES))


def test_llama_keeps_packed_sequences_apart_and_opt_does_not():
    assert padding.keeps_sequences_apart(llama())
    assert not padding.keeps_sequences_apart(opt())


def test_a_model_that_mixes_sequences_trains_padded_or_is_refused_when_asked(caplog):
    assert padding.decide(opt(), asked=False) is False
    assert "padding-free batches off" in caplog.text
    with pytest.raises(SpecError) as info:
        padding.decide(opt(), asked=True)
    assert info.value.field == "trainer.padding_free"
    assert padding.decide(llama(), asked=True) is True


def test_the_probe_leaves_the_model_in_training_mode():
    model = llama().train()
    padding.keeps_sequences_apart(model)
    assert model.training


@pytest.mark.parametrize("given, flat", [({}, True), ({"per_device_train_batch_size": 1}, False),
                                         ({"padding_free": False}, False), ({"packing": True}, False)])
def test_padding_free_is_the_default_for_batches_of_several_and_can_be_turned_off(given, flat, tmp_path):
    resolved = resolved_arguments(TrainerSpec(**given), str(tmp_path), has_eval=False, use_cpu=True)
    assert padding.flattened_here(resolved) is flat
    assert to_sft_config(padding.for_trl(resolved)).padding_free is False  # trl builds padded; the child flattens


def test_flat_batches_give_the_padded_loss_and_keep_the_truncation(tiny_model_path, tmp_path):
    """The same examples, truncated to max_length as trl does, in one row without padding: the same loss."""
    texts = [" ".join(["ahoy matey the sea be blue"] * n) for n in (1, 2, 5, 9)]
    resolved = resolved_arguments(TrainerSpec(max_length=24, per_device_train_batch_size=4), str(tmp_path),
                                  has_eval=False, use_cpu=True)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_path),
                         args=to_sft_config(padding.for_trl(resolved)), train_dataset=Dataset.from_list(
                             [{"text": t} for t in texts]),
                         processing_class=AutoTokenizer.from_pretrained(tiny_model_path))
    examples = [{"input_ids": row["input_ids"]} for row in trainer.train_dataset]
    lengths = [len(e["input_ids"]) for e in examples]
    assert max(lengths) == 24 and min(lengths) < 24
    padded = trainer.data_collator(examples)
    padding.flatten_batches(trainer)
    flat = trainer.data_collator(examples)
    assert padded["input_ids"].shape == (4, 24) and flat["input_ids"].shape == (1, sum(lengths))
    model = trainer.model.eval()
    with torch.no_grad():
        losses = [trainer.compute_loss(model, dict(batch)).item() for batch in (padded, flat)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)



def test_a_job_records_its_batches_and_its_phases_and_a_document_turns_padding_free_off(db, start_daemon,
                                                                                      tiny_model_path):
    load_samples(db)
    start_daemon(max_jobs=2)
    trainer = {"max_steps": 3, "per_device_train_batch_size": 4, "save_steps": 3, "lora_r": 4}
    for model_id, extra in (("flat", {}), ("padded", {"padding_free": False})):
        db[defaults.MODELS].insert_one({"_id": model_id, "model_name_or_path": tiny_model_path,
                                        "data": {"collection": "pirate_chat", "key": "messages"},
                                        "trainer": {**trainer, **extra}})
    runs = {}
    for model_id in ("flat", "padded"):
        done = wait_for(db[defaults.MODELS], model_id, finished, timeout_s=300)
        assert done["status"] == "succeeded", done.get("error")
        runs[model_id] = done["runs"][-1]
    assert runs["flat"]["arguments"]["defaults"]["padding_free"] is True
    assert runs["padded"]["arguments"]["given"]["padding_free"] is False
    assert "padding_free" not in runs["padded"]["arguments"]["defaults"]
    phases = runs["flat"]["phases"]
    assert set(phases) == {"start", "check", "data", "model", "trainer", "train", "end", "progress_writes",
                           "checkpoint_uploads"}
    assert all(seconds >= 0 for seconds in phases.values()) and phases["train"] >= phases["checkpoint_uploads"]
