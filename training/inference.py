"""Serving: base model plus adapter from GridFS, kept in a small LRU cache, and batched generation."""

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from bson import json_util

from training import checkpoints
from training.config import GenerationParams, ModelSpec
from training.models import load_model, load_tokenizer


@dataclass
class Loaded:
    model: object
    tokenizer: object


class ModelCache:
    """Loaded models by (model, definition, checkpoint); the least recently used is dropped first."""

    def __init__(self, db, work_dir: Path, capacity: int):
        self.db, self.work_dir, self.capacity = db, Path(work_dir), capacity
        self._models: OrderedDict[str, Loaded] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, spec: ModelSpec, entry: dict | None) -> Loaded:
        files_id = checkpoints.stored(self.db, entry, spec.id) if entry else None
        key = json_util.dumps([spec.id, spec.model_name_or_path, spec.model_kwargs, spec.tokenizer_kwargs,
                               spec.trainer.bits, files_id], sort_keys=True)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            loaded = self._load(spec, files_id)
            self._models[key] = loaded
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
            return loaded

    def _load(self, spec: ModelSpec, files_id) -> Loaded:
        model = load_model(spec)
        folder = None
        if files_id is not None:
            folder = self.work_dir / str(files_id)  # an ObjectId's hex: never a path from a document
            if not folder.exists():
                checkpoints.download(self.db, files_id, folder)
            checkpoints.keep_only_safe_weights(folder)
            if (folder / "adapter_config.json").exists():
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, folder)
            else:
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_pretrained(folder, dtype=model.dtype)
        has_tokenizer = folder is not None and (folder / "tokenizer_config.json").exists()
        tokenizer = load_tokenizer(spec, str(folder) if has_tokenizer else None)
        tokenizer.padding_side = "left"
        model.eval()
        return Loaded(model, tokenizer)


def _prompt_ids(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def generation_kwargs(params: GenerationParams, tokenizer) -> dict:
    sampling = {k: v for k, v in params.model_dump().items() if v is not None and k != "max_new_tokens"}
    do_sample = sampling.pop("do_sample", any(k in sampling for k in ("temperature", "top_p", "top_k")))
    if not do_sample:
        sampling = {k: v for k, v in sampling.items() if k == "repetition_penalty"}
    return {"max_new_tokens": params.max_new_tokens, "do_sample": do_sample,
            "pad_token_id": tokenizer.pad_token_id, **sampling}


def generate(loaded: Loaded, prompts: list, params: GenerationParams) -> list[dict]:
    """Answer several prompts (text or chat messages) with one `generate` call."""
    tokenizer = loaded.tokenizer
    batch = tokenizer.pad({"input_ids": [_prompt_ids(tokenizer, p) for p in prompts]}, return_tensors="pt")
    device = next(loaded.model.parameters()).device
    with torch.inference_mode():
        out = loaded.model.generate(**{k: v.to(device) for k, v in batch.items()},
                                    **generation_kwargs(params, tokenizer))
    width = batch["input_ids"].shape[1]
    results = []
    for row, mask in zip(out, batch["attention_mask"]):
        new = row[width:]
        special = set(tokenizer.all_special_ids)
        completion = [t for t in new.tolist() if t not in special]
        ended = next((i + 1 for i, t in enumerate(new.tolist()) if t == tokenizer.eos_token_id), len(new))
        results.append({
            "output": tokenizer.decode(completion, skip_special_tokens=True).strip(),
            "usage": {"prompt_tokens": int(mask.sum()), "completion_tokens": ended},
        })
    return results
