"""Checkpoints in GridFS: one tar archive per save, written first and listed in the model second.

A checkpoint listed in `checkpoints` is therefore always whole; an upload cut short by a crash is
an orphan file nobody lists. Neither the listing nor the archives are trusted: users can write the
model document, and may be able to insert into the `_checkpoints` bucket. So a file is used (loaded,
resumed from, deleted) only once its GridFS metadata shows it is this model's (and run's), and an
archive is unpacked by an allowlist of bare file names: safetensors weights and JSON for serving,
plus the optimizer, scheduler, scaler and RNG states that transformers' Trainer reads back with
`torch.load(weights_only=True)` to resume, and DeepSpeed's tag folder (`global_stepN/`, one level,
its states by name) with the `latest` file naming it, which DeepSpeed reads only under
`weights_only_loads`. Nothing pickled is stored for serving, none is unpickled.
"""

import logging
import math
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bson import ObjectId
from gridfs import GridFSBucket
from pymongo.errors import PyMongoError

from training import defaults, ids
from training.limits import Limits

_SERVING = (  # what serving loads: weights as safetensors, configs as JSON (the tokenizer comes from the base)
    r"adapter_model\.safetensors", r"adapter_config\.json", r"model\.safetensors",
    r"model-[0-9]{5}-of-[0-9]{5}\.safetensors", r"model\.safetensors\.index\.json", r"config\.json",
    r"generation_config\.json",
)
_RESUME = _SERVING + (  # what Trainer reads to resume, each with torch.load(weights_only=True) or as JSON
    r"optimizer\.pt", r"scheduler\.pt", r"scaler\.pt", r"rng_state(_[0-9]{1,5})?\.pth", r"trainer_state\.json",
    r"tokenizer\.json", r"tokenizer_config\.json", r"special_tokens_map\.json", r"chat_template\.jinja",
)
_TAG = r"global_step[0-9]{1,12}"  # the folder DeepSpeed saves a checkpoint's states in, named after its step
_DEEPSPEED = (  # DeepSpeed's states, one level down in the tag folder, and the file naming that folder
    _TAG + r"/(mp_rank_[0-9]{2,5}|(bf16_)?zero_pp_rank_[0-9]{1,5}_mp_rank_[0-9]{2,5})_model_states\.pt",
    _TAG + r"/(bf16_)?zero_pp_rank_[0-9]{1,5}_mp_rank_[0-9]{2,5}_optim_states\.pt", r"latest",
)
KINDS = {"serving": re.compile("|".join(_SERVING)), "resume": re.compile("|".join(_RESUME + _DEEPSPEED))}
TAG = re.compile(_TAG)
LATEST = "latest"
PICKLED = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}  # never loaded for serving

TEXT_FILE_BYTES = 256 * 2**20  # a JSON or Jinja file: far above any real config or trainer state, far below RAM
LATEST_BYTES = 64  # DeepSpeed's `latest`: one tag folder's name
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch.load reads it at every call, whatever the caller passes
HEADER_BYTES = 4 * 2**20  # what tarfile may read for one member's headers (PAX and GNU long-name records)
CHUNK = 2**20  # bytes copied at a time while counting
UPLOAD_ATTEMPTS = 3  # a server that fails one chunk write (a step-down, a restart, an internal error) fails no run

log = logging.getLogger(__name__)
_MEMBER_KINDS = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.DIRTYPE: "a directory",
                 tarfile.CHRTYPE: "a device", tarfile.BLKTYPE: "a device", tarfile.FIFOTYPE: "a FIFO"}


class CheckpointRefused(LookupError):
    """A checkpoint that is not this model's, or an archive holding something it may not; nothing was written."""


class LimitExceeded(Exception):
    """A run past an operator's cap; `field` is what the document can change, the message names the setting."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _refused(why: str) -> CheckpointRefused:
    return CheckpointRefused(f"checkpoint archive refused: {why}")


@dataclass(frozen=True)
class Stored:
    """A GridFS checkpoint file whose document passed the typed parse."""

    files_id: ObjectId
    model: object
    run: int
    step: int
    length: int


def _bucket(db) -> GridFSBucket:
    return GridFSBucket(db, bucket_name=defaults.CHECKPOINTS)


def _files(db):
    return db[f"{defaults.CHECKPOINTS}.files"]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def archived(folder: Path) -> list[Path]:
    """The files of a trainer's checkpoint folder that are stored: regular files a resume may read, at the
    top or in DeepSpeed's tag folder (a real folder, not a link), named as `download` accepts them."""
    folder = Path(folder)
    tags = [d for d in folder.iterdir() if d.is_dir() and not d.is_symlink() and TAG.fullmatch(d.name)]
    found = [*folder.iterdir(), *(p for d in tags for p in d.iterdir())]
    return sorted(p for p in found if p.is_file() and not p.is_symlink()
                  and KINDS["resume"].fullmatch(p.relative_to(folder).as_posix()))


