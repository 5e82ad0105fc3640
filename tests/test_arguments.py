"""`training.arguments` and the trainer allowlist: old names translated, anything unlisted refused."""

import dataclasses

import pytest
from trl import SFTConfig

from training.arguments import RENAMED, lora_config, sft_config, translate
from training.config import IGNORED, METHOD_ONLY, NOT_FROM_DOCUMENTS, SpecError, TrainerSpec, TrainingArgs, parse_model


def trainer_error(trainer: dict) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_model({"_id": "m", "model_name_or_path": "org/model", "data": {"collection": "c"}, "trainer": trainer})
    return info.value


@pytest.mark.parametrize("old, new, value", [
    ("evaluation_strategy", "eval_strategy", "steps"),
    ("max_seq_length", "max_length", 128),
    ("no_cuda", "use_cpu", True),
    ("gradient_checkpointing", "activation_checkpointing", True),
    ("warmup_ratio", "warmup_steps", 0.1),
])
def test_renamed_arguments_translate(old, new, value):
    assert translate({old: value}) == {new: value}


def test_translate_keeps_current_names_and_drops_the_ignored_ones():
    arguments = {"num_train_epochs": 3, "learning_rate": 2e-4, "per_device_train_batch_size": 2,
                 "overwrite_output_dir": True, "output_dir": "out", "eval_steps": 10, "lr_scheduler_type": "cosine"}
    assert translate(arguments) == {"num_train_epochs": 3, "learning_rate": 2e-4, "per_device_train_batch_size": 2,
                                    "eval_steps": 10, "lr_scheduler_type": "cosine"}
    assert {"overwrite_output_dir", "output_dir"} <= set(IGNORED)


def test_every_allowed_name_is_a_current_sft_config_field_or_a_translated_one():
    """The preference methods' own names are checked against their configurations in test_preference."""
    fields = {f.name for f in dataclasses.fields(SFTConfig) if f.init}
    for name in TrainingArgs.model_fields:
        if "sft" in METHOD_ONLY.get(name, ("sft",)):
            assert name in fields or name in RENAMED or name in IGNORED, name
    for new in RENAMED.values():
        assert new in fields


@pytest.mark.parametrize("name", ["epochs", "learning_rte", "lora_rank", "use_flash", "torch_compile",
                                  "deepspeed_config", "disable_tqdm", "lr_scheduler_kwargs", "fsdp_config"])
def test_an_unlisted_name_is_refused_naming_it(name):
    error = trainer_error({"num_train_epochs": 1, name: 1})
    assert error.field == f"trainer.{name}"


@pytest.mark.parametrize("name", ["push_to_hub", "hub_token", "report_to", "logging_dir", "resume_from_checkpoint"])
def test_names_that_never_belong_in_a_document_say_why(name):
    error = trainer_error({name: "x"})
    assert error.field == f"trainer.{name}" and error.message == NOT_FROM_DOCUMENTS[name]


def test_a_misspelt_name_gets_a_suggestion():
    assert "did you mean 'max_steps'" in trainer_error({"max_step": 5}).message


@pytest.mark.parametrize("arguments, field", [
    ({"num_train_epochs": "three"}, "trainer.num_train_epochs"),
    ({"num_train_epochs": 0}, "trainer.num_train_epochs"),
    ({"num_train_epochs": -1}, "trainer.num_train_epochs"),
    ({"max_steps": 0}, "trainer.max_steps"),
    ({"learning_rate": "1e-4"}, "trainer.learning_rate"),
    ({"learning_rate": 0}, "trainer.learning_rate"),
    ({"learning_rate": -1e-4}, "trainer.learning_rate"),
    ({"per_device_train_batch_size": 1.5}, "trainer.per_device_train_batch_size"),
    ({"per_device_train_batch_size": True}, "trainer.per_device_train_batch_size"),
    ({"per_device_train_batch_size": 0}, "trainer.per_device_train_batch_size"),
    ({"bf16": 1}, "trainer.bf16"),
    ({"max_seq_length": "512"}, "trainer.max_seq_length"),
    ({"no_cuda": "yes"}, "trainer.no_cuda"),
    ({"save_steps": [100]}, "trainer.save_steps"),
    ({"save_steps": 0}, "trainer.save_steps"),
    ({"lr_scheduler_type": "made_up"}, "trainer.lr_scheduler_type"),
    ({"optim": "galore_adamw"}, "trainer.optim"),
    ({"dataset_text_field": "a b"}, "trainer.dataset_text_field"),
    ({"training_kwargs": {"output_dirr": "x"}}, "trainer.training_kwargs.output_dirr"),
])
def test_wrong_values_refused_with_the_field(arguments, field):
    assert trainer_error(arguments).field == field


