"""The serving worker as the daemon sees it: one process (`training.worker`), a line protocol over a
socket, a wall-clock limit on every command and a watchdog on its memory.

After any failure the worker is killed, never reused: the next command gets a fresh one. A whole
batch that fails raises `Failure`, whose kind and message go into each of its requests' `error`.
"""

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

from bson import json_util

from listener.forks import Forks, Started
from listener.jobs import stop_child
from listener.settings import Settings

log = logging.getLogger(__name__)

MAX_LINE = 2**26  # bytes of one reply line from the worker: max_batch outputs of max_new_tokens each
WATCH_S = 0.5  # how often the watchdog reads the worker's resident memory
KILL_GRACE_S = 2.0  # SIGTERM to SIGKILL for the worker


class Failure(Exception):
    """A whole batch failed; `kind` and `message` go into each of its requests' `error`."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


def _size(n: int) -> str:
    return f"{n / 2**30:g} GiB" if n >= 2**30 else f"{n / 2**20:g} MiB"


class Worker:
    """One worker process and its memory watchdog; after any failure it is killed, never reused."""

    def __init__(self, settings: Settings, db_name: str, forks: Forks):
        self.settings, self.db_name, self.forks = settings, db_name, forks
        self.process: Started | None = None
        self.over_memory = False
        self._watchdog: asyncio.Task | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def start(self) -> None:
        config = {"uri": self.settings.uri, "db": self.db_name, "work_dir": str(self.settings.home / "serving"),
                  "limits": self.settings.limits.model_dump(mode="json"), "disk_bytes": self.settings.serving_disk_bytes,
                  "memory_bytes": self.settings.serving_memory_bytes}
        ours, theirs = socket.socketpair()
        try:
            self.process = await self.forks.start("training.worker:serve", theirs, config, {})
        finally:
            theirs.close()  # the worker holds its end: when it dies, reads here end
        self._reader, self._writer = await asyncio.open_unix_connection(sock=ours, limit=MAX_LINE)
        self._watchdog = asyncio.create_task(self._watch())
        log.info("serving worker started (pid %d)", self.process.pid)

    async def _watch(self) -> None:
        """Kill the worker once its resident memory passes the operator's cap."""
        while self.process.returncode is None:
            if _resident_bytes(self.process.pid) > self.settings.serving_memory_bytes:
                self.over_memory = True
                self.process.kill()
                return
            await asyncio.sleep(WATCH_S)

    async def call(self, command: dict, timeout: float, late: Failure, doing: str,
                   on_partial: Callable[[list], Awaitable[None]] | None = None) -> dict:
        """Send one command and wait for its reply, handing any partial answers to `on_partial`; past
        `timeout` (raising `late`), a memory kill or the worker's death kill it and raise `Failure`."""
        try:
            reply = await asyncio.wait_for(self._exchange(command, on_partial), timeout)
        except TimeoutError:
            await self.kill()
            raise late from None
        except ValueError:  # a reply line over MAX_LINE, or not JSON
            await self.kill()
            raise Failure("worker_crashed", f"the serving worker's reply was unreadable while {doing}") from None
        except BaseException:  # cancelled (the daemon stops): a worker mid-command is never left running
            await self.kill()
            raise
        if reply is None:
            await self.kill()
            raise self._death(doing)
        return reply

    async def _exchange(self, command: dict, on_partial) -> dict | None:
        """The reply; None when the worker is gone. Partial answers before it go to `on_partial`."""
        try:
            self._writer.write(json_util.dumps(command).encode() + b"\n")
            await self._writer.drain()
        except (BrokenPipeError, ConnectionResetError):
            return None
        while True:
            try:
                line = await self._reader.readline()
            except ConnectionResetError:  # a socket, unlike a pipe, may say so when the worker dies
                return None
            reply = json_util.loads(line) if line else None
            if reply is None or "partial" not in reply:
                return reply
            if on_partial is not None:
                await on_partial(reply["partial"])

    def _death(self, doing: str) -> Failure:
        if self.over_memory:
            cap = self.settings.serving_memory_bytes
            return Failure("memory_limit", f"{doing} needed more than the operator's limit of {_size(cap)} of memory "
                                           "(MONGOTUNE_SERVING_MEMORY_BYTES); ask for a smaller model or fewer tokens")
        code = self.process.returncode
        how = f"exit code {code}" if code is None or code >= 0 else f"signal {-code}"
        return Failure("worker_crashed", f"the serving worker stopped ({how}) while {doing}; the next request "
                                         "gets a fresh one")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def kill(self) -> None:
        if self._watchdog:
            self._watchdog.cancel()
        if self.process:
            await stop_child(self.process, KILL_GRACE_S)
        if self._writer:
            self._writer.close()


def _resident_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            line = next((line for line in status if line.startswith("VmRSS:")), "VmRSS: 0 kB")
    except OSError:
        return 0
    return int(line.split()[1]) * 1024
