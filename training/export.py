"""A stored checkpoint as a folder anyone can load: merged weights, or the adapter alone, with a model card.

The merged folder is the base model with the LoRA merged in (peft's `merge_and_unload`), saved as
safetensors with the base's tokenizer and clean generation settings, so plain
`AutoModelForCausalLM.from_pretrained(folder)` loads it with neither peft nor mongotune installed. A
base trained in 4 or 8 bits is merged in full precision (merging into quantized weights loses the
adapter). The folder is written beside its destination and renamed into place: whole, or not at all.
A merged export of a quantized model therefore answers from dequantized weights, not exactly as served:
the card and `note` say so.
"""

import datetime as dt
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from training import checkpoints, defaults, ids
from training.config import ModelSpec, parse_model
from training.inert import MAX_SHOWN_CHARS, printable
from training.limits import Limits
from training.offline import no_progress_bars

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
# The BitsAndBytesConfig arguments `training.models` serves a quantized base with, for the model card.
QUANTIZED = {4: 'load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True', 8: "load_in_8bit=True"}


class ExportError(Exception):
    """What stops an export, in one line that says what to do."""


def model_document(db, model_id) -> dict:
    document = db[defaults.MODELS].find_one({"_id": ids.eq(model_id)})
    if document is None:
        raise ExportError(f"no model {model_id!r} in database {db.name}")
    return document


def chosen(document: dict, ref) -> dict:
    """The checkpoint entry `ref` names: "best" (what serves), "latest" or {run, step}."""
    if ref == "base":
        raise ExportError("the base model is not a checkpoint; export best, latest or RUN:STEP")
    try:
        return checkpoints.select(document, ref)
    except LookupError as exc:
        raise ExportError(str(exc)) from None


def _empty_destination(dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ExportError(f"{dest} exists and is not an empty folder; name a new one")
    dest.parent.mkdir(parents=True, exist_ok=True)


def export(db, model_id, ref, dest: Path, limits: Limits, adapter_only: bool = False, say=lambda text: None,
           note=lambda text: None) -> dict:
    """Write checkpoint `ref` of the model into `dest`; returns the entry exported.

    `say` reports each step; `note` gets what the user must know about the result (a quantized base)."""
    dest = Path(dest)
    _empty_destination(dest)
    document = model_document(db, model_id)
    spec = parse_model(document, limits)
    entry = chosen(document, ref)
    file = checkpoints.stored(db, entry, spec.id)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}-") as work, no_progress_bars():
        say(f"downloading checkpoint run {entry['run']} step {entry['step']}")
        folder = checkpoints.download(db, file.files_id, Path(work) / "checkpoint", max_bytes=limits.max_checkpoint_bytes)
        out = Path(work) / "out"
        if adapter_only:
            _adapter(folder, out)
        else:
            say("merging the adapter into the base model")
            _merged(spec, folder, out, limits)
        say("writing the tokenizer and the model card")
        _tokenizer(spec, limits).save_pretrained(out)
        (out / "README.md").write_text(model_card(document, entry, adapter_only, spec.trainer.bits))
        _umask_modes(out)
        if dest.exists():
            dest.rmdir()
        out.rename(dest)
    if spec.trainer.bits:
        note(quantized_note(spec.trainer.bits, adapter_only))
    return entry


def quantized_note(bits: int, adapter_only: bool) -> str:
    """One line on how an export of a model trained and served on a `bits`-bit base differs from what serves."""
    if adapter_only:
        return (f"trained and served on a {bits}-bit base: load the base with quantization_config="
                f"BitsAndBytesConfig({QUANTIZED[bits]}) to answer as served")
    return (f"trained and served on a {bits}-bit base: merged into the full-precision base (merging into quantized "
            "weights would lose the adapter), so answers can differ slightly from the served model")


def _adapter(folder: Path, out: Path) -> None:
    if not (folder / "adapter_config.json").exists():
        raise ExportError("this checkpoint holds full weights, not an adapter; export it without --adapter-only")
    out.mkdir()
    for name in ADAPTER_FILES:
        shutil.copy2(folder / name, out / name)


