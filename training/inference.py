"""Serving, model side: load a base model plus a checkpoint, render prompts, generate; with both caches.

Runs inside the serving worker (`training.worker`), whose process the daemon can kill at any time.
Only the validated request parameters reach `generate`: every load replaces the model's generation
settings with a clean `GenerationConfig`, so no `generation_config.json` (a base's, or a checkpoint's
that a hostile writer forged) turns on beam search, extra sequences or anything else. The tokenizer
always comes from the base model, never from a checkpoint archive. torch and transformers are
imported where they are used, so the daemon can import `normalised` without them.

A request's own `timeout_s` (`Deadline`) ends only its own answer, never the worker: rendering its
prompt stops at the deadline (`alarm`: a chat template that loops is Python code), and so does the
batch's `generate` (`max_time`), after which rows that had not ended fail as `timeout` and the
others are answered. The operator's limit stays the hard stop: the daemon kills a worker past it.
"""

import contextlib
import gc
import json
import logging
import os
import shutil
import signal
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from training import checkpoints, ids
from training.config import GenerationParams, ModelSpec
from training.errors import public_message
from training.limits import Limits

log = logging.getLogger(__name__)

SAMPLING = ("temperature", "top_p", "top_k")  # meaningful only when sampling
MAX_LORA_RANK = 1024  # the largest `trainer.lora_r` a document may ask for
STREAM_TOKENS = 8  # a streamed answer is written every this many tokens...
STREAM_S = 0.2  # ...or this many seconds, whichever comes first


BASE = "__base__"  # peft's name for "no adapter" in a mixed batch; here also what a view of the bare base uses


@dataclass(eq=False)
class Base:
    """A loaded base model (or a full checkpoint's weights) and the LoRA adapters loaded into it."""

    model: object  # becomes a PeftModel when its first adapter loads
    tokenizer: object
    nbytes: int  # parameter and buffer bytes of the base: what the memory budget counts
    adapters: dict[str, int] = field(default_factory=dict)  # adapter name -> its parameter bytes


@dataclass(eq=False)
class Loaded:
    """What a request generates with: a base and which of its adapters, if the base is shared.

    `adapter` None means the model as loaded (by `load`); `BASE` the base without any adapter.
    """

    base: Base
    adapter: str | None = None
    base_key: str = ""

    @property
    def model(self):
        return self.base.model

    @property
    def tokenizer(self):
        return self.base.tokenizer

    @property
    def nbytes(self) -> int:
        return self.base.nbytes + self.base.adapters.get(self.adapter, 0)

    def selected(self):
        """A context in which `model` generates with this view's adapter: one worker thread, so switching is safe."""
        if self.adapter is None or not hasattr(self.model, "peft_config"):
            return contextlib.nullcontext()
        if self.adapter == BASE:
            return self.model.disable_adapter()
        self.model.set_adapter(self.adapter)
        return contextlib.nullcontext()


class TimeUp(BaseException):
    """The request's deadline passed; a BaseException, so no library's `except Exception` swallows it."""


@dataclass(frozen=True)
class Deadline:
    """A request's own `timeout_s`, counted from when its generate command arrived (`time.monotonic`)."""

    timeout_s: float
    at: float

    @classmethod
    def after(cls, timeout_s: float) -> "Deadline":
        return cls(timeout_s, time.monotonic() + timeout_s)

    def left(self) -> float:
        return max(self.at - time.monotonic(), 0.0)

    def error(self, doing: str) -> dict:
        return {"error": {"type": "timeout",
                          "message": f"{doing} took longer than the request's timeout_s of {self.timeout_s:g} s"}}


@contextlib.contextmanager
def alarm(deadline: Deadline | None):
    """Raise `TimeUp` in the body once `deadline` passes (SIGALRM, so only in a main thread): for Python code that
    may be abandoned anywhere, such as rendering a chat template, which a writer's template may make loop."""
    if deadline is None:
        yield
        return

    def ring(signum, frame):
        raise TimeUp

    previous = signal.signal(signal.SIGALRM, ring)
    try:
        signal.setitimer(signal.ITIMER_REAL, max(deadline.left(), 1e-6))  # 0 would disarm it
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


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
    return Loaded(load_base(spec, limits, folder))


