"""Every node's part of a checkpoint, in node 0's folder before rank 0 stores it.

Across nodes each rank saves into its own host's checkpoint folder: DeepSpeed's per-rank ZeRO states, each rank's
RNG state. After the save's barrier, the first rank of each node after node 0 sends rank 0 the files of its node's
folder that a checkpoint may hold (`checkpoints.archived`), over the job's own process group (point to point, in
chunks of `CHUNK` bytes; a gloo group of the same ranks where the job's backend is NCCL, which moves GPU tensors
only). Rank 0 writes each name the resume allowlist takes and its own folder lacks, within the operator's cap on a
checkpoint's bytes; so the one stored archive holds every rank's files, and each rank of a resumed run finds its
own in the copy it downloads. Nothing sent is unpickled here: a manifest of names and sizes as JSON, then raw bytes.
One node: nothing moves.
"""

import json
import os
from pathlib import Path

from training import checkpoints
from training.limits import Limits

CHUNK = 16 * 2**20  # bytes per message: a bounded buffer on both sides, whatever a file's size
MANIFEST_BYTES = 2**20  # a node's list of names and sizes: a few hundred bytes per rank it runs

_gloo = None  # the gloo group of a job on NCCL (`_group`)


def _per_node() -> int:
    """The ranks each node runs (torchrun's LOCAL_WORLD_SIZE): a node's ranks are consecutive (`ranks.launch`), so
    each node's first rank is a multiple of it."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def several_nodes() -> bool:
    import torch.distributed as dist

    return dist.get_world_size() > _per_node()


def _group():
    """The process group files travel in: the job's own where it is gloo, else a gloo group of the same ranks
    (made once, by every rank at the same save: making a group is collective)."""
    import torch.distributed as dist

    global _gloo
    if dist.get_backend() == "gloo":
        return None
    if _gloo is None:
        _gloo = dist.new_group(backend="gloo")
    return _gloo


def collect(folder: Path, limits: Limits) -> None:
    """Called by every rank once its part of the checkpoint in `folder` is written (after a barrier): each node's
    first rank after node 0 sends its node's files, and rank 0 receives them within `limits`."""
    import torch.distributed as dist

    group, per_node = _group(), _per_node()
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        room = limits.max_checkpoint_bytes - sum(p.stat().st_size for p in checkpoints.archived(Path(folder)))
        for sender in range(per_node, world, per_node):
            room -= _receive(Path(folder), sender, group, limits, room)
    elif rank % per_node == 0:
        _send(Path(folder), group)


def _send(folder: Path, group) -> None:
    import torch
    import torch.distributed as dist

    files = [(path, path.stat().st_size) for path in checkpoints.archived(folder)]
    manifest = json.dumps([[path.relative_to(folder).as_posix(), size] for path, size in files]).encode()
    dist.send(torch.tensor([len(manifest)], dtype=torch.int64), 0, group=group)
    dist.send(torch.frombuffer(bytearray(manifest), dtype=torch.uint8), 0, group=group)
    for path, size in files:  # exactly the bytes the manifest announced: rank 0 reads that many, in these chunks
        with open(path, "rb") as f:
            for start in range(0, size, CHUNK):
                chunk = f.read(min(CHUNK, size - start)).ljust(min(CHUNK, size - start), b"\0")
                dist.send(torch.frombuffer(bytearray(chunk), dtype=torch.uint8), 0, group=group)


def _manifest(raw: bytes, sender: int, limits: Limits, room: int) -> list[tuple[str, int]]:
    """The names and sizes a node sends, each name one a resume archive takes, all within `room`: what the cap leaves
    after node 0's own part and the nodes' received before (each part alone within the cap would let N nodes put
    N times it on node 0's disk)."""
    try:
        entries = json.loads(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
        entries = None
    if not isinstance(entries, list) or not all(
            isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and type(e[1]) is int and e[1] >= 0
            and checkpoints.KINDS["resume"].fullmatch(e[0]) for e in entries):
        raise checkpoints.CheckpointRefused(f"rank {sender} sent a checkpoint manifest of names no archive holds")
    total = sum(size for _, size in entries)
    if total > room:
        raise checkpoints.LimitExceeded("trainer.save_total_limit", limits.refusal(
            "max_checkpoint_bytes", f"node part of {total} bytes beside {limits.max_checkpoint_bytes - room} "
                                    "on node 0"))
    return [(name, size) for name, size in entries]


def _receive(folder: Path, sender: int, group, limits: Limits, room: int) -> int:
    """Receive one node's part within `room` bytes; the bytes it wrote."""
    import torch
    import torch.distributed as dist

    length = torch.zeros(1, dtype=torch.int64)
    dist.recv(length, sender, group=group)
    if not 0 < int(length) <= MANIFEST_BYTES:
        raise checkpoints.CheckpointRefused(f"rank {sender} announced a checkpoint manifest of {int(length)} bytes")
    raw = torch.empty(int(length), dtype=torch.uint8)
    dist.recv(raw, sender, group=group)
    written = 0
    for name, size in _manifest(raw.numpy().tobytes(), sender, limits, room):
        target = folder / name
        keep = not target.exists()  # node 0's own copy of a file every node writes is the one stored
        if keep:
            target.parent.mkdir(exist_ok=True)  # a tag folder: one component the allowlist matched
            written += size
        with open(target, "wb") if keep else open(os.devnull, "wb") as out:
            for start in range(0, size, CHUNK):
                chunk = torch.empty(min(CHUNK, size - start), dtype=torch.uint8)
                dist.recv(chunk, sender, group=group)
                out.write(chunk.numpy().tobytes())
    return written
