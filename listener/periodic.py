"""Periodic work with one owner: APScheduler decides when, this owner runs the jobs and awaits them at close.

APScheduler's own shutdown cancels the coroutines it started and never awaits them, so a heartbeat
or a reap could be cut off mid-write at exit. Here the scheduler only fires: each firing starts a
task this owner tracks, a job still running when it fires again is skipped, and `close` stops the
firing, then waits for what is running (cancelling it past a deadline, until it has ended).
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.interval import IntervalTrigger

from listener.tasks import cancel_and_wait

log = logging.getLogger(__name__)

Job = Callable[[], Awaitable[None]]


class Periodic:
    def __init__(self):
        self.scheduler = AsyncIOScheduler()
        self.running: dict[str, asyncio.Task] = {}

    def every(self, seconds: float, job: Job, name: str | None = None) -> None:
        self.add(IntervalTrigger(seconds=seconds), job, name)

    def add(self, trigger: BaseTrigger, job: Job, name: str | None = None) -> str:
        """Run `job` at each of `trigger`'s times; returns its name, which `remove` takes."""
        name = name or getattr(job, "__qualname__", repr(job))

        async def fire() -> None:  # returns at once: APScheduler may cancel it, never the job's own task
            if name in self.running:
                log.debug("%s is still running; skipping this tick", name)
                return
            task = asyncio.create_task(self._run(name, job))
            self.running[name] = task
            task.add_done_callback(lambda _: self.running.pop(name, None))

        # A loop busy for a while fires late rather than never; missed ticks collapse into one.
        self.scheduler.add_job(fire, trigger, id=name, replace_existing=True, misfire_grace_time=60, coalesce=True)
        return name

    def remove(self, name: str) -> None:
        if self.scheduler.get_job(name) is not None:
            self.scheduler.remove_job(name)

    @staticmethod
    async def _run(name: str, job: Job) -> None:
        try:
            await job()
        except asyncio.CancelledError:
            raise
        except Exception:  # one failed tick is logged; the next tick tries again
            log.exception("periodic job %s failed", name)

    def start(self) -> None:
        self.scheduler.start()

    async def close(self, timeout_s: float) -> None:
        """Stop firing, then wait up to `timeout_s` for running jobs; cancel what is left, for as long again."""
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        tasks = list(self.running.values())
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=timeout_s)
        await cancel_and_wait(late, timeout_s, "periodic jobs")  # a cancel can be lost: `listener.tasks`
