"""One way to start a listener process, one way to stop a process, one way to wait.

The demo, the benchmarks and the tests start `listener start` through `start_listener`; anything
that stops a process it started (the embedded server, a daemon) goes through `stop`; every
deadline loop is `wait_until`. The daemon's own children are asyncio processes, stopped by
`listener.jobs.stop_child` with the same SIGTERM-then-SIGKILL rule.
"""

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from training import defaults
from training.lifeline import stat

T = TypeVar("T")
STOP_GRACE_S = 30.0  # SIGTERM to SIGKILL: a daemon saves a checkpoint and gives its leases back in a few seconds


def wait_until(check: Callable[[], T], timeout_s: float, what: str, poll_s: float = 0.1) -> T:
    """Poll `check` until it returns something truthy and return that; TimeoutError naming `what` if not."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} did not happen within {timeout_s:.0f} s")
        time.sleep(poll_s)


def gone(pid: int) -> bool:
    """Whether process `pid` has exited: no longer listed, or a zombie nobody reaped (an orphan whose
    init does not reap, as in some containers, stays listed as one)."""
    try:
        return stat(pid)[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def stop(process: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> int:
    """SIGTERM, then SIGKILL after `grace_s`; returns the exit code once the process is gone."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def start_listener(uri: str | None, db: str, name: str, log_path: Path, *, home: Path | None = None,
                   args: Sequence[str] = (), env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """A `listener start` process writing to `log_path`; `uri=None` passes it through the environment instead.

    `home` becomes its MONGOTUNE_HOME; `env` is added to this process's environment; `cwd` is its working
    directory (this one's by default).
    """
    environ = {**os.environ, **({defaults.ENV_HOME: str(home)} if home else {}), **(env or {})}
    command = [sys.executable, "-m", "listener", "start", "--db", db, "--name", name, *args]
    if uri:
        command[4:4] = ["--uri", uri]
        environ.pop(defaults.ENV_URI, None)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environ,
                                cwd=cwd)


def registered(database, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Wait until a started listener has registered in `_listener`; RuntimeError if it exited first."""
    wait_until(lambda: process.poll() is not None or database[defaults.LISTENER].find_one({"pid": process.pid}),
               timeout_s, "the listener's registration")
    if process.poll() is not None:
        raise RuntimeError(f"the listener exited at start with code {process.returncode}")
