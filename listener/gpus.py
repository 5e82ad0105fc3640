"""Which of this host's GPUs each training holds: the daemon's bookkeeping, never a guess from nvidia-smi.

The operator declares the devices a daemon may use (`listener start --gpus 0,1,2,3`; default every
visible GPU, none on a CPU host). A job takes `trainer.num_gpus` of them, handed to its child as
`CUDA_VISIBLE_DEVICES`, and gives them back when its child has exited. A job that does not fit now
stays `pending`: this daemon says why in its `_listener` heartbeat (`waiting`, shown by `listener
status`) and takes it once devices are free, or another daemon does. A job asking for more GPUs than
any live daemon declares (heartbeats carry `gpus`) fails at once, naming the largest host.

A daemon with no GPUs runs jobs on the CPU as it always has: there is nothing to allocate, and
`num_gpus` (1 by default) is then not a demand; `training.child` refuses a job asking for more than one
GPU on a host that has fewer.
"""

import itertools
from dataclasses import dataclass
from pathlib import Path

from listener.leases import alive
from training import defaults

MAX_WAITING_LISTED = 100  # waiting models a heartbeat names (each key up to about 520 characters)


def visible() -> tuple[int, ...]:
    """Every GPU torch sees here, for a daemon whose operator declared none.

    Torch (seconds to import) is asked only when a GPU driver is present, so a CPU host starts fast.
    """
    if not any(Path(p).exists() for p in ("/proc/driver/nvidia/gpus", "/dev/kfd")):
        return ()
    import torch

    return tuple(range(torch.cuda.device_count()))


def wanted(pool_size: int, num_gpus: int) -> int:
    """The GPUs a job takes from a daemon: none on a CPU host (the job runs on the CPU)."""
    return num_gpus if pool_size else 0


class GpuPool:
    def __init__(self, devices: tuple[int, ...]):
        self.devices = tuple(devices)
        self.held: dict[str, tuple[int, ...]] = {}
        self.waiting: dict[str, str] = {}  # model key -> why it waits, for the heartbeat

    def free(self) -> list[int]:
        taken = {d for held in self.held.values() for d in held}
        return [d for d in self.devices if d not in taken]

    def take(self, key: str, count: int) -> tuple[int, ...] | None:
        """`count` free devices for job `key`, or None (and a note why) when fewer are free now."""
        free = self.free()
        if count > len(free):
            self.waiting[key] = f"needs {count} GPU{'s' if count != 1 else ''}, {len(free)} free"
            return None
        self.waiting.pop(key, None)
        self.held[key] = tuple(free[:count])
        return self.held[key]

    def give_back(self, key: str) -> None:
        self.held.pop(key, None)

    def forget(self, key: str) -> None:
        """The job is no longer pending here (another daemon took it, or it was cancelled or failed)."""
        self.waiting.pop(key, None)

    def heartbeat(self) -> dict:
        """For the `_listener` record; a list, since a model's key may hold '.' or '$'. Only the first
        `MAX_WAITING_LISTED` waiting models are listed (and how many wait): any writer can make thousands
        wait, and a record past 16 MB would stop the heartbeat, so others would take this daemon's work."""
        listed = itertools.islice(self.waiting.items(), MAX_WAITING_LISTED)
        return {"gpus": list(self.devices), "gpus_free": self.free(),
                "waiting": [{"model": key, "why": why} for key, why in listed], "waiting_count": len(self.waiting)}


@dataclass(frozen=True)
class Decision:
    """What to do with a pending job now: run it (on `devices`; None: the CPU), wait, or fail it."""

    devices: tuple[int, ...] | None = None
    wait: bool = False
    error: dict | None = None


async def reserve(pool: GpuPool, db, key: str, num_gpus: int) -> Decision:
    """Devices for job `key` from this daemon's pool; on a CPU host a job of up to one GPU runs on the CPU."""
    have = len(pool.devices)
    if not fits(have, num_gpus):
        host = await largest_host(db)
        if host[1] < num_gpus:
            return Decision(error=too_big(num_gpus, host))
        pool.waiting[key] = f"needs {num_gpus} GPUs, this listener has {have}: left for {host[0]}"
        return Decision(wait=True)
    if not have:
        return Decision()
    devices = pool.take(key, num_gpus)
    return Decision(devices=devices, wait=devices is None)


def fits(have: int, num_gpus: int) -> bool:
    """Whether a daemon declaring `have` GPUs can host a job of `num_gpus`: a CPU host takes one of up to one."""
    return num_gpus <= have or (not have and num_gpus <= 1)


def cuda_env(devices: tuple[int, ...] | None) -> dict:
    """The child's CUDA_VISIBLE_DEVICES: its own devices on a GPU host, nothing added on a CPU host."""
    return {} if devices is None else {"CUDA_VISIBLE_DEVICES": ",".join(map(str, devices))}


async def largest_host(db) -> tuple[str, int]:
    """The live daemon (`leases.alive`) declaring the most GPUs: its name and count."""
    best = ("none", 0)
    async for record in db[defaults.LISTENER].find(alive(), {"name": 1, "gpus": 1}):
        gpus = record.get("gpus")
        if isinstance(gpus, list) and len(gpus) > best[1]:
            best = (str(record.get("name")), len(gpus))
    return best


def too_big(num_gpus: int, host: tuple[str, int]) -> dict:
    name, count = host
    return {"type": "not_enough_gpus", "field": "trainer.num_gpus",
            "message": f"asks for {num_gpus} GPUs; the largest live listener, {name}, has {count}. Ask for fewer, "
                       "or start a listener on a bigger host (listener start --gpus)"}
