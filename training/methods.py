"""What a model's `method` changes in a run: its dataset, its trl trainer, what is set up on it, the frozen
reference, and what the promotion gate scores (`training.promotion`, `training.preference_gate`).

`sft` trains on text, prompt-response or chat documents with `SFTTrainer`; `dpo` and `kto` train on
preference rows (`training.preferences`) with `DPOTrainer` and `KTOTrainer`. With LoRA the reference
these compare against is trl's choice when no `ref_model` is given: a fresh adapter's run compares
against the base (the adapter disabled), and a run that starts from an adapter (`init_from`, or the
serving adapter on a retrain) against a frozen copy of that adapter, which trl adds as `ref`. Without
LoRA the listener loads a second copy of the base itself, through the same checks as the first, so
that trl never loads a model by a name from the document. `reference` reads which from the built
trainer and the run's entry records it.
"""

from training import dataset, preferences
from training.config import SFT, ModelSpec, SpecError
from training.limits import Limits


def read_datasets(db, spec: ModelSpec, limits: Limits, tokenizer):
    """(train, valid or None, what was read) in the shape `spec.method` trains on; a preference run skips chat rows
    when the tokenizer has no chat template. `tokenizer()` loads it: SFT reads its data without it."""
    if spec.method == SFT:
        return dataset.read_datasets(db, spec.data, limits)
    return preferences.read_datasets(db, spec.data, spec.method, limits, chat=bool(tokenizer().chat_template))


def check_documents(db, spec: ModelSpec, limits: Limits) -> int:
    """What the run checks first, without building a dataset (`listener apply --dry-run`): how many documents it
    selects; the SpecError the run would fail with otherwise."""
    if spec.method == SFT:
        return dataset.check_documents(db, spec.data, limits)
    return preferences.check_documents(db, spec.data, spec.method, limits)


def build_trainer(spec: ModelSpec, limits: Limits, **kwargs):
    """`spec.method`'s trainer; a preference run without LoRA gets the base again as its frozen reference."""
    from training.arguments import TRL

    if spec.method != SFT and not spec.trainer.use_lora:
        from training.models import load_checked_model

        kwargs["ref_model"] = load_checked_model(spec, limits)
    return TRL[spec.method][1](**kwargs)


def check_steps(trainer, spec: ModelSpec, examples: int) -> None:
    """A run that would train zero steps fails naming what to change: it never 'succeeds' having trained nothing.
    trl's preference trainers drop every row whose prompt alone fills `max_length`; a batch larger than the rows
    makes no step when the last, partial batch is dropped."""
    rows, args = len(trainer.train_dataset), trainer.args
    given = spec.trainer.training_arguments()
    if rows == 0:
        name = "max_seq_length" if "max_seq_length" in given else "max_length"
        raise SpecError(spec.trainer.field(name), f"none of the {examples} training examples is left to train on: "
                        f"the trainer drops every one whose prompt alone fills max_length ({args.max_length} tokens); "
                        "raise it, or give shorter prompts")
    batch = args.per_device_train_batch_size * args.world_size
    if args.dataloader_drop_last and rows < batch:
        raise SpecError(spec.trainer.field("per_device_train_batch_size"), f"a batch of {batch} examples is larger "
                        f"than the {rows} there are to train on, and trainer.dataloader_drop_last drops it, so no "
                        "step would run: give a smaller batch, leave dataloader_drop_last out, or select more "
                        "documents")


def arrange(trainer, spec: ModelSpec, resolved: dict, started: dict | None) -> dict | None:
    """What the method sets up on the built trainer before it trains. SFT: its batches as decided once the model was
    checked (`padding.arrange`); a preference run: nothing, but its frozen reference is returned, for the run's
    entry to record."""
    if spec.method != SFT:
        return reference(trainer, started)
    from training import padding

    padding.arrange(trainer, resolved)
    return None


def held_out(trainer, spec: ModelSpec, guard: tuple[list | None, dict] | None = None):
    """What the promotion gate scores, taken before the trainer goes: SFT's held-out batches, or a preference run's
    held-out rows (`training.preference_gate`); None when the run has no valid fold. `guard`: a feedback run's
    forgetting guard (`training.forgetting.guard`); a preference run's own guards on its data's held-out rows."""
    from training import forgetting, preference_gate, promotion

    if spec.method == SFT:
        return promotion.held_out_batches(trainer)
    batches = promotion.held_out_batches(trainer, preference_gate.COLUMNS[spec.method])
    if batches is None:
        return None
    sft, guarded_on = guard or (None, {"source": forgetting.DATA})
    return preference_gate.held_out(batches, spec.method, trainer.args.beta, sft, guarded_on)


def reference(trainer, started: dict | None) -> dict:
    """What the built preference trainer compares its policy against, as the run's entry records it."""
    if trainer.ref_model is not None:
        return {"model": "base", "how": "a second, frozen copy of the base model (full fine-tuning)"}
    if "ref" in getattr(trainer.model, "peft_config", {}):
        return {"model": "start", "adapter": started,
                "how": "a frozen copy of the adapter the run starts from (trl's 'ref' adapter)"}
    return {"model": "base", "how": "the base model: the run's new LoRA adapter disabled"}
