"""Serving, model side: load a base model plus a checkpoint, render prompts, generate; with both caches.

Runs inside the serving worker (`training.worker`), whose process the daemon can kill at any time.
Only the validated request parameters reach `generate`: every load replaces the model's generation
settings with a clean `GenerationConfig`, so no `generation_config.json` (a base's, or a checkpoint's
that a hostile writer forged) turns on beam search, extra sequences or anything else. The tokenizer
always comes from the base model, never from a checkpoint archive. torch and transformers are
imported where they are used, so the daemon can import `normalised` without them.
"""

import gc
import json
import logging
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from training import checkpoints, ids
from training.config import GenerationParams, ModelSpec
from training.errors import public_message
from training.limits import Limits

log = logging.getLogger("mongotune.worker")

SAMPLING = ("temperature", "top_p", "top_k")  # meaningful only when sampling
MAX_LORA_RANK = 1024  # the largest `trainer.lora_r` a document may ask for


@dataclass(eq=False)
class Loaded:
    model: object
    tokenizer: object
    nbytes: int  # parameter and buffer bytes: what the memory budget counts


def normalised(params: GenerationParams) -> dict:
    """The parameters that decide the output; sampling ones only when sampling, so alike requests batch."""
    given = params.model_dump(exclude_none=True)
    do_sample = given.pop("do_sample", any(name in given for name in SAMPLING))
    if not do_sample:
        given = {k: v for k, v in given.items() if k not in SAMPLING}
    return {**given, "do_sample": do_sample}


def generation_kwargs(params: GenerationParams, tokenizer) -> dict:
    """Everything `generate` gets: the validated parameters, one greedy or sampled sequence per prompt."""
    return {**normalised(params), "num_beams": 1, "num_return_sequences": 1,
            "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}


def load(spec: ModelSpec, limits: Limits, folder: Path | None) -> Loaded:
    """The base model (size checked first), the checkpoint in `folder` applied, clean generation settings."""
    from training.models import load_model, load_tokenizer

    model = load_model(spec, limits)
    if folder is not None:
        model = _apply_checkpoint(model, folder)
    tokenizer = load_tokenizer(spec, limits)
    tokenizer.padding_side = "left"
    _clean_generation_config(model, tokenizer)
    model.eval()
    nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return Loaded(model, tokenizer, nbytes)


def _apply_checkpoint(model, folder: Path):
    """An adapter wraps the base; full weights load into the base's own architecture.

    The checkpoint's config.json never decides what is built: its shapes come from the base model,
    whose size was checked before allocation.
    """
    checkpoints.keep_only_safe_weights(folder)
    if (folder / "adapter_config.json").exists():
        from peft import PeftModel

        _check_adapter(folder / "adapter_config.json")
        return PeftModel.from_pretrained(model, folder)
    from safetensors.torch import load_file

    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in state}
    untied = [name for name, p in model.named_parameters(remove_duplicate=False)
              if name in missing and id(p) not in loaded]
    if unexpected or untied:
        raise LookupError(f"checkpoint weights do not fit the base model ({len(unexpected)} unknown, "
                          f"{len(untied)} missing tensors); serve it with the base it was trained from")
    return model


def _check_adapter(path: Path) -> None:
    """peft allocates an adapter from its config before reading weights: bound what the config asks for."""
    try:
        config = json.loads(path.read_text())
    except (ValueError, OSError):
        raise LookupError("the checkpoint's adapter_config.json is not readable JSON") from None
    rank = config.get("r") if isinstance(config, dict) else None
    if config.get("peft_type") != "LORA" or not isinstance(rank, int) or not 0 < rank <= MAX_LORA_RANK:
        raise LookupError(f"the checkpoint's adapter is not a LoRA adapter of rank 1 to {MAX_LORA_RANK}; "
                          "serve a checkpoint the listener trained")


def _clean_generation_config(model, tokenizer) -> None:
    from transformers import GenerationConfig

    clean = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for target in {id(model): model, id(base): base}.values():
        target.generation_config = clean


