"""`training.padding`: padding-free batches only for a model that keeps packed sequences apart, with the padded loss."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import SFTTrainer

from listener.demo import load_samples
from tests.conftest import finished, wait_for
from training import defaults, padding
from training.arguments import resolved_arguments, to_config
from training.config import SFT, SpecError, TrainerSpec

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


def test_a_model_that_mixes_sequences_trains_padded_or_is_refused_when_asked():
    assert padding.decide(opt(), asked=False) is False
    with pytest.raises(SpecError) as info:
        padding.decide(opt(), asked=True)
    assert info.value.field == "trainer.padding_free"
    assert padding.decide(llama(), asked=True) is True


def test_padding_free_is_off_by_default_where_attention_masks_the_whole_row():
    model = llama()
    assert model.config._attn_implementation == "sdpa" and not padding.varlen(model)
    assert padding.decide(model, asked=False) is False


def test_the_probe_leaves_the_model_in_training_mode():
    model = llama().train()
    padding.keeps_sequences_apart(model)
    assert model.training


@pytest.mark.parametrize("given, flat", [({}, True), ({"per_device_train_batch_size": 1}, False),
                                         ({"padding_free": False}, False), ({"packing": True}, False)])
def test_padding_free_is_the_default_for_batches_of_several_and_can_be_turned_off(given, flat, tmp_path):
    resolved = resolved_arguments(TrainerSpec(**given), str(tmp_path), has_eval=False, use_cpu=True)
    assert padding.flattened_here(resolved) is flat
    assert to_config(SFT, padding.for_trl(resolved)).padding_free is False  # trl builds padded; the child flattens


@pytest.mark.parametrize("given, grouped", [({}, False), ({"padding_free": False}, True),
                                            ({"padding_free": False, "train_sampling_strategy": "random"}, False),
                                            ({"padding_free": False, "per_device_train_batch_size": 1}, False),
                                            ({"packing": True}, False)])
def test_padded_batches_of_several_are_grouped_by_length_unless_the_document_names_a_sampler(given, grouped, tmp_path):
    resolved = resolved_arguments(TrainerSpec(**given), str(tmp_path), has_eval=False, use_cpu=True)
    strategy = to_config(SFT, padding.for_trl(resolved)).train_sampling_strategy
    assert (strategy == "group_by_length") is grouped


def test_a_run_that_falls_back_to_padded_batches_gets_grouped_ones(tiny_model_path, tmp_path):
    """The model is checked after the trainer's arguments are built (flat, the default where attention is varlen):
    the trainer still gets the grouped sampler."""
    resolved = resolved_arguments(TrainerSpec(per_device_train_batch_size=2), str(tmp_path), has_eval=False,
                                  use_cpu=True)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_path),
                         args=to_config(SFT, padding.for_trl(resolved)),
                         train_dataset=Dataset.from_list([{"text": "ahoy " * n} for n in range(1, 9)]),
                         processing_class=AutoTokenizer.from_pretrained(tiny_model_path))
    resolved["padding_free"] = padding.decide(llama(), asked=False)
    assert padding.sampling(resolved, {"train_sampling_strategy": "random"}) == {}
    resolved.update(padding.sampling(resolved, {}))
    padding.arrange(trainer, resolved)
    assert not trainer.data_collator.padding_free
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)


def test_flat_batches_give_the_padded_loss_and_keep_the_truncation(tiny_model_path, tmp_path):
    """The same examples, truncated to max_length as trl does, in one row without padding: the same loss."""
    texts = [" ".join(["ahoy matey the sea be blue"] * n) for n in (1, 2, 5, 9)]
    resolved = resolved_arguments(TrainerSpec(max_length=24, per_device_train_batch_size=4), str(tmp_path),
                                  has_eval=False, use_cpu=True)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_path),
                         args=to_config(SFT, padding.for_trl(resolved)), train_dataset=Dataset.from_list(
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



def test_a_job_records_its_batches_and_its_phases_and_a_document_overrides_them(db, start_daemon, tiny_model_path):
    load_samples(db)
    start_daemon(max_jobs=2)
    trainer = {"max_steps": 3, "per_device_train_batch_size": 4, "save_steps": 3, "lora_r": 4}
    for model_id, extra in (("padded", {}), ("flat", {"padding_free": True, "train_sampling_strategy": "random"})):
        db[defaults.MODELS].insert_one({"_id": model_id, "model_name_or_path": tiny_model_path,
                                        "data": {"collection": "pirate_chat", "key": "messages"},
                                        "trainer": {**trainer, **extra}})
    runs = {}
    for model_id in ("padded", "flat"):
        done = wait_for(db[defaults.MODELS], model_id, finished, timeout_s=300)
        assert done["status"] == "succeeded", done.get("error")
        runs[model_id] = done["runs"][-1]["arguments"], done["runs"][-1]["phases"]
    (padded, _), (flat, phases) = runs["padded"], runs["flat"]
    assert padded["defaults"]["padding_free"] is False  # sdpa: flat rows would cost a mask over the whole row
    assert padded["defaults"]["train_sampling_strategy"] == "group_by_length"
    assert (flat["given"]["padding_free"], flat["given"]["train_sampling_strategy"]) == (True, "random")
    assert not {"padding_free", "train_sampling_strategy"} & set(flat["defaults"])
    assert set(phases) == {"start", "check", "data", "model", "trainer", "train", "end", "progress_writes",
                           "checkpoint_uploads"}
    assert all(seconds >= 0 for seconds in phases.values()) and phases["train"] >= phases["checkpoint_uploads"]