class NoWeights(Exception):
    """A checkpoint without safetensors weights at its top level: nothing in it could serve."""


def nonfinite(folder: Path) -> str | None:
    """The first weight of the checkpoint's safetensors files that holds NaN or inf, by name; None when all are
    finite. A run that diverged (a learning rate or a loss that overflows) must never store such weights to serve;
    nor one that saved none (`NoWeights`), which no check would have found finite."""
    import torch
    from safetensors import safe_open

    paths = sorted(Path(folder).glob("*.safetensors"))
    if not paths:
        raise NoWeights("the checkpoint holds no safetensors weights")
    for path in paths:
        with safe_open(path, "pt") as weights:
            for name in weights.keys():
                if not torch.isfinite(weights.get_tensor(name)).all():
                    return name
    return None


def upload(db, folder: Path, *, model_id, run: int, step: int) -> dict:
    """Archive a checkpoint folder into GridFS; returns the entry to list in the model document.

    Only allowlisted names go in (peft's README.md and the pickled training_args.bin never do), so
    every stored archive is one that `download` accepts. A database error starts the archive over as
    a new file, up to `UPLOAD_ATTEMPTS` times: a write cut short leaves an orphan nobody lists, and
    GridFS removes its chunks.
    """
    for attempt in range(1, UPLOAD_ATTEMPTS + 1):
        try:
            return _upload(db, folder, model_id=model_id, run=run, step=step)
        except PyMongoError as exc:
            if attempt == UPLOAD_ATTEMPTS:
                raise
            log.warning("checkpoint step %d: upload failed (%s); starting it over (%d of %d)", step, exc,
                        attempt + 1, UPLOAD_ATTEMPTS)
            time.sleep(attempt)


def _upload(db, folder: Path, *, model_id, run: int, step: int) -> dict:
    names = [p.relative_to(folder).as_posix() for p in archived(folder)]
    metadata = {"model": model_id, "run": run, "step": step, "files": names}
    with _bucket(db).open_upload_stream(f"{model_id}/run-{run}/step-{step}.tar", metadata=metadata) as stream:
        with tarfile.open(fileobj=stream, mode="w|") as tar:
            for name in names:
                tar.add(Path(folder) / name, arcname=name)
    return {
        "run": run, "step": step, "files_id": stream._id, "size": stream.length,
        "created_at": defaults.now(),
    }


def _archive_bound(folder: Path) -> int:
    """An upper bound on the size of the archive `upload` would store (headers and padding included)."""
    return sum(p.stat().st_size + 3 * tarfile.BLOCKSIZE for p in archived(folder)) + 2 * tarfile.RECORDSIZE


class _Metered:
    """The GridFS stream as tarfile reads it, within a moving budget.

    Between two members tarfile reads only headers, and a PAX or GNU long-name header makes it
    buffer as many bytes as the header claims; the budget stops that long before memory runs out.
    """

    def __init__(self, stream):
        self.stream, self.consumed, self.budget = stream, 0, HEADER_BYTES

    def allow(self, more: int) -> None:
        self.budget = self.consumed + more

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(CHUNK if size < 0 else min(size, CHUNK))
        self.consumed += len(data)
        if self.consumed > self.budget:
            raise _refused("a member's headers are larger than any real one")
        return data


def _shown(name: str) -> str:
    return repr(name[:80] + ("..." if len(name) > 80 else ""))