def _umask_modes(out: Path) -> None:
    """Every file and folder of the export with the modes a new one gets here (0666/0777 less the umask).

    Some writers (safetensors' weights, a copy of a downloaded file) leave 0600 beside 0644 files, so
    a folder shared with a group, or served to other users, loads its config but not its weights.
    """
    umask = os.umask(0o022)  # reading the umask means setting it: put back at once
    os.umask(umask)
    for path in [out, *out.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _tokenizer(spec: ModelSpec, limits: Limits):
    from training.models import load_tokenizer

    return load_tokenizer(spec, limits)


def _merged(spec: ModelSpec, folder: Path, out: Path, limits: Limits) -> None:
    from transformers import GenerationConfig

    from training.inference import apply_checkpoint
    from training.models import load_model

    full = spec.model_copy(update={"trainer": spec.trainer.model_copy(update={"bits": None})})
    model = apply_checkpoint(load_model(full, limits), folder)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    tokenizer = _tokenizer(spec, limits)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                               bos_token_id=tokenizer.bos_token_id)
    model.save_pretrained(out, safe_serialization=True)


MARKDOWN = re.compile(r"([\\`*_{}\[\]()<>#!|~&])")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _cell(value) -> str:
    """A document's value as inert markdown text on one line: every character markdown or HTML gives a
    meaning written escaped, so a document cannot add links, images, headings, tags or table cells."""
    return "" if value is None else MARKDOWN.sub(r"\\\1", printable(" ".join(str(value).split())[:MAX_SHOWN_CHARS]))


def _front_matter(base: str | None, adapter_only: bool) -> list[str]:
    """The Hub's metadata block. Values are JSON strings, which YAML reads as quoted scalars, so no value
    can add a key; `base_model` is written only when it is a Hub id (a folder on the daemon's host is not)."""
    tags = ["mongotune", "lora", *([] if adapter_only else ["merged"])]
    shown = base if isinstance(base, str) and HUB_ID.fullmatch(base) and ".." not in base else None
    return ["---", *([f"base_model: {json.dumps(shown)}"] if shown else []),
            f"library_name: {'peft' if adapter_only else 'transformers'}", "pipeline_tag: text-generation",
            "tags:", *(f"- {tag}" for tag in tags), "---", ""]


def _run_rows(runs) -> list[str]:
    rows = []
    for run in runs if isinstance(runs, list) else []:
        if not isinstance(run, dict):
            continue
        data = run.get("data") if isinstance(run.get("data"), dict) else {}
        gate = run.get("promotion") if isinstance(run.get("promotion"), dict) else {}
        decision = "" if not gate else ("promoted" if gate.get("promoted") else "kept the serving checkpoint")
        rows.append("| " + " | ".join(_cell(v) for v in (
            run.get("number"), run.get("trigger"), run.get("started_at"), run.get("outcome"),
            data.get("collection"), data.get("count"), str(data.get("ids_sha256", ""))[:16], decision)) + " |")
    return rows


def model_card(document: dict, entry: dict, adapter_only: bool, bits: int | None = None) -> str:
    """A README.md: where the model comes from, which checkpoint this is, and every run that led to it."""
    metrics = entry.get("metrics") if isinstance(entry.get("metrics"), dict) else {}
    load = ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
            "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), FOLDER)"
            if adapter_only else "from transformers import AutoModelForCausalLM\n"
                                 "model = AutoModelForCausalLM.from_pretrained(FOLDER)")
    lines = [
        *_front_matter(document.get("model_name_or_path"), adapter_only),
        f"# {_cell(document['_id'])}", "",
        f"Fine-tuned by mongotune from {_cell(document.get('model_name_or_path'))}"
        f"{' (LoRA adapter only)' if adapter_only else ' (adapter merged into the base)'}.", "",
        f"- checkpoint: run {entry['run']}, step {entry['step']}",
        f"- metrics: {json.dumps(metrics, default=str)}",
        f"- exported: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}",
        *([f"- {quantized_note(bits, adapter_only)}"] if bits else []), "",
        "```python", load, "```", "",
        "## Runs", "",
        "| run | trigger | started | outcome | collection | documents | ids sha256 | promotion |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *_run_rows(document.get("runs")), "",
    ]
    return "\n".join(lines)
