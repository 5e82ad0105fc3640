"""Checkpoints in GridFS: one tar archive per save, written first and listed in the model second.

A checkpoint listed in `checkpoints` is therefore always whole; an upload cut short by a crash is
an orphan file nobody lists. Only safetensors and JSON are read back for serving; the optimizer
and scheduler states needed to resume are loaded by the trainer with `weights_only=True`.
"""

import datetime as dt
import math
import shutil
import tarfile
import tempfile
from pathlib import Path

from bson import ObjectId
from gridfs import GridFSBucket

from listener import defaults

SKIPPED = {"training_args.bin"}  # a pickled TrainingArguments: never needed, never stored
PICKLED = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}  # never loaded for serving


def _bucket(db) -> GridFSBucket:
    return GridFSBucket(db, bucket_name=defaults.CHECKPOINTS)


def upload(db, folder: Path, *, model_id, run: int, step: int) -> dict:
    """Archive a checkpoint folder into GridFS; returns the entry to list in the model document."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name not in SKIPPED)
    metadata = {"model": model_id, "run": run, "step": step, "files": [p.name for p in files]}
    with _bucket(db).open_upload_stream(f"{model_id}/run-{run}/step-{step}.tar", metadata=metadata) as stream:
        with tarfile.open(fileobj=stream, mode="w|") as tar:
            for path in files:
                tar.add(path, arcname=path.name)
    return {
        "run": run, "step": step, "files_id": stream._id, "size": stream.length,
        "created_at": dt.datetime.now(dt.timezone.utc),
    }


def download(db, files_id, dest: Path) -> Path:
    """Unpack a stored checkpoint into `dest`, whole or not at all.

    It is unpacked beside `dest` and renamed into place, so a download cut short never leaves a
    folder that looks complete; the `data` filter refuses links and paths outside it.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        with _bucket(db).open_download_stream(files_id) as stream:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                tar.extractall(staging, filter="data")
        staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def stored(db, entry: dict, model_id) -> ObjectId:
    """The checkpoint's GridFS id, once it is known to be one of this model's archives.

    `checkpoints` lives in a document users can write, so its `files_id` is never trusted as a path
    or as a pointer to another model's files.
    """
    files_id = entry.get("files_id")
    if not isinstance(files_id, ObjectId) or db[f"{defaults.CHECKPOINTS}.files"].count_documents(
            {"_id": files_id, "metadata.model": model_id}, limit=1) == 0:
        raise LookupError(f"checkpoint {{run: {entry.get('run')}, step: {entry.get('step')}}} of model "
                          f"{model_id!r} is not in {defaults.CHECKPOINTS}; pick another with `checkpoint`")
    return files_id


def keep_only_safe_weights(folder: Path) -> None:
    """Serving reads safetensors only: pickled weight files are removed before anything can load them."""
    for path in Path(folder).rglob("*"):
        if path.suffix in PICKLED and path.is_file():
            path.unlink()
    if not any(Path(folder).glob("*.safetensors")):
        raise LookupError(f"checkpoint {Path(folder).name} holds no .safetensors weights; nothing else is loaded")


def delete(db, files_id) -> None:
    _bucket(db).delete(files_id)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def best_of(checkpoints: list[dict]) -> dict | None:
    """The checkpoint with the lowest eval loss; the latest one when none was evaluated."""
    scored = [c for c in checkpoints if _finite((c.get("metrics") or {}).get("eval_loss"))]
    if scored:
        return min(scored, key=lambda c: c["metrics"]["eval_loss"])
    return checkpoints[-1] if checkpoints else None


def to_prune(checkpoints: list[dict], run: int, keep: int | None) -> list[dict]:
    """Checkpoints of `run` beyond the `keep` most recent, never the best one."""
    if not keep:
        return []
    best = best_of(checkpoints)
    of_run = [c for c in checkpoints if c["run"] == run]
    return [c for c in of_run[:-keep] if c is not best]


def select(document: dict, ref) -> dict | None:
    """The checkpoint a request asks for: "best", "latest", {run, step}; None for "base"."""
    checkpoints = document.get("checkpoints") or []
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
        best = document.get("best_checkpoint") or {}
        return next((c for c in checkpoints if c["run"] == best.get("run") and c["step"] == best.get("step")),
                    checkpoints[-1])
    found = next((c for c in checkpoints if c["run"] == ref["run"] and c["step"] == ref["step"]), None)
    if found is None:
        kept = ", ".join(f"{{run: {c['run']}, step: {c['step']}}}" for c in checkpoints)
        raise LookupError(f"model {document['_id']!r} has no checkpoint {ref}; kept: {kept}")
    return found
