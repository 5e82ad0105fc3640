"""Stopping asyncio tasks for good: a cancellation can be lost, so it is repeated until the task has ended.

On Python 3.10 and 3.11, `asyncio.wait_for` returns the inner result instead of raising CancelledError
when the task awaiting it is cancelled in the loop tick in which the inner awaitable completes
(python/cpython#86296; 3.12 rewrote `wait_for` on `asyncio.timeout`). PyMongo's async driver awaits
`wait_for` around every socket it opens (`pool_shared._async_create_connection`), so a task cancelled
just as its operation gets a new connection carries on as if it had never been cancelled. A loop that
only ends by cancellation, like a change stream's, then runs forever, and a `gather` on it never returns.
"""

import asyncio
import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)

RECANCEL_S = 1.0  # a cancelled task still running after this long is cancelled again


async def cancel_and_wait(tasks: Iterable[asyncio.Task], timeout_s: float, what: str = "tasks") -> set[asyncio.Task]:
    """Cancel `tasks` and wait until they have ended, at most `timeout_s`; returns those still running then.

    A task still running `RECANCEL_S` after its cancellation is cancelled again, so one that lost a
    cancellation takes the next. For tasks whose cancellation needs no long cleanup (a repeated cancel
    interrupts it): loops over streams and queries, not a task that stops a child process.
    Exceptions of the tasks are retrieved and dropped, as `gather(..., return_exceptions=True)` would.
    """
    tasks = list(tasks)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    running, rounds = {task for task in tasks if not task.done()}, 0
    while running:
        if rounds:
            log.debug("%s still running after a cancel, cancelling again: %s", what, _names(running))
        rounds += 1
        for task in running:
            task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            break
        _, running = await asyncio.wait(running, timeout=min(RECANCEL_S, left))
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" at exit
    if running:
        log.warning("%d of the %s still running %.0f s after being cancelled; leaving them: %s",
                    len(running), what, timeout_s, _names(running))
    return running


def _names(tasks: set[asyncio.Task]) -> str:
    return ", ".join(sorted(task.get_name() for task in tasks))
