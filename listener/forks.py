"""Starting training children and serving workers without paying for their imports each time.

A child or a worker spends about five seconds of a CPU importing torch, transformers, peft and trl
before it does anything: as long as a short job trains. On a host without GPUs a daemon's children
and workers are forked from one process that imported them once (multiprocessing's fork server,
preloaded with `training.preload`, started when the first is needed), so after the first each starts
in milliseconds. On a host with GPUs each is a fresh interpreter (multiprocessing's spawn): CUDA must
not be initialised in a process that forks, and CUDA reads the GPUs a child may use
(CUDA_VISIBLE_DEVICES) once, when it starts. Either way the daemon gets a `Started`, the part of
asyncio's Process it supervises with, and the child gets its arguments pickled over a private pipe,
never through its environment or command line.
"""

import asyncio
import contextlib
import errno
import importlib
import logging
import multiprocessing
from multiprocessing import forkserver
import os
import signal

log = logging.getLogger(__name__)

PRELOAD = ["training.preload"]  # imported once by the fork server; see training/preload.py
PRIVATE_ENV = ("MONGOTUNE_URI", "MONGOTUNE_URI_FILE")  # the connection string's variables


def forget_connection_environment(uri: str) -> None:
    """Remove the connection string from this process's environment, which everything it starts inherits
    (the fork server's, and so its children's, is fixed when it starts); the URI travels in arguments."""
    for name, value in list(os.environ.items()):
        if name in PRIVATE_ENV or (uri and uri in value):
            del os.environ[name]


class Started:
    """A started child as the daemon supervises it: `pid`, `returncode`, `wait()`, `terminate()`, `kill()`.

    Its exit is read from the process's sentinel, a file descriptor the event loop watches, so waiting
    costs no thread and no polling; `wait()` may be awaited from several tasks at once.
    """

    def __init__(self, process: multiprocessing.process.BaseProcess):
        self._process = process
        self.pid: int = process.pid
        self._sentinel = process.sentinel
        self._loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = self._loop.create_future()
        self._loop.add_reader(self._sentinel, self._reap)

    def _reap(self) -> None:
        code = self._process.exitcode  # ready: the sentinel became readable
        if code is None:
            return
        self._loop.remove_reader(self._sentinel)
        self._process.close()  # its pipe and sentinel; the exit code is kept here
        self._exited.set_result(code)

    @property
    def returncode(self) -> int | None:
        return self._exited.result() if self._exited.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Forks:
    """Starts this daemon's children and workers: forked from a preloaded process, or spawned with GPUs."""

    def __init__(self, gpus: bool):
        self.forking = not gpus
        self._context = multiprocessing.get_context("spawn" if gpus else "forkserver")
        if self.forking:
            self._context.set_forkserver_preload(PRELOAD)

    async def start(self, entry: str, *args) -> Started:
        """Run `entry(*args)` ("module:function") in a new process; the first start on a CPU host waits for
        the fork server's imports (in a thread: the daemon's loop goes on). OSError when it cannot start."""
        process = self._context.Process(target=_run, args=(entry, *args), name=entry)
        if self.forking:
            # Here, not in the thread below: the fork server dies when the thread that started it ends
            # (Linux's parent-death signal follows the thread), and this loop's thread lasts as long as the
            # daemon. Starting it takes milliseconds; its imports run on while `process.start` waits.
            forkserver.ensure_running()
        try:
            await asyncio.to_thread(process.start)
        except EOFError:  # the fork server ended before it answered: its imports failed, or it was killed
            raise OSError(errno.ECHILD, "the fork server stopped before it started the process") from None
        return Started(process)


def _run(entry: str, *args) -> None:
    """In the new process: the entry point is imported there, so the daemon itself never imports torch."""
    module, function = entry.split(":")
    getattr(importlib.import_module(module), function)(*args)
