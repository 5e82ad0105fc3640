"""The promotion gate: a finished run serves only if its best checkpoint is not worse than what serves now.

Both checkpoints are measured here, by the same code on the same held-out documents (this run's valid
fold, as the trainer tokenized it), so the comparison is fair whatever each run's own evaluation said.
Until the gate decides, `best_checkpoint` keeps pointing at the earlier run's promoted checkpoint
(`training.progress` keeps the run's own best in its `runs` entry). The decision, both scores and the
number of documents are recorded on the run's entry; a promotion also becomes a `promoted` event. A
preference run (`method` dpo or kto) has no such measure yet: its entry says the gate was skipped, and why.

The training child frees its trained model before the gate, which then loads the base once for both
checkpoints (`GateModel`): never two bases, nor a base beside the trained model, in memory at once.
"""

import gc
import logging
import math
from pathlib import Path

from training import checkpoints, defaults, events, lineage
from training.config import SFT, ModelSpec, SpecError
from training.starting import refits

log = logging.getLogger(__name__)

LOSS_COLUMNS = ("input_ids", "labels", "seq_lengths")  # what trl's collator reads: the loss's labels, packed lengths


def serving_ref(document: dict) -> dict | None:
    """The checkpoint an earlier run promoted, as the document stood when this run started; None for none."""
    best, run = document.get("best_checkpoint"), document.get("run")
    if refits(document):  # a replaced definition changed the base or LoRA shape: the serving adapter no longer fits
        return None
    if not isinstance(best, dict) or not all(isinstance(best.get(k), int) for k in ("run", "step")):
        return None
    return {"run": best["run"], "step": best["step"]} if best["run"] < run else None


def decide(metric: str, min_delta: float, new: float | None, serving: float | None) -> tuple[bool, str]:
    """Whether the new score beats the serving one by at least `min_delta` (0: not worse), and why, in words."""
    if new is None or serving is None:
        return False, f"{metric} could not be computed for both checkpoints (the loss overflows): kept"
    gain = new - serving if metric == "eval_mean_token_accuracy" else serving - new
    scores = f"{new:.4g} against {serving:.4g}"
    if gain == 0 and min_delta == 0:
        return True, f"{metric} equal to the serving checkpoint's ({new:.4g}); min_delta 0 allows not worse"
    if gain == 0:
        return False, f"{metric} equal to the serving checkpoint's ({new:.4g}); min_delta {min_delta:g} asks for better"
    if gain < 0:
        return False, f"{metric} worse by {-gain:.4g} ({scores})"
    enough = gain >= min_delta
    return enough, (f"{metric} better by {gain:.4g} ({scores}), {'at least' if enough else 'less than'} "
                    f"min_delta {min_delta:g}")


def scores(loss_sum: float, correct: int, tokens: int) -> dict:
    loss = loss_sum / max(tokens, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(loss) if loss < 700 else None,
            "eval_mean_token_accuracy": correct / max(tokens, 1), "tokens": tokens}


def measure(model, batches) -> dict:
    """Token-level loss, perplexity and top-1 accuracy over the labelled tokens, as trl's evaluation counts them."""
    import torch

    device = next(model.parameters()).device
    loss_sum, correct, tokens = 0.0, 0, 0
    model.eval()
    with torch.inference_mode():
        for batch in batches:
            labels = batch["labels"][:, 1:].to(device)
            inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
            logits = model(**inputs, use_cache=False).logits[:, :-1].float()  # a cache hides packed sequences
            mask = labels != -100
            loss_sum += torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum").item()
            correct += (logits.argmax(-1)[mask] == labels[mask]).sum().item()
            tokens += int(mask.sum())
    return scores(loss_sum, correct, tokens)


def held_out_batches(trainer) -> list | None:
    """The trainer's tokenized valid fold in its own collator's batches; None when the run has no valid fold."""
    from torch.utils.data import DataLoader

    dataset = trainer.eval_dataset
    if dataset is None or len(dataset) == 0:
        return None
    dataset = dataset.select_columns([c for c in LOSS_COLUMNS if c in dataset.column_names])
    return list(DataLoader(dataset, batch_size=trainer.args.per_device_eval_batch_size,
                           collate_fn=trainer.data_collator))


def examples(batch: dict) -> int:
    """The held-out examples in one batch: a packed or padding-free batch is one row of several."""
    bounds = batch.get("cu_seq_lens_q")  # trl's sequence boundaries in a padding-free row
    return len(bounds) - 1 if bounds is not None else len(batch["input_ids"])


def fetch(db, spec: ModelSpec, entry: dict, work: Path, limits) -> Path:
    """One stored checkpoint of this model, unpacked, safetensors only; LookupError when refused or gone."""
    file = checkpoints.stored(db, entry, spec.id)
    folder = checkpoints.download(db, file.files_id, work / f"gate-{file.files_id}", max_bytes=limits.max_checkpoint_bytes)
    checkpoints.keep_only_safe_weights(folder)
    return folder


