"""Checkpoint storage: `training.checkpoints` against raw GridFS, one file per stream.

The folder is the baseline's saved adapter plus a file of random bytes the size of an optimizer
state, so the figures reflect a real checkpoint rather than a few kilobytes. Both downloads end
with the files on disk, as a checkpoint must be for loading. Each figure is a median over rounds.
"""

import os
import shutil
import statistics
import time
from pathlib import Path

from gridfs import GridFSBucket

from bench.common import Context, Row, step
from training import checkpoints

OPTIMIZER_MB = 50
MODEL_ID = "bench-storage"  # the owner written into, and checked in, each archive's metadata
ROUNDS = 4  # even, so each side goes first equally often
RAW_BUCKET = "bench_raw"


def realistic_checkpoint(adapter: Path, dest: Path) -> Path:
    shutil.copytree(adapter, dest, ignore=shutil.ignore_patterns("training_args.bin", "README.md"))  # same bytes both ways
    (dest / "optimizer.pt").write_bytes(os.urandom(OPTIMIZER_MB * 2**20))
    return dest


def raw_upload(bucket: GridFSBucket, folder: Path) -> list[tuple[str, object]]:
    """One GridFS file per checkpoint file, as a user storing a folder by hand would."""
    stored = []
    for path in sorted(folder.iterdir()):
        with path.open("rb") as source:
            stored.append((path.name, bucket.upload_from_stream(path.name, source)))
    return stored


def raw_download(bucket: GridFSBucket, stored: list[tuple[str, object]], dest: Path) -> None:
    dest.mkdir(parents=True)
    for name, files_id in stored:
        with (dest / name).open("wb") as out:
            bucket.download_to_stream(files_id, out)


def timed(action) -> tuple[float, object]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def both(ours_first: bool, ours, raw) -> tuple[tuple[float, object], tuple[float, object]]:
    """(seconds, result) of each side; the second of two back-to-back transfers runs at another speed,
    so the rounds take turns at going first."""
    if ours_first:
        return timed(ours), timed(raw)
    theirs = timed(raw)
    return timed(ours), theirs


def one_round(ctx: Context, folder: Path, bucket: GridFSBucket, n: int) -> dict[str, float]:
    """Seconds for each of the four transfers; what was stored is deleted so rounds start alike."""
    scratch, ours_first = ctx.home / f"storage-round-{n}", n % 2 == 0
    (up_ours, entry), (up_raw, stored) = both(
        ours_first, lambda: checkpoints.upload(ctx.db, folder, model_id=MODEL_ID, run=1, step=n),
        lambda: raw_upload(bucket, folder))
    (down_ours, _), (down_raw, _) = both(
        ours_first, lambda: checkpoints.download(ctx.db, entry["files_id"], scratch / "ours", kind="resume"),
        lambda: raw_download(bucket, stored, scratch / "raw"))
    checkpoints.delete(ctx.db, entry["files_id"], model_id=MODEL_ID)
    for _, files_id in stored:
        bucket.delete(files_id)
    shutil.rmtree(scratch)
    return {"up_ours": up_ours, "up_raw": up_raw, "down_ours": down_ours, "down_raw": down_raw}


def run(ctx: Context, adapter: Path) -> list[Row]:
    folder = realistic_checkpoint(adapter, ctx.home / "storage-checkpoint")
    megabytes = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
    bucket = GridFSBucket(ctx.db, bucket_name=RAW_BUCKET)
    with step(ctx.console, f"checkpoint storage, {megabytes:.0f} MB, {ROUNDS} rounds"):
        rounds = [one_round(ctx, folder, bucket, n) for n in range(ROUNDS)]
    rate = {key: megabytes / statistics.median(r[key] for r in rounds) for key in rounds[0]}
    note = f"{megabytes:.0f} MB, median of {ROUNDS}"
    return [
        Row("storage: checkpoint upload", "MB/s", rate["up_ours"], rate["up_raw"], note),
        Row("storage: checkpoint download", "MB/s", rate["down_ours"], rate["down_raw"], note),
    ]
