"""The promotion gate: a finished run serves only if its best checkpoint is not worse than what serves now.

Both checkpoints are measured here, by the same code on the same held-out documents (this run's valid
fold, as the trainer tokenized it), so the comparison is fair whatever each run's own evaluation said.
Until the gate decides, `best_checkpoint` keeps pointing at the earlier run's promoted checkpoint
(`training.progress` keeps the run's own best in its `runs` entry). The decision, both scores and the
number of documents are recorded on the run's entry; a promotion also becomes a `promoted` event.
"""

import gc
import logging
import math
from pathlib import Path

from training import checkpoints, defaults, events, lineage
from training.config import ModelSpec

log = logging.getLogger(__name__)

LOSS_COLUMNS = ("input_ids", "completion_mask", "assistant_masks")  # what trl's collator reads


def serving_ref(document: dict) -> dict | None:
    """The checkpoint an earlier run promoted, as the document stood when this run started; None for none."""
    best, run = document.get("best_checkpoint"), document.get("run")
    if not isinstance(best, dict) or not all(isinstance(best.get(k), int) for k in ("run", "step")):
        return None
    return {"run": best["run"], "step": best["step"]} if best["run"] < run else None


def decide(metric: str, min_delta: float, new: float, serving: float) -> bool:
    """Promote when the new score is better than the serving one by at least `min_delta` (0: not worse)."""
    gain = new - serving if metric == "eval_mean_token_accuracy" else serving - new
    return gain >= min_delta


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
            logits = model(**inputs).logits[:, :-1].float()
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


def evaluate(db, spec: ModelSpec, entry: dict, batches: list, work: Path, limits) -> dict:
    """Load the base with one stored checkpoint of this model and measure it on `batches`."""
    import torch

    from training.inference import apply_checkpoint
    from training.models import load_checked_model

    file = checkpoints.stored(db, entry, spec.id)
    folder = checkpoints.download(db, file.files_id, work / f"gate-{file.files_id}", max_bytes=limits.max_checkpoint_bytes)
    model = apply_checkpoint(load_checked_model(spec, limits), folder)
    if torch.cuda.is_available() and not spec.trainer.bits:
        model.to("cuda")
    try:
        return measure(model, batches)
    finally:
        del model
        gc.collect()


def judge(db, spec: ModelSpec, new: dict, serving: dict | None, batches: list | None, work: Path, limits) -> dict:
    """The decision for the run's best checkpoint `new` against the `serving` one, with why."""
    ref = {"run": new["run"], "step": new["step"]}
    if spec.promotion is False:
        return {"promoted": True, "checkpoint": ref, "reason": "promotion is false: every finished run serves"}
    if serving is None:
        return {"promoted": True, "checkpoint": ref, "reason": "no earlier checkpoint serves"}
    if not batches:
        return {"promoted": True, "checkpoint": ref, "reason": "this run has no held-out documents to compare on"}
    metric, min_delta = spec.promotion.metric, spec.promotion.min_delta
    new_scores = evaluate(db, spec, new, batches, work, limits)
    try:
        old_scores = evaluate(db, spec, serving, batches, work, limits)
    except LookupError as exc:  # refused or gone from GridFS: it cannot serve either
        return {"promoted": True, "checkpoint": ref, "reason": f"the serving checkpoint cannot be loaded: {exc}"}
    promoted = (new_scores[metric] is not None and old_scores[metric] is not None
                and decide(metric, min_delta, new_scores[metric], old_scores[metric]))
    return {"promoted": promoted, "checkpoint": ref, "metric": metric, "min_delta": min_delta,
            "score": new_scores[metric], "serving_score": old_scores[metric],
            "serving": {"run": serving["run"], "step": serving["step"]},
            "documents": sum(len(b["input_ids"]) for b in batches), "tokens": new_scores["tokens"],
            "reason": "better by at least min_delta" if promoted else "not better than the serving checkpoint by min_delta"}


def conclude(db, match: dict, spec: ModelSpec, run: int, serving: dict | None, batches: list | None, work: Path,
             limits, ranking: tuple[str, bool]) -> dict | None:
    """Run the gate at the end of a run that trained to its end; write the decision; returns it."""
    models = db[defaults.MODELS]
    current = models.find_one(match, {"checkpoints": 1})
    if current is None:
        return None
    listed = checkpoints.listed(current.get("checkpoints"))
    new = checkpoints.best_of([c for c in listed if c["run"] == run], *ranking)
    if new is None:
        return None
    old = next((c for c in listed if serving and (c["run"], c["step"]) == (serving["run"], serving["step"])), None)
    decision = judge(db, spec, new, old, batches, work, limits)
    log.info("promotion gate for run %d: %s (%s)", run, "promoted" if decision["promoted"] else "kept", decision["reason"])
    update, filters = lineage.set_fields(run, {"promotion": decision})
    if decision["promoted"]:
        update["$set"]["best_checkpoint"] = decision["checkpoint"]
        update["$push"] = events.push(events.event("promoted", run=run, step=new["step"]))
    models.find_one_and_update(match, update, array_filters=filters)
    return decision