def load_base(spec: ModelSpec, limits: Limits, folder: Path | None) -> Base:
    from training.models import load_model, load_tokenizer

    model = load_model(spec, limits)
    if folder is not None:
        model = apply_checkpoint(model, folder)
    tokenizer = load_tokenizer(spec, limits)
    tokenizer.padding_side = "left"
    _clean_generation_config(model, tokenizer)
    model.eval()
    nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return Base(model, tokenizer, nbytes)


def add_adapter(base: Base, folder: Path, name: str) -> None:
    """Load the LoRA adapter in `folder` into the shared `base` under `name` (peft's multiple adapters)."""
    from peft import PeftModel

    checkpoints.keep_only_safe_weights(folder)
    check_adapter(folder / "adapter_config.json")
    if isinstance(base.model, PeftModel):
        base.model.load_adapter(folder, adapter_name=name)
    else:
        base.model = PeftModel.from_pretrained(base.model, folder, adapter_name=name)
    base.model.eval()
    _clean_generation_config(base.model, base.tokenizer)
    marker = f".{name}."
    base.adapters[name] = sum(p.numel() * p.element_size() for n, p in base.model.named_parameters() if marker in n)


def apply_checkpoint(model, folder: Path):
    """An adapter wraps the base; full weights load into the base's own architecture.

    The checkpoint's config.json never decides what is built: its shapes come from the base model,
    whose size was checked before allocation.
    """
    checkpoints.keep_only_safe_weights(folder)
    if (folder / "adapter_config.json").exists():
        from peft import PeftModel

        check_adapter(folder / "adapter_config.json")
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


def check_adapter(path: Path) -> None:
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


def answer_rows(views: list[Loaded], rows: list[int], prompts: list, params: GenerationParams,
                on_partial=None, deadline: Deadline | None = None) -> list[dict]:
    """Answers for prompts that each name their view (`rows[i]` indexes `views`), in order.

    Views of one shared base whose adapters are all loaded generate as one batch, peft's mixed-adapter
    inference (`adapter_names`, one per row); otherwise (different bases, full-weights checkpoints,
    or an adapter evicted meanwhile) each view generates its own prompts, one `generate` each.
    """
    first = views[0]
    if all(v.base is first.base and (v.adapter == BASE or v.adapter in v.base.adapters) for v in views):
        mixed = len({v.adapter for v in views}) > 1
        return answer(first, prompts, params, on_partial, [views[r].adapter for r in rows] if mixed else None,
                      deadline)
    results: list = [None] * len(prompts)
    for n, view in enumerate(views):
        mine = [i for i, row in enumerate(rows) if row == n]

        def emit(texts: list, mine=mine) -> None:
            by_prompt = dict(zip(mine, texts))
            on_partial([by_prompt.get(i) for i in range(len(prompts))])

        answered = answer(view, [prompts[i] for i in mine], params, emit if on_partial else None, None, deadline)
        for i, result in zip(mine, answered):
            results[i] = result
    return results