class GateModel:
    """The base loaded once for every checkpoint the gate scores.

    Each adapter loads beside the others under its own name and is made the active one, which gives the
    same logits as the base with that adapter alone. Full weights load in place, over the base's; an
    adapter after them gets the base loaded afresh.
    """

    def __init__(self, spec: ModelSpec, limits):
        self.spec, self.limits = spec, limits
        self.model, self.overwritten = None, False

    def score(self, folder: Path, name: str, batches: list) -> dict:
        return measure(self._with(folder, name), batches)

    def _base(self):
        import torch

        from training.models import load_checked_model

        self.model, self.overwritten = None, False
        gc.collect()
        model = load_checked_model(self.spec, self.limits)
        return model.to("cuda") if torch.cuda.is_available() and not self.spec.trainer.bits else model

    def _with(self, folder: Path, name: str):
        from peft import PeftModel

        from training.inference import apply_checkpoint, check_adapter

        adapter = (folder / "adapter_config.json").exists()
        if self.model is None or (adapter and self.overwritten):
            self.model = self._base()
        if not adapter:
            if isinstance(self.model, PeftModel):
                self.model = self.model.unload()
            self.overwritten = True
            return apply_checkpoint(self.model, folder)
        check_adapter(folder / "adapter_config.json")
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(folder, adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, folder, adapter_name=name)
        self.model.set_adapter(name)
        return self.model


def judge(db, spec: ModelSpec, new: dict, serving: dict | None, batches: list | None, work: Path, limits) -> dict:
    """The decision for the run's best checkpoint `new` against the `serving` one, with why."""
    ref = {"run": new["run"], "step": new["step"]}
    if spec.method != SFT:
        return {"promoted": True, "checkpoint": ref, "gate": "skipped", "reason": (
            f"the gate was skipped for method {spec.method}: its measure, the loss on held-out documents, does not "
            f"score a preference run, and no preference gate exists yet; every finished {spec.method} run serves "
            "(promotion: false says the same)")}
    if spec.promotion is False:
        return {"promoted": True, "checkpoint": ref, "reason": "promotion is false: every finished run serves"}
    if serving is None:
        return {"promoted": True, "checkpoint": ref, "reason": "no earlier checkpoint serves"}
    if not batches:
        return {"promoted": True, "checkpoint": ref, "reason": "this run has no held-out documents to compare on"}
    metric, min_delta = spec.promotion.metric, spec.promotion.min_delta
    gate = GateModel(spec, limits)
    new_scores = gate.score(fetch(db, spec, new, work, limits), "candidate", batches)
    try:
        old_scores = gate.score(fetch(db, spec, serving, work, limits), "serving", batches)
    except LookupError as exc:  # refused or gone from GridFS: it cannot serve either
        return {"promoted": True, "checkpoint": ref, "reason": f"the serving checkpoint cannot be loaded: {exc}"}
    promoted, reason = decide(metric, min_delta, new_scores[metric], old_scores[metric])
    return {"promoted": promoted, "checkpoint": ref, "metric": metric, "min_delta": min_delta,
            "score": new_scores[metric], "serving_score": old_scores[metric],
            "serving": {"run": serving["run"], "step": serving["step"]},
            "documents": sum(map(examples, batches)), "tokens": new_scores["tokens"],
            "reason": reason}


def conclude(db, match: dict, spec: ModelSpec, run: int, serving: dict | None, batches: list | None, work: Path,
             limits, ranking: tuple[str, bool]) -> dict | None:
    """Run the gate at the end of a run that trained to its end; write the decision; returns it. A run that stored
    no checkpoint has nothing to serve: it fails (SpecError), never ends `succeeded`."""
    models = db[defaults.MODELS]
    current = models.find_one(match, {"checkpoints": 1})
    if current is None:
        return None
    listed = checkpoints.listed(current.get("checkpoints"))
    new = checkpoints.best_of([c for c in listed if c["run"] == run], *ranking)
    if new is None:
        raise SpecError("trainer.save_strategy", f"run {run} trained to its end and stored no checkpoint, so nothing "
                        "of it could serve: leave save_strategy out (steps, saving at the end too) or give epoch")
    old = next((c for c in listed if serving and (c["run"], c["step"]) == (serving["run"], serving["step"])), None)
    decision = judge(db, spec, new, old, batches, work, limits)
    log.info("promotion gate for run %d: %s (%s)", run, "promoted" if decision["promoted"] else "kept", decision["reason"])
    update, filters = lineage.set_fields(run, {"promotion": decision})
    if decision["promoted"]:
        update["$set"]["best_checkpoint"] = decision["checkpoint"]
        update["$push"] = events.push(events.event("promoted", run=run, step=new["step"]))
    models.find_one_and_update(match, update, array_filters=filters)
    return decision
