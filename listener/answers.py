"""How a claimed request ends: the writes that record it `done` or `failed`, only while this daemon's lease holds it,
a batch's endings in one round trip, and the growing `output` of streamed requests.

Every write here matches the request's `running` status and this daemon's `lease.owner`: a daemon that was paused
or cut off past its lease never overwrites what the daemon that took the request over wrote.
"""

import logging
import time
from collections.abc import Awaitable, Callable

from pymongo import UpdateOne
from pymongo.errors import PyMongoError

from listener.batching import Queued
from listener.status import REQUEST_TRANSITIONS, Status, now, query_for, transition_each, update_for
from training import defaults, ids
from training.config import SpecError

log = logging.getLogger(__name__)

Ending = tuple[dict, dict]  # a query and its update, for `transition_each`


class Answers:
    """Writes the endings of the requests this daemon holds, and counts them (`counters`, `on_answered`)."""

    def __init__(self, db, owner: str, counters: dict):
        self.requests, self.owner, self.counters = db[defaults.REQUESTS], owner, counters
        self.on_answered: Callable[[float], None] | None = None  # metrics: seconds from claim to done

    def _held(self, request_id) -> dict:
        return query_for(request_id, Status.RUNNING, {"lease.owner": {"$eq": self.owner}})

    def failed(self, request_id, message: str, type: str, **error) -> Ending:
        """The write that ends a request as failed; `error` may name the `field` to change."""
        self.counters["requests_failed"] += 1
        return (self._held(request_id),
                update_for(Status.RUNNING, Status.FAILED, REQUEST_TRANSITIONS,
                           fields={"error": {"type": type, "message": message, **error}}, unset=("lease",)))

    def done(self, item: Queued, result: dict, used, batch_size: int, timing: dict) -> Ending:
        """The write that ends an answered request."""
        self.counters["requests_done"] += 1
        latency_s = time.monotonic() - item.since
        if self.on_answered:
            self.on_answered(latency_s)
        return (self._held(item.spec.id),
                update_for(Status.RUNNING, Status.DONE, REQUEST_TRANSITIONS,
                           fields={"output": result["output"], "finish_reason": result["finish_reason"],
                                   "usage": result["usage"], "checkpoint_used": used,
                                   "batch_size": batch_size, "completed_at": now(), "timing": timing,
                                   "latency_ms": round(latency_s * 1000, 1)},
                           unset=("lease",)))

    async def end(self, writes: list[Ending]) -> None:
        """Write requests' endings in one round trip; say so when some were no longer this daemon's to end."""
        written = await transition_each(self.requests, writes)
        if written < len(writes):
            log.warning("%d of %d answer(s) not written: their requests were taken over by another daemon "
                        "(this one was paused or cut off past its heartbeat or lease)", len(writes) - written,
                        len(writes))

    async def fail(self, request_id, message: str, kind: str = "invalid_request") -> None:
        await self.end([self.failed(request_id, message, kind)])

    async def refuse(self, request_id, exc: SpecError) -> None:
        """End a request whose document names what it may not, with the error intake writes for one it cannot parse."""
        await self.end([self.failed(request_id, **exc.as_error())])

    def partial_writer(self, batch: list[Queued]) -> Callable[[list], Awaitable[None]]:
        """Writes the growing `output` of the batch's streamed requests, each only when its text changed."""
        written: dict[int, str] = {}

        async def write(texts: list) -> None:
            updates = []
            for n, (item, text) in enumerate(zip(batch, texts)):
                if item.spec.stream and text and written.get(n) != text:
                    written[n] = text
                    updates.append(UpdateOne({"_id": ids.eq(item.spec.id), "status": Status.RUNNING.value,
                                              "lease.owner": {"$eq": self.owner}}, {"$set": {"output": text}}))
            if updates:
                try:
                    await self.requests.bulk_write(updates, ordered=False)
                except PyMongoError as exc:  # a lost partial write costs nothing: the full answer follows
                    log.warning("could not write partial answers: %s", exc)
        return write