def answer(loaded: Loaded, prompts: list, params: GenerationParams, on_partial=None,
           adapters: list[str] | None = None, deadline: Deadline | None = None) -> list[dict]:
    """One result per prompt, in order: `{output, finish_reason, usage}`, or `{error}` for a prompt the template
    refuses.

    `finish_reason` is "stop" when the answer ended at the end-of-sequence token, "length" when `max_new_tokens`
    cut it (the names chat APIs use).

    `on_partial`, if given, gets the answers so far as they grow: one text per prompt, None for refused ones.
    `adapters`, if given, names each prompt's adapter of the shared base (a mixed-adapter batch).
    Past `deadline`, a prompt still rendering, or an answer still generating, is `{error}` of type `timeout`.
    """
    rendered = []
    for prompt in prompts:
        try:
            with alarm(deadline):
                tokens = prompt_ids(loaded.tokenizer, prompt)
        except TimeUp:
            rendered.append(deadline.error("rendering the prompt"))
        except Exception as exc:  # the model's own template, on this input only: the others still go on
            rendered.append({"error": {"type": "invalid_request", "message": public_message(
                f"the model's chat template cannot render this input: {type(exc).__name__}: {exc}")}})
        else:
            rendered.append(tokens)
    good = [item for item in rendered if isinstance(item, list)]
    names = [name for item, name in zip(rendered, adapters) if isinstance(item, list)] if adapters else None
    def emit(texts: list[str]) -> None:
        partial = iter(texts)
        on_partial([next(partial) if isinstance(item, list) else None for item in rendered])

    results = iter(generate(loaded, good, params, emit if on_partial else None, names, deadline) if good else [])
    return [next(results) if isinstance(item, list) else item for item in rendered]


def generate(loaded: Loaded, token_ids: list[list[int]], params: GenerationParams, on_partial=None,
             adapters: list[str] | None = None, deadline: Deadline | None = None) -> list[dict]:
    """Answer several tokenized prompts with one `generate` call; `on_partial` sees the texts as they grow,
    `adapters` (peft's `adapter_names`) picks each row's adapter of a shared base. Generation stops at `deadline`:
    a row that had ended by then is answered, the others fail as `timeout`."""
    import torch
    from transformers import GenerationConfig

    tokenizer = loaded.tokenizer
    batch = tokenizer.pad({"input_ids": token_ids}, return_tensors="pt")
    device = next(loaded.model.parameters()).device
    config = GenerationConfig(**generation_kwargs(params, tokenizer), max_time=deadline.left() if deadline else None)
    streamer = Chunks(tokenizer, len(token_ids), on_partial) if on_partial else None
    mixed = {"adapter_names": adapters} if adapters else {}
    with torch.inference_mode(), contextlib.nullcontext() if adapters else loaded.selected():
        out = loaded.model.generate(**{k: v.to(device) for k, v in batch.items()}, generation_config=config,
                                    streamer=streamer, **mixed)
    width = batch["input_ids"].shape[1]
    results = []
    for row, mask in zip(out, batch["attention_mask"]):
        new = row[width:].tolist()
        ended = next((i + 1 for i, t in enumerate(new) if t == tokenizer.eos_token_id), None)
        if deadline and ended is None and len(new) < params.max_new_tokens:  # stopped by `max_time`
            results.append(deadline.error("generating the answer"))
            continue
        results.append({"output": text(tokenizer, new), "finish_reason": "length" if ended is None else "stop",
                        "usage": {"prompt_tokens": int(mask.sum()), "completion_tokens": ended or len(new)}})
    return results


def text(tokenizer, token_ids: list[int]) -> str:
    """Generated tokens as the answer reads: special tokens (end, padding) dropped, outer spaces stripped."""
    special = set(tokenizer.all_special_ids)
    return tokenizer.decode([t for t in token_ids if t not in special], skip_special_tokens=True).strip()


