"""`training.arguments`: old names translated, unknown or reserved names refused, SFTConfig built."""

import pytest

from training.arguments import IGNORED, RENAMED, RESERVED, lora_config, sft_config, translate
from training.config import SpecError, TrainerSpec


def refused(arguments: dict) -> SpecError:
    with pytest.raises(SpecError) as info:
        translate(arguments)
    return info.value


@pytest.mark.parametrize("old, new, value", [
    ("evaluation_strategy", "eval_strategy", "steps"),
    ("max_seq_length", "max_length", 128),
    ("no_cuda", "use_cpu", True),
    ("gradient_checkpointing", "activation_checkpointing", True),
    ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs", {"use_reentrant": False}),
])
def test_renamed_arguments_translate(old, new, value):
    assert translate({old: value}) == {new: value}


def test_translate_keeps_current_names_and_drops_overwrite_output_dir():
    arguments = {"num_train_epochs": 3, "learning_rate": 2e-4, "per_device_train_batch_size": 2,
                 "overwrite_output_dir": True, "eval_steps": 10, "lr_scheduler_type": "cosine"}
    out = translate(arguments)
    assert out == {"num_train_epochs": 3, "learning_rate": 2e-4, "per_device_train_batch_size": 2,
                   "eval_steps": 10, "lr_scheduler_type": "cosine"}
    assert "overwrite_output_dir" in IGNORED


def test_ints_are_accepted_where_floats_are_expected():
    assert translate({"learning_rate": 1, "num_train_epochs": 2}) == {"learning_rate": 1, "num_train_epochs": 2}


@pytest.mark.parametrize("name", ["epochs", "learning_rte", "lora_rank", "use_flash"])
def test_unknown_name_is_an_error_naming_it(name):
    error = refused({"num_train_epochs": 1, name: 1})
    assert error.field == f"trainer.{name}"
    assert "unknown training argument" in error.message


@pytest.mark.parametrize("name", sorted(RESERVED))
def test_reserved_names_refused(name):
    error = refused({name: "x"})
    assert error.field == f"trainer.{name}"
    assert "cannot be set in a document" in error.message


def test_reserved_list_covers_credentials_and_destinations():
    assert {"output_dir", "report_to", "hub_token", "push_to_hub", "logging_dir"} <= set(RESERVED)


@pytest.mark.parametrize("arguments, field", [
    ({"num_train_epochs": "three"}, "trainer.num_train_epochs"),
    ({"learning_rate": "1e-4"}, "trainer.learning_rate"),
    ({"per_device_train_batch_size": 1.5}, "trainer.per_device_train_batch_size"),
    ({"per_device_train_batch_size": True}, "trainer.per_device_train_batch_size"),
    ({"bf16": 1}, "trainer.bf16"),
    ({"max_seq_length": "512"}, "trainer.max_seq_length"),
    ({"no_cuda": "yes"}, "trainer.no_cuda"),
    ({"save_steps": [100]}, "trainer.save_steps"),
])
def test_wrong_value_types_refused_with_the_field(arguments, field):
    error = refused(arguments)
    assert error.field == field
    assert "expected" in error.message


@pytest.mark.parametrize("arguments", [
    {"max_seq_length": 128, "max_length": 64},
    {"max_length": 64, "max_seq_length": 128},
    {"evaluation_strategy": "steps", "eval_strategy": "no"},
    {"gradient_checkpointing": True, "activation_checkpointing": False},
    {"no_cuda": True, "use_cpu": True},
])
def test_same_argument_under_old_and_new_names_refused(arguments):
    error = refused(arguments)
    assert error.field in {f"trainer.{name}" for name in arguments}
    assert "given twice" in error.message


def test_given_twice_message_names_both_spellings():
    error = refused({"max_seq_length": 128, "max_length": 64})
    assert "max_seq_length" in error.message and "max_length" in error.message


def test_renames_point_at_real_fields():
    # every translation target is accepted on its own
    for new in RENAMED.values():
        value = {"eval_strategy": "no", "max_length": 8, "use_cpu": True, "activation_checkpointing": False,
                 "activation_checkpointing_kwargs": {}}[new]
        assert translate({new: value}) == {new: value}


# --- sft_config / lora_config --------------------------------------------------------------------

def test_sft_config_cpu_defaults(tmp_path):
    config = sft_config(TrainerSpec(), str(tmp_path), has_eval=False, use_cpu=True)
    assert config.bf16 is False
    assert config.fp16 is False
    assert config.use_cpu is True
    assert config.eval_strategy == "no"
    assert config.output_dir == str(tmp_path)
    assert config.max_length == 512
    assert config.report_to in ([], "none", ["none"])
    assert config.activation_checkpointing is False


def test_sft_config_with_eval_evaluates(tmp_path):
    config = sft_config(TrainerSpec(eval_steps=5), str(tmp_path), has_eval=True, use_cpu=True)
    assert config.eval_strategy == "steps"
    assert config.eval_steps == 5


def test_sft_config_without_eval_ignores_user_eval_strategy(tmp_path):
    spec = TrainerSpec(evaluation_strategy="steps", eval_steps=5)
    assert sft_config(spec, str(tmp_path), has_eval=False, use_cpu=True).eval_strategy == "no"


def test_user_values_win_over_defaults(tmp_path):
    spec = TrainerSpec(max_seq_length=64, logging_steps=3, num_train_epochs=2, learning_rate=1e-3,
                       save_steps=7, overwrite_output_dir=True)
    config = sft_config(spec, str(tmp_path), has_eval=False, use_cpu=True)
    assert config.max_length == 64
    assert config.logging_steps == 3
    assert config.num_train_epochs == 2
    assert config.learning_rate == 1e-3
    assert config.save_steps == 7
    assert config.output_dir == str(tmp_path)


def test_training_kwargs_are_merged(tmp_path):
    spec = TrainerSpec(training_kwargs={"dataset_text_field": "body", "packing": True})
    config = sft_config(spec, str(tmp_path), has_eval=False, use_cpu=True)
    assert config.dataset_text_field == "body"
    assert config.packing is True


def test_training_kwargs_are_checked_like_the_rest(tmp_path):
    spec = TrainerSpec(training_kwargs={"output_dir": "/etc"})
    with pytest.raises(SpecError) as info:
        sft_config(spec, str(tmp_path), has_eval=False, use_cpu=True)
    assert info.value.field == "trainer.output_dir"


def test_unknown_name_refused_by_sft_config(tmp_path):
    with pytest.raises(SpecError) as info:
        sft_config(TrainerSpec(epochs=3), str(tmp_path), has_eval=False, use_cpu=True)
    assert info.value.field == "trainer.epochs"


def test_arguments_that_do_not_fit_together_name_the_trainer(tmp_path):
    with pytest.raises(SpecError) as info:
        sft_config(TrainerSpec(eval_strategy="sometimes"), str(tmp_path), has_eval=True, use_cpu=True)
    assert info.value.field.startswith("trainer")


def test_lora_config_none_without_lora():
    assert lora_config(TrainerSpec(use_lora=False)) is None


def test_lora_config_from_the_spec():
    config = lora_config(TrainerSpec(lora_r=4, lora_alpha=8, lora_dropout=0.1, lora_target_modules=["q_proj"]))
    assert config.r == 4
    assert config.lora_alpha == 8
    assert config.lora_dropout == 0.1
    assert set(config.target_modules) == {"q_proj"}
    assert config.task_type == "CAUSAL_LM"