def prompt_ids(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer(loaded: Loaded, prompts: list, params: GenerationParams) -> list[dict]:
    """One result per prompt, in order: `{output, usage}`, or `{error}` for a prompt the template refuses."""
    rendered = []
    for prompt in prompts:
        try:
            rendered.append(prompt_ids(loaded.tokenizer, prompt))
        except Exception as exc:  # the model's own template, on this input only: the others still go on
            rendered.append({"error": {"type": "invalid_request", "message": public_message(
                f"the model's chat template cannot render this input: {type(exc).__name__}: {exc}")}})
    good = [item for item in rendered if isinstance(item, list)]
    results = iter(generate(loaded, good, params) if good else [])
    return [next(results) if isinstance(item, list) else item for item in rendered]


def generate(loaded: Loaded, token_ids: list[list[int]], params: GenerationParams) -> list[dict]:
    """Answer several tokenized prompts with one `generate` call."""
    import torch
    from transformers import GenerationConfig

    tokenizer = loaded.tokenizer
    batch = tokenizer.pad({"input_ids": token_ids}, return_tensors="pt")
    device = next(loaded.model.parameters()).device
    config = GenerationConfig(**generation_kwargs(params, tokenizer))
    with torch.inference_mode():
        out = loaded.model.generate(**{k: v.to(device) for k, v in batch.items()}, generation_config=config)
    width = batch["input_ids"].shape[1]
    special = set(tokenizer.all_special_ids)
    results = []
    for row, mask in zip(out, batch["attention_mask"]):
        new = row[width:].tolist()
        ended = next((i + 1 for i, t in enumerate(new) if t == tokenizer.eos_token_id), len(new))
        results.append({
            "output": tokenizer.decode([t for t in new if t not in special], skip_special_tokens=True).strip(),
            "usage": {"prompt_tokens": int(mask.sum()), "completion_tokens": ended},
        })
    return results


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class DiskCache:
    """Checkpoints unpacked under `work_dir/<files_id hex>`, at most `budget` bytes, least recently used out first.

    Use is the folder's mtime, so the order survives a worker restart. A folder that failed to
    download or load is deleted; half-unpacked staging folders of a killed worker are cleared at start.
    """

    def __init__(self, work_dir: Path, budget: int):
        self.work_dir, self.budget = Path(work_dir), budget
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.work_dir.glob(".*"):
            shutil.rmtree(stale, ignore_errors=True)

    def folder(self, files_id) -> Path:
        return self.work_dir / str(files_id)  # an ObjectId's hex, checked by `checkpoints.stored`

    def touch(self, files_id) -> None:
        if self.folder(files_id).exists():
            os.utime(self.folder(files_id))

    def fetch(self, db, file: checkpoints.Stored) -> Path:
        """The unpacked checkpoint; its size comes from the file document `checkpoints.stored` parsed."""
        folder = self.folder(file.files_id)
        if folder.exists():
            os.utime(folder)
            return folder
        if file.length > self.budget:
            raise LookupError(f"this checkpoint is {file.length:,} bytes, over the operator's serving disk budget of "
                              f"{self.budget:,} bytes (MONGOTUNE_SERVING_DISK_BYTES)")
        self._make_room(file.length)
        try:
            return checkpoints.download(db, file.files_id, folder, max_bytes=self.budget)
        except BaseException:
            self.discard(file.files_id)
            raise

    def discard(self, files_id) -> None:
        shutil.rmtree(self.folder(files_id), ignore_errors=True)

    def _make_room(self, needed: int) -> None:
        folders = sorted((p for p in self.work_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                         key=lambda p: p.stat().st_mtime)
        used = sum(_folder_bytes(p) for p in folders)
        while folders and used + needed > self.budget:
            oldest = folders.pop(0)
            used -= _folder_bytes(oldest)
            shutil.rmtree(oldest, ignore_errors=True)
            log.info("removed unpacked checkpoint %s (disk budget)", oldest.name)


class ModelCache:
    """Loaded models by exact identity (`ids.key`), at most `budget` parameter bytes; least recently used out first.

    The model just loaded always stays, even alone over the budget: the worker's memory watchdog is
    the hard cap.
    """

    def __init__(self, db, limits: Limits, disk: DiskCache, budget: int):
        self.db, self.limits, self.disk, self.budget = db, limits, disk, budget
        self._models: OrderedDict[str, Loaded] = OrderedDict()

    def get(self, spec: ModelSpec, entry: dict | None) -> Loaded:
        file = checkpoints.stored(self.db, entry, spec.id) if entry else None
        files_id = file.files_id if file else None
        key = ids.key([spec.id, spec.model_name_or_path, spec.model_kwargs.model_dump(),
                       spec.tokenizer_kwargs.model_dump(), spec.trainer.bits, files_id])
        if key in self._models:
            self._models.move_to_end(key)
            if files_id:
                self.disk.touch(files_id)
            return self._models[key]
        folder = self.disk.fetch(self.db, file) if file else None
        try:
            loaded = load(spec, self.limits, folder)
        except BaseException:
            if files_id:
                self.disk.discard(files_id)
            raise
        self._models[key] = loaded
        self._evict()
        return loaded

    def _evict(self) -> None:
        while len(self._models) > 1 and sum(m.nbytes for m in self._models.values()) > self.budget:
            self._models.popitem(last=False)
        gc.collect()