class Chunks:
    """A transformers streamer (the `BaseStreamer` interface: `put`, `end`) for a whole batch.

    transformers' own streamers take one sequence; this one keeps every row's tokens and hands the
    decoded texts to `emit` every `STREAM_TOKENS` steps or `STREAM_S` seconds, whichever comes first,
    so a client watching the document sees it grow without one database write per token. The final
    texts are not emitted here: they come with the finished results.
    """

    def __init__(self, tokenizer, rows: int, emit):
        self.tokenizer, self.emit = tokenizer, emit
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.prompt_seen = False  # generate's first `put` is the prompt itself
        self.steps, self.last = 0, time.monotonic()

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in zip(self.tokens, value.reshape(-1).tolist()):
            if not row or row[-1] != self.tokenizer.eos_token_id:
                row.append(token)
        self.steps += 1
        if self.steps >= STREAM_TOKENS or time.monotonic() - self.last >= STREAM_S:
            self.emit([text(self.tokenizer, row) for row in self.tokens])
            self.steps, self.last = 0, time.monotonic()

    def end(self) -> None:
        """Nothing held back: the finished answers follow as the command's reply."""


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
    """Models for serving, at most `budget` parameter bytes; the least recently used adapter or base goes first.

    LoRA checkpoints of the same base (same source, kwargs and quantisation) share one copy of it
    through peft's multiple adapters, each under its own name; a full-weights checkpoint is a base of
    its own. Using an adapter uses its base too, so a base goes only after its adapters. What was
    just used always stays, even alone over the budget: the worker's memory watchdog is the hard cap.
    `get` hands out one `Loaded` view per exact identity (`ids.key` of model id and checkpoint).
    """

    def __init__(self, db, limits: Limits, disk: DiskCache, budget: int):
        self.db, self.limits, self.disk, self.budget = db, limits, disk, budget
        self._bases: dict[str, Base] = {}
        self._views: dict[str, Loaded] = {}
        self._recent: OrderedDict[tuple[str, str | None], None] = OrderedDict()  # (base key, adapter), oldest first

    @property
    def nbytes(self) -> int:
        """Parameter bytes held: every base once, plus its adapters."""
        return sum(base.nbytes + sum(base.adapters.values()) for base in self._bases.values())

    def get(self, spec: ModelSpec, entry: dict | None) -> Loaded:
        file = checkpoints.stored(self.db, entry, spec.id) if entry else None
        source = [spec.model_name_or_path, spec.model_kwargs.model_dump(), spec.tokenizer_kwargs.model_dump(),
                  spec.trainer.bits]
        key = ids.key([spec.id, *source, file.files_id if file else None])
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = self._load(spec, source, file)
        elif file:
            self.disk.touch(file.files_id)
        used = [(view.base_key, None)] + ([(view.base_key, view.adapter)] if view.adapter != BASE else [])
        for unit in used:
            self._recent[unit] = None
            self._recent.move_to_end(unit)
        self._evict(keep=set(used))
        return view

    def _load(self, spec: ModelSpec, source: list, file) -> Loaded:
        folder = self.disk.fetch(self.db, file) if file else None
        try:
            adapter = folder is not None and (folder / "adapter_config.json").exists()
            base_key = ids.key([*source, file.files_id if folder is not None and not adapter else None])
            base = self._bases.get(base_key)
            if base is None:
                log.info("loading base %s%s", spec.model_name_or_path, "" if adapter or not file else
                         f" with checkpoint {file.files_id}")
                base = self._bases[base_key] = load_base(spec, self.limits, None if adapter else folder)
                self._recent[(base_key, None)] = None
            if not adapter:
                return Loaded(base, BASE, base_key)
            name = f"adapter_{file.files_id}"
            if name not in base.adapters:
                log.info("loading adapter %s", file.files_id)
                add_adapter(base, folder, name)
            return Loaded(base, name, base_key)
        except BaseException:
            if file:
                self.disk.discard(file.files_id)
            raise

    def _evict(self, keep: set) -> None:
        evicted = False
        while self.nbytes > self.budget:
            unit = next((unit for unit in self._recent if unit not in keep), None)
            if unit is None:
                break
            base_key, adapter = unit
            del self._recent[unit]
            base = self._bases[base_key]
            if adapter is None:
                del self._bases[base_key]
                for gone in [u for u in self._recent if u[0] == base_key]:
                    del self._recent[gone]
            else:
                base.model.delete_adapter(adapter)
                del base.adapters[adapter]
            for key, view in list(self._views.items()):
                if view.base is base and adapter in (None, view.adapter):
                    del self._views[key]
            evicted = True
        if evicted:  # a collection costs tens of milliseconds: only when memory was let go
            gc.collect()
