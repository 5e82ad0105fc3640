"""Where a run's LoRA starts: a fresh adapter, another model's (`init_from`), or this model's serving one.

`init_from: {model, checkpoint}` names a model in the same database. Its document must be one this
listener accepts under the operator's caps (so its data is data documents may train on), it must
share this model's base, and the file is used only once GridFS metadata shows it is that model's
(`checkpoints.stored`); it is unpacked as a serving archive (safetensors and JSON) and checked as a
LoRA adapter of bounded rank before peft reads it. Every run after the first continues from this
model's serving adapter unless `retrain.from` is "base", whether a trigger or a person started it; a feedback
run always does (`init_from` or not).
"""

import logging
from pathlib import Path

from training import checkpoints, defaults, ids
from training.lineage import changed_fields, from_feedback
from training.config import ModelSpec, SpecError, parse_model
from training.limits import Limits

log = logging.getLogger(__name__)

SAME_BASE = ("revision", "subfolder", "gguf_file")  # model_kwargs that change which weights load
# Fields whose change, in a replaced definition, makes the serving adapter no longer fit: such a run starts fresh.
REFITS = ("model_name_or_path", *(f"model_kwargs.{name}" for name in SAME_BASE), "trainer.use_lora", "trainer.lora_r",
          "trainer.lora_target_modules")


def _other_model(db, spec: ModelSpec, limits: Limits) -> tuple[ModelSpec, dict]:
    wanted = spec.init_from.model
    document = db[defaults.MODELS].find_one({"_id": ids.eq(wanted)})
    if document is None:
        raise SpecError("init_from.model", f"no model {wanted!r} in this database")
    try:
        other = parse_model(document, limits)
    except SpecError as exc:
        raise SpecError("init_from.model", f"model {wanted!r} is not one this listener accepts ({exc})") from None
    same = other.model_name_or_path == spec.model_name_or_path and all(
        getattr(other.model_kwargs, k) == getattr(spec.model_kwargs, k) for k in SAME_BASE)
    if not same:
        raise SpecError("init_from.model", f"model {wanted!r} was trained on another base model; an adapter only "
                        "fits the base it was trained on: use the same model_name_or_path and model_kwargs")
    return other, document


def source(db, spec: ModelSpec, document: dict, limits: Limits) -> tuple[object, dict] | None:
    """The (model id, checkpoint entry) this run starts from; None for a fresh adapter."""
    feedback = from_feedback(document, spec)  # it tunes the adapter that gave the answers rated, whatever else is set
    if spec.init_from is not None and not feedback:
        other, other_document = _other_model(db, spec, limits)
        ref = spec.init_from.checkpoint
        try:
            entry = checkpoints.select(other_document, ref if isinstance(ref, str) else ref.model_dump())
        except LookupError as exc:
            raise SpecError("init_from.checkpoint", str(exc)) from None
        return other.id, entry
    own = continued(document, "best" if feedback or not spec.retrain else spec.retrain.from_)
    return None if own is None else (spec.id, own)


def continued(document: dict, retrain_from: str) -> dict | None:
    """The checkpoint of this model that run `document["run"]` continues from: the one serving `best`, from an
    earlier run, unless `retrain.from` is "base". Every later run follows it, whoever started it (a trigger, a
    person); None for a fresh adapter (the first run, or nothing of an earlier run is listed)."""
    best = document.get("best_checkpoint")
    earlier = isinstance(best, dict) and isinstance(best.get("run"), int) and best["run"] < document["run"]
    if retrain_from != "best" or not earlier or not checkpoints.listed(document.get("checkpoints")) or refits(document):
        return None
    return checkpoints.select(document, "best")


def refits(document: dict) -> bool:
    """Whether this run's definition was replaced with another base or LoRA shape (`listener.definitions`)."""
    return refitting(changed_fields(document))


def refitting(paths: list[str]) -> bool:
    """Whether any of these changed field paths changes the base or the LoRA shape (`REFITS`)."""
    return any(path == field or field.startswith(f"{path}.") or path.startswith(f"{field}.")
               for path in paths for field in REFITS)


def next_start(document: dict) -> str:
    """What the next run of `document` starts from, in words, as `source` will decide it (`listener retrain`)."""
    run = (document["run"] if checkpoints.counted(document.get("run")) else 0) + 1  # users can write `run`
    init_from = document.get("init_from")
    if isinstance(init_from, dict):
        ref = init_from.get("checkpoint", "best")
        return f"run {run} starts from checkpoint {ref} of model {init_from.get('model')!r} (init_from)"
    retrain = document.get("retrain") if isinstance(document.get("retrain"), dict) else {}
    retrain_from = retrain.get("from", "best")
    entry = continued({**document, "run": run}, retrain_from)
    if entry is None:
        why = (" (retrain.from is base)" if retrain_from == "base" else
               " (the definition changed its base or LoRA shape)" if refits(document) else "")
        return f"run {run} starts from the base model{why}"
    best = document["best_checkpoint"]
    which = "best" if (entry["run"], entry["step"]) == (best["run"], best.get("step")) else "latest"
    return f"run {run} starts from run {entry['run']}'s {which} checkpoint (step {entry['step']})"


def adapter_folder(db, model_id, entry: dict, work: Path, limits: Limits) -> Path:
    """The verified adapter, unpacked and checked; a SpecError naming `init_from` when it is not a LoRA adapter."""
    from training.inference import check_adapter

    file = checkpoints.stored(db, entry, model_id)
    folder = checkpoints.download(db, file.files_id, work / "init", max_bytes=limits.max_checkpoint_bytes)
    checkpoints.keep_only_safe_weights(folder)
    if not (folder / "adapter_config.json").exists():
        raise SpecError("init_from.checkpoint", "holds full weights, not a LoRA adapter; start from a LoRA model")
    try:
        check_adapter(folder / "adapter_config.json")
    except LookupError as exc:
        raise SpecError("init_from.checkpoint", str(exc)) from None
    return folder


def start_model(db, spec: ModelSpec, document: dict, model, work: Path, limits: Limits):
    """The model to train and what the run started from (None: a fresh adapter, built by the trainer)."""
    found = source(db, spec, document, limits)
    if found is None:
        return model, None
    if not spec.trainer.use_lora:
        raise SpecError("trainer.use_lora", "starting from an adapter trains that adapter: keep use_lora true")
    from peft import PeftModel

    model_id, entry = found
    folder = adapter_folder(db, model_id, entry, work, limits)
    log.info("starting from the adapter of model %r, run %d, step %d", model_id, entry["run"], entry["step"])
    started = {"model": model_id, "run": entry["run"], "step": entry["step"]}
    return PeftModel.from_pretrained(model, folder, is_trainable=True), started