def _check_member(member: tarfile.TarInfo, seen: set[str]) -> None:
    """Refuse a member that is not an allowlisted, first-seen name of a plain regular file: a bare name, or
    one of DeepSpeed's states in its tag folder (the one path the allowlist's patterns can match)."""
    name = member.name
    if not member.isreg():
        what = _MEMBER_KINDS.get(member.type, "not a regular file")
        raise _refused(f"{_shown(name)} is {what}; only regular files are unpacked")
    if member.issparse():
        raise _refused(f"{_shown(name)} is a sparse file")
    if ("/" in name or "\\" in name or name in ("", ".", "..")) and not KINDS["resume"].fullmatch(name):
        last = name.replace("\\", "/").rsplit("/", 1)[-1]  # the path itself may be a host's: not repeated
        raise _refused(f"a member named {_shown(last)} has a path; members are bare file names, "
                       "or DeepSpeed's states in its global_stepN folder")
    if not KINDS["resume"].fullmatch(name):
        raise _refused(f"{_shown(name)} is not a file a checkpoint may hold: weights as .safetensors, configs and "
                       "tokenizer as JSON, and the trainer's optimizer, scheduler, scaler and RNG states")
    if name in seen:
        raise _refused(f"it holds {_shown(name)} twice")
    seen.add(name)


def _copy(source, target, cap: int) -> int | None:
    """Copy at most `cap` bytes, counting them (a header's size is never trusted); None when there were more."""
    copied = 0
    while chunk := source.read(CHUNK):
        copied += len(chunk)
        if copied > cap:
            return None
        target.write(chunk)
    return copied


def _file_cap(name: str, max_file_bytes: int) -> int:
    if name == LATEST:
        return min(max_file_bytes, LATEST_BYTES)
    return min(max_file_bytes, TEXT_FILE_BYTES) if name.endswith((".json", ".jinja")) else max_file_bytes


def _check_latest(path: Path) -> None:
    """DeepSpeed joins what `latest` says to the checkpoint folder: it must name a tag folder, never a path."""
    if not TAG.fullmatch(path.read_bytes().strip().decode("ascii", errors="replace")):
        raise _refused(f"{LATEST!r} names no global_stepN folder")


def _unpack(stream, staging: Path, kind: str, max_bytes: int, max_file_bytes: int) -> None:
    """Unpack member by member, refusing the whole archive at the first member it may not hold."""
    total, seen, meter = 0, set(), _Metered(stream)
    with tarfile.open(fileobj=meter, mode="r|") as tar:
        for member in tar:
            _check_member(member, seen)
            left = max_bytes - total
            if not KINDS[kind].fullmatch(member.name):  # a trainer state in a serving download: streamed past
                if member.size > left:
                    raise _refused(f"{_shown(member.name)} goes over the cap of {max_bytes} bytes per archive")
                total += member.size
                meter.allow(member.size + HEADER_BYTES)
                continue
            cap = _file_cap(member.name, max_file_bytes)
            over = f"{cap} bytes per file" if cap <= left else f"{max_bytes} bytes per archive"
            total += _extract(tar, member, staging / member.name, meter, min(cap, left), over)
            if member.name == LATEST:
                _check_latest(staging / member.name)
            meter.allow(HEADER_BYTES)


def _extract(tar, member, path: Path, meter: _Metered, cap: int, over: str) -> int:
    """Write one member, counting its bytes against `cap`; the bytes written."""
    meter.allow(cap + HEADER_BYTES)
    path.parent.mkdir(exist_ok=True)  # a tag folder: one component the allowlist matched, inside staging
    with open(path, "xb") as target:
        copied = _copy(tar.extractfile(member), target, cap)
    if copied is None:
        raise _refused(f"{_shown(member.name)} goes over the cap of {over}")
    return copied


