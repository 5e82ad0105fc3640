"""Turn the document's `trainer` section into trl's `SFTConfig` and peft's `LoraConfig`.

Users copy keyword arguments from older tutorials, so names that transformers/trl renamed are
translated; a name SFTConfig does not know is an error naming it, never silently ignored.
"""

import dataclasses
import types
import typing
from enum import Enum
from typing import Any, Literal

from peft import LoraConfig
from trl import SFTConfig

from training.config import SpecError, TrainerSpec

RENAMED = {
    "evaluation_strategy": "eval_strategy",
    "max_seq_length": "max_length",
    "no_cuda": "use_cpu",
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}
# Accepted for compatibility, with nothing to do: every run writes to a fresh folder.
IGNORED = {"overwrite_output_dir"}
# The listener decides these; a document may not.
RESERVED = {
    "output_dir": "checkpoints go to GridFS",
    "logging_dir": "logs go to the model document",
    "resume_from_checkpoint": "the listener resumes from the last checkpoint in GridFS",
    "push_to_hub": "checkpoints go to GridFS",
    "hub_token": "credentials never belong in a document",
    "hub_model_id": "checkpoints go to GridFS",
    "report_to": "metrics go to the model document",
    "deepspeed": "set trainer.deepspeed as a configuration object, not a path",
}
# What a DeepSpeed config needs beyond `zero_optimization`; "auto" lets transformers fill in the
# values from the training arguments, so the document states them once.
DEEPSPEED_DEFAULTS = {
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
    "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
}
_FIELDS = {f.name: f for f in dataclasses.fields(SFTConfig) if f.init}
_HINTS = typing.get_type_hints(SFTConfig)


def _accepts(hint: Any, value: Any) -> bool:
    """A shallow type check against SFTConfig's annotations, so `"three"` epochs fails here, early."""
    origin = typing.get_origin(hint)
    if hint is Any or hint is object:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type) and issubclass(hint, Enum):
        return value in {member.value for member in hint}
    if isinstance(hint, type):
        return isinstance(value, hint)
    if origin is not None and isinstance(origin, type):
        return isinstance(value, origin)
    return True


def translate(arguments: dict) -> dict:
    """Map old names to current ones and check every name and value type."""
    out, written = {}, {}
    for name, value in arguments.items():
        field = f"trainer.{name}"
        if name in IGNORED:
            continue
        if name in RESERVED:
            raise SpecError(field, f"cannot be set in a document: {RESERVED[name]}")
        current = RENAMED.get(name, name)
        if current not in _FIELDS:
            raise SpecError(field, "unknown training argument; see transformers' TrainingArguments and trl's SFTConfig")
        if not _accepts(_HINTS[current], value):
            raise SpecError(field, f"expected {_describe(_HINTS[current])}, got {type(value).__name__} {value!r:.60}")
        if current in out:
            raise SpecError(field, f"given twice, as {written[current]} and {name}")
        out[current], written[current] = value, name
    return out


def _describe(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("transformers.trainer_utils.", "").replace("<class '", "").replace("'>", "")


def sft_config(spec: TrainerSpec, output_dir: str, *, has_eval: bool, use_cpu: bool) -> SFTConfig:
    """Our defaults for a job run by the listener, then the user's arguments on top."""
    user = translate(spec.training_arguments())
    kwargs = {
        "max_length": 512,
        "logging_steps": 10,
        "logging_first_step": True,
        "save_strategy": "steps",
        "eval_strategy": "steps" if has_eval else "no",
        # Evaluate when saving, so every checkpoint carries the eval loss that picks the best one
        # (left alone, transformers evaluates at every logging step).
        "eval_steps": user.get("save_steps", 500),
        "activation_checkpointing": not use_cpu,  # on a CPU it costs time and saves little
        "disable_tqdm": True,
        "report_to": "none",
        "use_cpu": use_cpu,
        **({"bf16": False, "fp16": False} if use_cpu else {}),
        **user,
        "output_dir": output_dir,
    }
    if not has_eval:
        kwargs["eval_strategy"] = "no"
    if spec.deepspeed is not None:
        kwargs["deepspeed"] = {**DEEPSPEED_DEFAULTS, **spec.deepspeed}
    try:
        return SFTConfig(**kwargs)
    except (ValueError, TypeError) as exc:
        raise SpecError("trainer", f"the training arguments do not fit together: {exc}") from None


def lora_config(spec: TrainerSpec) -> LoraConfig | None:
    if not spec.use_lora:
        return None
    return LoraConfig(
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=spec.lora_target_modules,
        task_type="CAUSAL_LM",
    )