def test_zero_3_gathers_the_weights_at_each_save_unless_the_document_says_otherwise():
    from training.arguments import deepspeed_config
    from training.config import DeepSpeedSpec

    gather = "stage3_gather_16bit_weights_on_model_save"
    assert deepspeed_config(DeepSpeedSpec(zero_optimization={"stage": 3}))["zero_optimization"][gather] is True
    assert gather not in deepspeed_config(DeepSpeedSpec(zero_optimization={"stage": 2}))["zero_optimization"]
    given = DeepSpeedSpec(zero_optimization={"stage": 3, gather: False})
    assert deepspeed_config(given)["zero_optimization"][gather] is False


def test_a_zero_3_run_that_could_store_no_checkpoint_is_refused_before_it_trains():
    """Full fine-tuning under ZeRO-3 with gathering off would train up to its first save and only then fail (its
    checkpoint holds no weights to store): the parse refuses it, naming the setting; with LoRA it stays allowed."""
    zero3 = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}}
    error = trainer_error({"use_lora": False, "deepspeed": zero3})
    assert error.field == "trainer.deepspeed.zero_optimization.stage3_gather_16bit_weights_on_model_save", error
    assert parse_model({"_id": "m", "model_name_or_path": "org/model", "data": {"collection": "c"},
                        "trainer": {"deepspeed": zero3}}).trainer.deepspeed is not None


@pytest.mark.parametrize("deepspeed, field", [
    ({"zero_optimization": {"stage": 4}}, "trainer.deepspeed.zero_optimization.stage"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/tmp"}}},
     "trainer.deepspeed.zero_optimization.offload_param.device"),
    ({"flops_profiler": {"enabled": True, "output_file": "/tmp/x"}}, "trainer.deepspeed.flops_profiler"),
    ({"tensorboard": {"enabled": True, "output_path": "/tmp"}}, "trainer.deepspeed.tensorboard"),
    ({"csv_monitor": {"enabled": True, "output_path": "/tmp"}}, "trainer.deepspeed.csv_monitor"),
    ({"comms_logger": {"enabled": True}}, "trainer.deepspeed.comms_logger"),
    ({"zero_optimization": {"stage": 2, "nvme_path": "/tmp"}}, "trainer.deepspeed.zero_optimization.nvme_path"),
])
def test_deepspeed_keys_are_an_allowlist_without_paths(deepspeed, field):
    assert trainer_error({"deepspeed": deepspeed}).field == field


@pytest.mark.parametrize("arguments", [
    {"max_seq_length": 128, "max_length": 64},
    {"max_length": 64, "max_seq_length": 128},
    {"evaluation_strategy": "steps", "eval_strategy": "no"},
    {"gradient_checkpointing": True, "activation_checkpointing": False},
    {"no_cuda": True, "use_cpu": True},
])
def test_same_argument_under_old_and_new_names_refused(arguments):
    with pytest.raises(SpecError) as info:
        translate(arguments)
    assert info.value.field in {f"trainer.{name}" for name in arguments}
    assert "given twice" in info.value.message


def test_given_twice_message_names_both_spellings():
    with pytest.raises(SpecError) as info:
        translate({"max_seq_length": 128, "max_length": 64})
    assert "max_seq_length" in info.value.message and "max_length" in info.value.message


def test_ignored_arguments_leave_a_warning():
    spec = parse_model({"_id": "m", "model_name_or_path": "org/model", "data": {"collection": "c"},
                        "trainer": {"output_dir": "/etc", "overwrite_output_dir": True, "num_train_epochs": 1}})
    warnings = spec.warnings()
    assert len(warnings) == 2 and all(w.startswith("trainer.") and "ignored" in w for w in warnings)


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


def test_training_kwargs_output_dir_never_reaches_the_config(tmp_path):
    spec = TrainerSpec(training_kwargs={"output_dir": "/etc"})
    assert sft_config(spec, str(tmp_path), has_eval=False, use_cpu=True).output_dir == str(tmp_path)


def test_arguments_that_do_not_fit_together_name_the_trainer(tmp_path):
    spec = TrainerSpec(load_best_model_at_end=True, save_strategy="steps", eval_strategy="epoch")
    with pytest.raises(SpecError) as info:
        sft_config(spec, str(tmp_path), has_eval=True, use_cpu=True)
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