def download(db, files_id, dest: Path, *, kind: str = "serving", max_bytes: int = Limits().max_checkpoint_bytes,
             max_file_bytes: int | None = None) -> Path:
    """Unpack a stored checkpoint into `dest`, whole or not at all.

    `kind` "serving" unpacks only what serving loads; "resume" adds the trainer's states. It is
    unpacked beside `dest` and renamed into place, so neither a refused archive nor a download cut
    short ever leaves a folder that looks complete. The caller checks whose file it is (`verified`).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, not {kind!r}")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        with _bucket(db).open_download_stream(files_id) as stream:
            _unpack(stream, staging, kind, max_bytes, max_file_bytes or max_bytes)
        staging.rename(dest)
    except tarfile.TarError as exc:
        raise _refused(f"not a readable tar archive ({exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _parse(document: dict) -> Stored | None:
    """The typed parse of a `_checkpoints.files` document; None when anything is missing or mistyped."""
    metadata = document.get("metadata")
    if not isinstance(metadata, dict) or "model" not in metadata:
        return None
    run, step, length = metadata.get("run"), metadata.get("step"), document.get("length")
    if not (isinstance(document.get("_id"), ObjectId) and _is_int(run) and _is_int(step) and _is_int(length)):
        return None
    return Stored(document["_id"], metadata["model"], run, step, length)


def verified(db, files_id, model_id, run: int | None = None) -> Stored:
    """The stored file `files_id`, once its metadata shows it is `model_id`'s (and `run`'s).

    Ids are compared by BSON type and value, so an ObjectId model and the string of its hex never
    share checkpoints. Every load, resume and delete goes through here.
    """
    if not isinstance(files_id, ObjectId):
        raise CheckpointRefused(f"its files_id is not an ObjectId, so it is not in {defaults.CHECKPOINTS}")
    document = _files(db).find_one({"_id": {"$eq": files_id}})
    if document is None:
        raise CheckpointRefused(f"file {files_id} is not in {defaults.CHECKPOINTS}")
    found = _parse(document)
    if found is None:
        raise CheckpointRefused(f"file {files_id} in {defaults.CHECKPOINTS} has no valid metadata "
                                "(model, and run and step as integers)")
    if ids.key(found.model) != ids.key(model_id):
        raise CheckpointRefused(f"file {files_id} in {defaults.CHECKPOINTS} belongs to another model")
    if run is not None and found.run != run:
        raise CheckpointRefused(f"file {files_id} in {defaults.CHECKPOINTS} belongs to run {found.run}, not run {run}")
    return found


def _of_model(db, model_id, run: int | None = None) -> list[Stored]:
    """This model's (and run's) stored files, by metadata; the query only narrows, the parse decides."""
    query = {"metadata.model": {"$eq": model_id}, **({"metadata.run": {"$eq": run}} if run is not None else {})}
    parsed = (_parse(d) for d in _files(db).find(query, {"metadata": 1, "length": 1}))
    return [s for s in parsed if s is not None and ids.key(s.model) == ids.key(model_id)
            and (run is None or s.run == run)]


def latest(db, model_id, run: int) -> Stored | None:
    """The newest stored checkpoint of this model and run, found in GridFS, never through `checkpoints`."""
    if not _is_int(run):
        raise CheckpointRefused(f"run must be an integer, not {type(run).__name__}")
    return max(_of_model(db, model_id, run), key=lambda s: (s.step, s.files_id), default=None)


def check_room(db, folder: Path, model_id, saves: int, limits: Limits) -> None:
    """Refuse a save past the operator's caps before any byte of it is stored."""
    if saves > limits.max_saves:
        raise LimitExceeded("trainer.save_steps", limits.refusal("max_saves", f"a save number {saves}"))
    total = sum(s.length for s in _of_model(db, model_id)) + _archive_bound(folder)
    if total > limits.max_checkpoint_bytes:
        raise LimitExceeded("trainer.save_total_limit", limits.refusal("max_checkpoint_bytes", f"{total} bytes"))


def stored(db, entry: dict, model_id) -> Stored:
    """The checkpoint's GridFS file, once it is known to be one of this model's archives.

    `checkpoints` lives in a document users can write, so its `files_id` is never trusted as a path
    or as a pointer to another model's files.
    """
    files_id = entry.get("files_id") if isinstance(entry, dict) else None
    try:
        return verified(db, files_id, model_id)
    except CheckpointRefused as exc:
        label = f"{{run: {entry.get('run')}, step: {entry.get('step')}}}" if isinstance(entry, dict) else repr(entry)
        raise CheckpointRefused(f"checkpoint {label} of model {model_id!r}: {exc}; "
                                "pick another with `checkpoint`") from None


def keep_only_safe_weights(folder: Path) -> None:
    """Serving reads safetensors only; a folder unpacked before the allowlist may still hold pickles."""
    for path in Path(folder).rglob("*"):
        if path.suffix in PICKLED and path.is_file():
            path.unlink()
    if not any(Path(folder).glob("*.safetensors")):
        raise LookupError(f"checkpoint {Path(folder).name} holds no .safetensors weights; nothing else is loaded")


