"""The daemon's one serving worker, taken in turn: request batches, preloads and collection chunks each send their
commands while they hold `turn`, so one command at a time reaches the worker (`listener.serving_worker`).

The worker is started when first needed (or early, `warm_up`), again after it died or was killed, and every command
runs within the operator's limit for it, past which the worker is killed and the command fails naming the setting.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable

from listener.forks import Forks
from listener.serving_worker import Failure, Worker
from listener.settings import Settings

log = logging.getLogger(__name__)


class Seat:
    """Holds the worker, starts it on demand and asks it one command at a time, under `turn`."""

    def __init__(self, settings: Settings, db_name: str, forks: Forks):
        self.settings, self.db_name, self.forks = settings, db_name, forks
        self.turn = asyncio.Lock()  # one command at a time to the worker: batches, preloads, collection chunks
        self.worker: Worker | None = None
        self.started = False  # a worker has started here, or tried to: see `warm_up`
        self.warming: asyncio.Task | None = None

    def warm_up(self, on_started: Callable[[], None]) -> None:
        """Start the worker before the first claim, then call `on_started` (the intake's wake-up), which claims
        nothing until `started`: a request claimed by a daemon still starting its worker (seconds of imports, more
        on a busy host) would wait that long while another daemon could answer it at once. A worker that cannot
        start, however it fails, counts as started all the same, so that the daemon's requests fail saying why
        instead of staying pending while it heartbeats."""
        if self.warming is None:
            self.warming = asyncio.create_task(self._warm(on_started))

    async def _warm(self, on_started: Callable[[], None]) -> None:
        try:
            async with self.turn:
                await self.running_worker()
        except Failure as exc:
            log.warning("%s; claiming requests anyway, so that they fail saying so", exc.message)
        except Exception:
            log.exception("the serving worker could not start; claiming requests anyway, so that they fail saying so")
        finally:
            self.started = True
            on_started()

    async def ask(self, command: dict, doing: str, timeout_setting: str,
                  on_partial: Callable[[list], Awaitable[None]] | None = None) -> dict:
        """One command to the worker (started if there is none) within the operator's `timeout_setting`, past which
        the worker is killed; a reply that says it failed raises `Failure`. The caller holds `turn`."""
        timeout = getattr(self.settings, timeout_setting)
        late = Failure("request_timeout", f"{doing} took longer than the operator's limit of {timeout:g} s "
                                          f"(MONGOTUNE_{timeout_setting.upper()})")
        reply = await (await self.running_worker()).call(command, timeout, late, doing, on_partial)
        if not reply.get("ok"):
            raise Failure(reply["error"]["type"], reply["error"]["message"])
        return reply

    async def running_worker(self) -> Worker:
        """The worker, started if there is none or it died; `Failure` if it cannot start."""
        if self.worker is None or not self.worker.alive:
            await self.close()
            self.worker = Worker(self.settings, self.db_name, self.forks)
            try:
                await self.worker.start()
            except OSError as exc:
                raise Failure("worker_crashed", f"the serving worker could not start ({exc.strerror})") from None
            self.started = True
        return self.worker

    async def close(self) -> None:
        """Stop the worker (SIGTERM, then SIGKILL): a stopping daemon never waits for a generation."""
        worker, self.worker = self.worker, None
        if worker:
            await worker.kill()
