"""What the forgetting guard of a feedback run scores: the model's own held-out documents, so that tuning on ratings
cannot quietly cost what its own runs taught it (`promotion.forgetting`).

A feedback run on an `sft` model scores its `data` valid fold, read as its SFT runs read it (`dataset.read_datasets`:
the operator's caps, the same seeded split) and tokenized as they tokenize it: trl's own `SFTTrainer` preparation with
the model's SFT arguments, batched by trl's collator, without building a trainer (a model, an accelerator) for it. A
model whose data has no valid fold, cannot be read now, or is preference rows (its own `method` is dpo or kto) falls
back to the run's held-out feedback rows (`preference_gate.sft_batches`); the promotion entry says which (`on`).
"""

from pathlib import Path

from training import dataset
from training.config import SFT, ModelSpec, SpecError
from training.limits import Limits

DATA, FEEDBACK = "data", "feedback"  # what the guard scored, as the promotion entry's `forgetting_on.source` says


class _Preparation:
    """What trl's `SFTTrainer._prepare_dataset` reads of its trainer, as `SFTTrainer.__init__` sets it for a model with
    `feedback` (which refuses `assistant_only_loss`, so no training chat template): the tokenizer, and completion-only
    loss as given, else for prompt-completion examples."""

    def __init__(self, tokenizer, args, example: dict):
        self._tokenizer, self.chat_template = tokenizer, None
        self.completion_only_loss = (dataset.detect_format(example) == dataset.PROMPT_COMPLETION
                                     if args.completion_only_loss is None else args.completion_only_loss)


def sft_arguments(spec: ModelSpec, work: Path):
    """The model's SFT runs' `SFTConfig`, for tokenizing only: what spreads a run over devices is left out."""
    from training import padding
    from training.arguments import resolved_arguments, to_config

    resolved = resolved_arguments(spec.trainer, str(work), has_eval=True, use_cpu=True, method=SFT)
    tokenizing = {k: v for k, v in resolved.items() if k not in ("deepspeed", "fsdp", "fsdp_config", "ddp_timeout")}
    return to_config(SFT, padding.for_trl(tokenizing))


def sft_batches(valid, spec: ModelSpec, tokenizer, work: Path) -> list:
    """`valid` (SFT examples) tokenized and batched as the model's SFT runs evaluate it."""
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from training.promotion import loss_batches

    args = sft_arguments(spec, work)
    prepared = SFTTrainer._prepare_dataset(_Preparation(tokenizer, args, valid[0]), valid, tokenizer, args,
                                           False, None, "forgetting guard")
    pad = args.pad_token or tokenizer.pad_token or tokenizer.eos_token  # as SFTTrainer picks it
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.convert_tokens_to_ids(pad))
    return loss_batches(prepared, args.per_device_eval_batch_size, collator)


def guard(db, spec: ModelSpec, limits: Limits, tokenizer, work: Path) -> tuple[list | None, dict]:
    """A feedback run's forgetting guard on the model `spec` (its own method): the SFT batches of its data's valid
    fold and `{source: "data", collection}`, or None (the held-out feedback rows) and why not."""
    if spec.method != SFT:
        return None, {"source": FEEDBACK, "why": f"the model's own method is {spec.method}: its data are preference "
                                                 "rows, not documents an SFT loss reads"}
    try:
        valid = dataset.read_datasets(db, spec.data, limits)[1]
    except SpecError as exc:
        return None, {"source": FEEDBACK, "why": f"the model's data could not be read now ({exc.field}: {exc.message})"}
    if valid is None:
        return None, {"source": FEEDBACK, "why": "the model's data has no valid fold (fewer than 10 documents, "
                                                 f"valid_fraction 0, or none marked {spec.data.fold_field}: 'valid')"}
    return sft_batches(valid, spec, tokenizer, work), {"source": DATA, "collection": spec.data.collection}
