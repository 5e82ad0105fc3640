"""The promotion gate: a finished run serves only if its best checkpoint is not worse than what serves now.

Both checkpoints are measured here, by the same code on the same held-out documents (this run's valid
fold, as the trainer tokenized it), so the comparison is fair whatever each run's own evaluation said.
Until the gate decides, `best_checkpoint` keeps pointing at the earlier run's promoted checkpoint
(`training.progress` keeps the run's own best in its `runs` entry). The decision, both scores and the
number of documents are recorded on the run's entry; a promotion also becomes a `promoted` event. A preference
run (`method` dpo or kto) is scored on its held-out rows (`training.preference_gate`): preference accuracy and
reward margin against the base, and the SFT loss on held-out documents, which must not rise by more than
`max_eval_loss_rise` whatever the preference scores say (a preference run must not quietly forget; under a loss
metric, not at all). Its first run, with nothing serving, records its scores beside the base's SFT scores, the
"before", where they can be measured: they decide nothing.

The training child frees its trained model before the gate, which then loads the base once for both
checkpoints (`GateModel`): never two bases, nor a base beside the trained model, in memory at once.
"""

import gc
import logging
import math
from pathlib import Path

from training import checkpoints, defaults, events, lineage, preference_gate
from training.config import DPO, GATE_METRICS, SFT, ModelSpec, SpecError, gate_metrics
from training.errors import briefly, public_message
from training.starting import refits

log = logging.getLogger(__name__)

LOSS_COLUMNS = ("input_ids", "labels", "seq_lengths")  # what trl's collator reads: the loss's labels, packed lengths
SFT_METRICS = gate_metrics(SFT)


def serving_ref(document: dict) -> dict | None:
    """The checkpoint an earlier run promoted, as the document stood when this run started; None for none."""
    best, run = document.get("best_checkpoint"), document.get("run")
    if refits(document):  # a replaced definition changed the base or LoRA shape: the serving adapter no longer fits
        return None
    if not isinstance(best, dict) or not all(isinstance(best.get(k), int) for k in ("run", "step")):
        return None
    return {"run": best["run"], "step": best["step"]} if best["run"] < run else None


def decide(metric: str, min_delta: float, new: float | None, serving: float | None,
           unknown: str = "the loss overflows") -> tuple[bool, str]:
    """Whether the new score beats the serving one by at least `min_delta` (0: not worse), and why, in words;
    `unknown`: why a score can be None."""
    if new is None or serving is None:
        return False, f"{metric} could not be computed for both checkpoints ({unknown}): kept"
    gain = new - serving if GATE_METRICS[metric].higher_is_better else serving - new
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


def forgot(max_rise: float, new: float, serving: float) -> str | None:
    """Why a candidate is kept for its held-out SFT loss: risen above the serving one's by more than `max_rise`."""
    if new - serving <= max_rise:
        return None
    return (f"eval_loss on the held-out documents rose by {new - serving:.4g} ({new:.4g} against {serving:.4g}), "
            f"more than max_eval_loss_rise {max_rise:g}: the run forgot what the serving checkpoint knew")


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


def forgetting(model, sft_batches: list) -> dict:
    """The forgetting guard's measure: `measure`'s SFT scores of held-out documents (each None without any), so that
    an SFT model's own metric can judge a preference run on it too."""
    return measure(model, sft_batches) if sft_batches else dict.fromkeys(SFT_METRICS)


def held_out_batches(trainer, columns: tuple = LOSS_COLUMNS) -> list | None:
    """The trainer's tokenized valid fold in its own collator's batches (its truncation included) of `columns`; None
    when the run has no valid fold."""
    dataset = trainer.eval_dataset
    if dataset is None or len(dataset) == 0:
        return None
    return loss_batches(dataset, trainer.args.per_device_eval_batch_size, trainer.data_collator, columns)


def loss_batches(dataset, batch_size: int, collator, columns: tuple = LOSS_COLUMNS) -> list:
    """A tokenized dataset in `collator`'s batches of what it reads: by default an SFT loss (`LOSS_COLUMNS`), those
    of them the dataset has."""
    from torch.utils.data import DataLoader

    dataset = dataset.select_columns([c for c in columns if c in dataset.column_names])
    return list(DataLoader(dataset, batch_size=batch_size, collate_fn=collator))


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

    def reference(self, held: preference_gate.HeldOut) -> list:
        """The base's answer logps, every checkpoint's reference. Called first: nothing else is loaded yet."""
        self.model = self._base()
        return preference_gate.all_logps(self.model, held)

    def base_scores(self, sft: list) -> dict:
        """The base's forgetting-guard scores, the "before" of a run with nothing serving to compare against (its
        preference scores are 0 by definition: every reward against itself is)."""
        from peft import PeftModel

        if self.overwritten:
            self.model = self._base()
        if not isinstance(self.model, PeftModel):
            return forgetting(self.model, sft)
        with self.model.disable_adapter():
            return forgetting(self.model, sft)

    def preferences(self, folder: Path, name: str, held: preference_gate.HeldOut, reference: list) -> dict:
        """One checkpoint's preference scores against the base's `reference` logps, and its held-out SFT loss."""
        model = self._with(folder, name)
        scored = preference_gate.scores(held, preference_gate.all_logps(model, held), reference)
        return {**scored, **forgetting(model, held.sft)}

    def _base(self):
        import torch
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        from training.models import load_checked_model

        self.model, self.overwritten = None, False
        gc.collect()
        # A ZeRO-3 run's arguments, still alive in the child, would load the base partitioned across ranks that
        # have finished: the gate (rank 0 alone) would wait for them forever.
        unset_hf_deepspeed_config()
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


