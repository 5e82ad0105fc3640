"""The first thing a training child or serving worker does: become the daemon's, and die with it.

Both are started by `listener.forks`, forked from the daemon's fork server or spawned, with their
environment as an argument. A child killed along with its daemon is the point: a daemon killed with
SIGKILL cannot stop anything, so the kernel does (Linux's parent-death signal; the fork server
exits when its daemon does). Without it a child orphaned by a SIGKILLed daemon would train on beside
the run's next owner.
"""

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from pathlib import Path

from training import defaults

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # Linux prctl option: a signal for this process when its parent dies


def adopt(env: dict[str, str]) -> int:
    """Take `env` into the environment, leave the daemon's session and die with the parent; returns the
    parent's pid, which a long job checks again (`progress.MongoProgress`) where prctl does not exist.

    Its own session: a Ctrl-C meant for the daemon must not kill a child mid-save.
    """
    parent = os.getppid()
    os.environ.update(env)
    os.setsid()
    die_with_parent()
    if os.getppid() != parent or _daemon_gone(parent):  # the parent died before the kernel was asked
        sys.exit(defaults.ChildExit.ORPHANED)
    return parent


def _daemon_gone(parent: int) -> bool:
    """Whether the daemon that started this process is gone although `parent` is still this process's parent.

    A child forked from the fork server whose daemon (and so fork server) died before it asked for the
    parent-death signal already has init, or a subreaper, for its parent: the parent did not change while it
    asked, and it would train on beside the run's next owner. The daemon's pid is multiprocessing's record of
    who started this process: it must be the parent (spawned) or the parent's parent (forked).
    """
    started_by = multiprocessing.parent_process()
    if started_by is None or started_by.pid == parent:
        return False
    try:
        grandparent = int(stat(parent)[1])
    except FileNotFoundError:
        return True  # the parent itself is gone
    except (OSError, ValueError, IndexError):
        return False  # no /proc here: the parent pid check above is all there is
    return grandparent != started_by.pid


def stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces and parentheses): state first,
    parent at 1, start time at 19; FileNotFoundError where no such process is listed. The one reader of it here and
    in the listener (`listener.processes.gone`, `listener.liveness`)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        log.warning("cannot ask to be stopped with the daemon on this platform")
