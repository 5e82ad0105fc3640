"""Whether a daemon on this machine is certainly dead, without waiting for its heartbeat to stop.

Each heartbeat carries its process's identity (`identity`): the kernel's boot id, its PID namespace,
its user, pid and start time. A daemon that shares the boot, the namespace and the user sees that
process in /proc if it runs (hidepid hides only other users' processes), so a record whose pid is
absent there, a zombie, or a process started at another time, was written by a daemon that died:
its requests are handed back at the next take-over tick (`leases.take_over`), not a few heartbeats
later. Anything else (another host, container or user, an older release's record, /proc unreadable)
is judged by its heartbeat alone. A paused daemon (SIGSTOP) still runs here, so it keeps its requests
until its heartbeat stops, as before.
"""

import functools
import os
from pathlib import Path

from listener.records import DaemonRecord
from training.lifeline import stat

FIELDS = ("boot_id", "pid_ns", "uid", "pid", "pid_started")  # what a heartbeat records of its process


@functools.cache
def identity() -> dict:
    """This process as `FIELDS` describe it, read once (none of it changes while it runs); a field /proc cannot tell is
    None (the heartbeat decides then)."""
    pid = os.getpid()
    try:
        started = int(stat(pid)[19])
    except (OSError, IndexError, ValueError):
        started = None
    return {"boot_id": _read_text("/proc/sys/kernel/random/boot_id"), "pid_ns": _pid_namespace(), "uid": os.getuid(),
            "pid": pid, "pid_started": started}


def dead(record: DaemonRecord, here: dict) -> bool:
    """Whether the daemon that wrote `record` (a `_listener` heartbeat) is certainly dead, seen from `here`."""
    if any(here[name] is None or getattr(record, name) != here[name] for name in ("boot_id", "pid_ns", "uid")):
        return False
    if record.pid <= 0 or record.pid_started is None:
        return False
    try:
        fields = stat(record.pid)
        state, since = fields[0], fields[19]
    except FileNotFoundError:  # no such process in this namespace
        return True
    except (OSError, IndexError):
        return False
    return state in ("Z", "X") or since != str(record.pid_started)  # a zombie, or the pid reused since


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