def judge(db, spec: ModelSpec, new: dict, serving: dict | None, held, work: Path, limits) -> dict:
    """The decision for the run's best checkpoint `new` against the `serving` one, with why; `held`: the held-out
    batches (SFT), or `preference_gate.HeldOut`, which the preference gate scores."""
    ref = {"run": new["run"], "step": new["step"]}
    if spec.promotion is False:
        return {"promoted": True, "checkpoint": ref, "reason": "promotion is false: every finished run serves"}
    if serving is None and (spec.method == SFT or not held):  # a preference run's first records its scores
        return {"promoted": True, "checkpoint": ref, "reason": "no earlier checkpoint serves"}
    if not held:
        return {"promoted": True, "checkpoint": ref, "reason": "this run has no held-out documents to compare on"}
    if spec.method != SFT:  # a preference run, or (its model's method aside) a feedback run
        return judge_preferences(db, spec, new, serving, held, work, limits)
    metric, min_delta = spec.promotion.metric, spec.promotion.min_delta
    gate = GateModel(spec, limits)
    new_scores = gate.score(fetch(db, spec, new, work, limits), "candidate", held)
    try:
        old_scores = gate.score(fetch(db, spec, serving, work, limits), "serving", held)
    except LookupError as exc:  # refused or gone from GridFS: it cannot serve either
        return {"promoted": True, "checkpoint": ref, "reason": f"the serving checkpoint cannot be loaded: {exc}"}
    promoted, reason = decide(metric, min_delta, new_scores[metric], old_scores[metric])
    return {"promoted": promoted, "checkpoint": ref, "metric": metric, "min_delta": min_delta,
            "score": new_scores[metric], "serving_score": old_scores[metric],
            "serving": {"run": serving["run"], "step": serving["step"]},
            "documents": sum(map(examples, held)), "tokens": new_scores["tokens"],
            "reason": reason}


def decide_preferences(metric: str, min_delta: float, max_rise: float | None, new: dict,
                       serving: dict) -> tuple[bool, str]:
    """`decide` on the metric, then the forgetting guard (none for a loss metric, `max_rise` None: it keeps any rise
    itself): a candidate that forgot is kept however it ranks, and so is one the guard could not measure (no held-out
    answer to score): raters decide a feedback run's labels, and rating every answer bad would otherwise promote on
    the preference score alone."""
    promoted, reason = decide(metric, min_delta, new[metric], serving[metric], unknown=(
        "the held-out rows lack the answers it needs: one of each label for reward_margin, a chosen or desirable one "
        "for the SFT scores"))
    if not promoted or max_rise is None:
        return promoted, reason
    if new["eval_loss"] is None or serving["eval_loss"] is None:
        return False, (f"{reason}; but the forgetting guard measured no eval_loss (no chosen or desirable held-out "
                       "answer to score): kept")
    forgetting_reason = forgot(max_rise, new["eval_loss"], serving["eval_loss"])
    return (False, f"{reason}; but {forgetting_reason}: kept") if forgetting_reason else (True, reason)


def judge_preferences(db, spec: ModelSpec, new: dict, serving: dict | None, held: preference_gate.HeldOut,
                      work: Path, limits) -> dict:
    """A preference run's decision: `promotion.metric` of both checkpoints, then the forgetting guard. With nothing
    serving it is promoted, its scores recorded beside the base's where they can be measured."""
    ref = {"run": new["run"], "step": new["step"]}
    counted = {"pairs" if held.method == DPO else "examples": held.rows, "documents": sum(map(examples, held.sft)),
               "forgetting_on": held.guarded_on, "reference": preference_gate.REFERENCE}
    gate = GateModel(spec, limits)
    try:
        reference = gate.reference(held)
        base = gate.base_scores(held.sft) if serving is None else None  # on the plain base, before any checkpoint
        candidate = gate.preferences(fetch(db, spec, new, work, limits), "candidate", held, reference)
    except Exception as exc:
        if serving is not None:
            raise
        # With nothing serving the scores decide nothing: whatever stops them (out of memory, say) costs the run
        # that trained to its end nothing but the record.
        log.exception("promotion gate: run %d's scores could not be measured; promoted unscored", new["run"])
        return {"promoted": True, "checkpoint": ref, "reason": "no earlier checkpoint serves; its scores could not "
                f"be measured ({type(exc).__name__}: {public_message(briefly(exc))})", **counted}
    if serving is None:
        return {"promoted": True, "checkpoint": ref, "reason": "no earlier checkpoint serves",
                "scores": {"candidate": candidate, "base": base}, **counted}
    try:
        old = gate.preferences(fetch(db, spec, serving, work, limits), "serving", held, reference)
    except LookupError as exc:  # refused or gone from GridFS: it cannot serve either
        return {"promoted": True, "checkpoint": ref, "reason": f"the serving checkpoint cannot be loaded: {exc}",
                "scores": {"candidate": candidate, "base": gate.base_scores(held.sft)}, **counted}
    promotion = spec.promotion
    promoted, reason = decide_preferences(promotion.metric, promotion.min_delta, promotion.max_eval_loss_rise,
                                          candidate, old)
    return {"promoted": promoted, "checkpoint": ref, "metric": promotion.metric, "min_delta": promotion.min_delta,
            "max_eval_loss_rise": promotion.max_eval_loss_rise, "score": candidate[promotion.metric],
            "serving_score": old[promotion.metric], "serving": {"run": serving["run"], "step": serving["step"]},
            "scores": {"candidate": candidate, "serving": old}, **counted, "reason": reason}


def conclude(db, match: dict, spec: ModelSpec, run: int, serving: dict | None, batches, work: Path,
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
