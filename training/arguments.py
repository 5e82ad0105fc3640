"""Turn the document's `trainer` section into trl's `SFTConfig` (or `DPOConfig`, `KTOConfig`) and peft's `LoraConfig`.

What a document may set is the allowlist in `training.config.TrainingArgs`; this module only
translates names that transformers/trl renamed, applies the listener's defaults and builds the
objects. Users copy keyword arguments from older tutorials, so the old names still work.
"""

from peft import LoraConfig
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

from training import defaults, packing, padding
from training.config import DPO, IGNORED, KTO, SFT, DeepSpeedSpec, SpecError, TrainerSpec

# Each method's trl configuration and trainer (`training.methods` builds the trainer).
TRL = {SFT: (SFTConfig, SFTTrainer), DPO: (DPOConfig, DPOTrainer), KTO: (KTOConfig, KTOTrainer)}

RENAMED = {
    "evaluation_strategy": "eval_strategy",
    "max_seq_length": "max_length",
    "no_cuda": "use_cpu",
    "gradient_checkpointing": "activation_checkpointing",
    "warmup_ratio": "warmup_steps",  # transformers 5 reads a warmup_steps below 1 as a fraction of the run
}
# What a DeepSpeed config needs beyond `zero_optimization`; "auto" lets transformers fill in the
# values from the training arguments, so the document states them once.
DEEPSPEED_DEFAULTS = {
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
    "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
}


def translate(arguments: dict) -> dict:
    """Map old names to current ones; drop the accepted-but-ignored ones; refuse a name given twice."""
    out, written = {}, {}
    for name, value in arguments.items():
        if name in IGNORED:
            continue
        current = RENAMED.get(name, name)
        if current in out:
            raise SpecError(f"trainer.{name}", f"given twice, as {written[current]} and {name}; keep one")
        out[current], written[current] = value, name
    return out


# Under ZeRO-3 the weights are sharded: gathered at each save, a checkpoint holds them whole as safetensors to serve
# (DeepSpeed's default leaves them only in its own shards, which serving never reads).
ZERO3_DEFAULTS = {"stage3_gather_16bit_weights_on_model_save": True}


def deepspeed_config(spec: DeepSpeedSpec) -> dict:
    config = {**DEEPSPEED_DEFAULTS, **spec.model_dump(exclude_none=True)}
    if spec.zero_optimization.stage == 3:
        config["zero_optimization"] = {**ZERO3_DEFAULTS, **config["zero_optimization"]}
    return config


def sft_config(spec: TrainerSpec, output_dir: str, *, has_eval: bool, use_cpu: bool, keep: int = 10) -> SFTConfig:
    """Our defaults for a job run by the listener, then the user's arguments on top.

    `keep` is the operator's cap on checkpoints kept per run, the default `save_total_limit`.
    """
    return to_config(SFT, resolved_arguments(spec, output_dir, has_eval=has_eval, use_cpu=use_cpu, keep=keep))


def to_config(method: str, kwargs: dict):
    """The trl configuration of `method`'s trainer; a SpecError when trl refuses the combination."""
    try:
        return TRL[method][0](**kwargs)
    except (ValueError, TypeError) as exc:
        raise SpecError("trainer", f"the training arguments do not fit together: {exc}") from None


def _early_stopping(spec: TrainerSpec, has_eval: bool) -> dict:
    """What transformers' EarlyStoppingCallback needs: the best model tracked, by eval loss unless named."""
    if not spec.early_stopping_patience:
        return {}
    if not has_eval:
        raise SpecError("trainer.early_stopping_patience", "needs held-out documents to evaluate on: select at least "
                        "10 documents, or mark some with the fold field set to 'valid'")
    return {"load_best_model_at_end": True, "metric_for_best_model": "eval_loss"}


def _sft_defaults(user: dict) -> dict:
    """Batch arrangement that only SFT's trainer and collator know (`training.padding`, `training.packing`)."""
    # A batch's sequences end to end, no step spent on padding (`training.padding`), when a batch holds several
    # and trl does not pack them already; the child turns it off unless the attention is varlen (flash) and
    # for a model that would mix them.
    return {"padding_free": not user.get("packing") and user.get("per_device_train_batch_size", 8) > 1,
            **packing.arguments(user)}


def resolved_arguments(spec: TrainerSpec, output_dir: str, *, has_eval: bool, use_cpu: bool, keep: int = 10,
                       method: str = SFT) -> dict:
    """The keyword arguments `method`'s trl configuration gets: the user's on top of our defaults (the run's entry
    records both). trl's own defaults stay for the rest, the preference trainers' `learning_rate` of 1e-6 too."""
    user = translate(spec.training_arguments())
    kwargs = {
        "max_length": 512,
        # A fraction of the run's steps, which transformers turns into steps once it knows how many: every step up
        # to 40, then 20-40 points a run however long (a fixed 10 gave a 10-step run two).
        "logging_steps": 0.025,
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_total_limit": keep,
        "eval_strategy": "steps" if has_eval else "no",
        # Evaluate when saving, so every checkpoint carries the eval loss that picks the best one
        # (left alone, transformers evaluates at every logging step).
        "eval_steps": user.get("save_steps", 500),
        "activation_checkpointing": not use_cpu,  # on a CPU it costs time and saves little
        **(_sft_defaults(user) if method == SFT else {}),
        "disable_tqdm": True,
        "report_to": "none",
        "use_cpu": use_cpu,
        **({"bf16": False, "fp16": False} if use_cpu else {}),
        # Across nodes a host can vanish without closing its connections: a collective then fails after this long
        # instead of transformers' half hour (a daemon killed outright closes them, and its peers fail at once).
        **({"ddp_timeout": defaults.NODE_COLLECTIVE_TIMEOUT_S} if spec.num_nodes > 1 else {}),
        **_early_stopping(spec, has_eval),
        **user,
        "output_dir": output_dir,
    }
    if not has_eval:
        kwargs["eval_strategy"] = "no"
    if method == SFT:
        kwargs.update(padding.sampling(kwargs, user))  # padded batches grouped by length (`training.padding`)
    if spec.deepspeed is not None:
        kwargs["deepspeed"] = deepspeed_config(spec.deepspeed)
    return kwargs


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
