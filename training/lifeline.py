"""The first thing a training child or serving worker does: become the daemon's, and die with it.

Both are started by `listener.forks`, forked from the daemon's fork server or spawned, with their
environment as an argument. A child killed along with its daemon is the point: a daemon killed with
SIGKILL cannot stop anything, so the kernel does (Linux's parent-death signal; the fork server
exits when its daemon does). Without it a child orphaned by a SIGKILLed daemon would train on beside
the run's next owner.
"""

import ctypes
import logging
import os
import signal
import sys

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
    if os.getppid() != parent:  # the parent died before the kernel was asked
        sys.exit(defaults.ChildExit.ORPHANED)
    return parent


def die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        log.warning("cannot ask to be stopped with the daemon on this platform")