def _deepspeed_state_types() -> list[type]:
    """The classes DeepSpeed pickles into its states (seen in ZeRO-2 and ZeRO-3 files, deepspeed 0.19; the
    dynamic scaler is fp16's): each only stores numbers once built (`__init__` sets attributes; the enum
    looks a member up)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loads():
    """Every `torch.load` in this process is weights-only while inside, whatever its caller asks.

    DeepSpeed loads its states with `weights_only=False`; forced, its unpickler is torch's
    weights-only one, which builds only tensors, containers and primitive values and refuses any
    other global, so a crafted file fails to load instead of running code. The classes DeepSpeed
    pickles are allowed by exact class, never a function or a module: the unpickler may only call
    such a class with values from the file or fill its `__dict__`, and none of them runs code
    doing so. One environment variable, since DeepSpeed's loads are scattered through its modules.
    """
    import torch

    before = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_state_types()):
            yield
    except pickle.UnpicklingError:
        raise CheckpointRefused("checkpoint refused: a DeepSpeed state of the checkpoint this run resumes from holds "
                                "more than tensors and numbers, so none of it was loaded; `listener retrain` starts "
                                "the model over in a new run") from None
    finally:
        if before is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = before


def delete(db, files_id, *, model_id, run: int | None = None) -> None:
    """Delete a stored checkpoint, only once its metadata shows it is this model's (and run's)."""
    _bucket(db).delete(verified(db, files_id, model_id, run).files_id)


def delete_all(db, model_id) -> int:
    """Delete every stored checkpoint of this model (all runs), found by GridFS metadata; how many."""
    doomed = _of_model(db, model_id)
    for found in doomed:
        _bucket(db).delete(found.files_id)
    return len(doomed)


def listed(entries) -> list[dict]:
    """The entries of a `checkpoints` list with an integer run and step; anything else is ignored."""
    if not isinstance(entries, list):
        return []
    return [c for c in entries if isinstance(c, dict) and _is_int(c.get("run")) and _is_int(c.get("step"))]


def counted(value) -> bool:
    """Whether a run or step number read from a document is one: a non-negative integer."""
    return _is_int(value) and value >= 0


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def ranking(metric_for_best_model: str | None, greater_is_better: bool | None) -> tuple[str, bool]:
    """The metric that picks the best checkpoint and its direction, as transformers reads the two arguments."""
    metric = metric_for_best_model or "eval_loss"
    metric = metric if metric.startswith("eval_") else f"eval_{metric}"
    return metric, (not metric.endswith("loss")) if greater_is_better is None else greater_is_better


def score(entry: dict, metric: str = "eval_loss"):
    """The entry's `metric`; None when it has none, or not a finite number."""
    metrics = entry.get("metrics")
    value = metrics.get(metric) if isinstance(metrics, dict) else None
    return value if _finite(value) else None


def best_of(checkpoints: list[dict], metric: str = "eval_loss", greater: bool = False) -> dict | None:
    """The checkpoint best by `metric` (lowest unless `greater`); the latest one when none was evaluated."""
    scored = [c for c in checkpoints if score(c, metric) is not None]
    if scored:
        return (max if greater else min)(scored, key=lambda c: score(c, metric))
    return checkpoints[-1] if checkpoints else None


def to_prune(checkpoints: list[dict], run: int, keep: int | None, metric: str = "eval_loss",
             greater: bool = False) -> list[dict]:
    """Checkpoints of `run` beyond the `keep` most recent, never the run's best; other runs' are never touched
    (an earlier run's promoted checkpoint serves until a later run is promoted)."""
    if not keep:
        return []
    of_run = [c for c in checkpoints if c["run"] == run]
    best = best_of(of_run, metric, greater)
    return [c for c in of_run[:-keep] if c is not best]


def select(document: dict, ref) -> dict | None:
    """The checkpoint a request asks for: "best", "latest", {run, step}; None for "base"."""
    checkpoints = listed(document.get("checkpoints"))
    if ref == "base":
        return None
    if not checkpoints:
        raise LookupError(
            f"model {document['_id']!r} has no checkpoint yet (status: {document.get('status', 'pending')}); "
            "ask again once it has saved one, or use checkpoint: 'base'"
        )
    if ref == "latest":
        return checkpoints[-1]
    if ref == "best":
        best = document.get("best_checkpoint")
        best = best if isinstance(best, dict) else {}
        return next((c for c in checkpoints if c["run"] == best.get("run") and c["step"] == best.get("step")),
                    checkpoints[-1])
    found = next((c for c in checkpoints if c["run"] == ref["run"] and c["step"] == ref["step"]), None)
    if found is None:
        kept = ", ".join(f"{{run: {c['run']}, step: {c['step']}}}" for c in checkpoints)
        raise LookupError(f"model {document['_id']!r} has no checkpoint {ref}; kept: {kept}")
    return found
