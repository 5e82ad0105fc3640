"""Taking pending requests a batch at a time: few round trips, fair across models, no more than serving answers soon.

Anything that may mean new pending requests (a change event, a stream opened again, room freed in
serving, the periodic scan, a requeue) calls `wake`; wake-ups during a round make one more round, not
one each. A round costs the database the same whatever its size:

1. one `find` of pending requests, at most as many as serving has room for, leaving out the models
   whose share of this daemon is full (`$nin`), so one model's flood never hides another model's
   lone request;
2. one `update_many` that moves those still pending, not cancelled and not out of attempts to
   `running` under this daemon's lease, marked with this claim's id;
3. only if that moved fewer than it was given (another daemon took some first): one `find` of
   the ids this claim got.

So daemons that race split a burst between them instead of each wasting a claim per request, and a
daemon whose serving is full claims nothing: it leaves the work to daemons that can answer it soon.
A request is parsed once claimed; an invalid one fails naming its field.
"""

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import Callable

from pymongo.errors import PyMongoError

from listener.leases import fail_malformed, lease
from listener.records import BadRecord, RequestState, SkipLog, parse
from listener.status import REQUEST_TRANSITIONS, Status, now, status_filter, transition, transition_many
from training import defaults, ids
from training.config import RequestSpec, SpecError, parse_request

log = logging.getLogger(__name__)

MAX_FINDS = 4  # per round: a burst raced by other daemons, or full models to leave out, then the next wake-up


class Intake:
    """Claims pending requests for `serving` whenever woken, while it has room."""

    def __init__(self, db, settings, owner: str, serving, counters: dict, skipped: SkipLog,
                 stopping: Callable[[], bool]):
        self.requests = db[defaults.REQUESTS]
        self.settings, self.owner, self.serving, self.counters, self.skipped = settings, owner, serving, counters, skipped
        self.stopping = stopping
        self._woken = asyncio.Event()

    def wake(self) -> None:
        self._woken.set()

    async def run(self) -> None:
        """Claim rounds until cancelled; a round that fails on the database waits for the next wake-up."""
        while True:
            await self._woken.wait()
            self._woken.clear()
            if self.stopping():
                continue
            try:
                with self.serving.arrivals:  # a batch waits for the requests a claim in progress brings
                    await self.round()
            except PyMongoError as exc:
                log.warning("cannot claim pending requests: %s", exc)

    async def round(self) -> int:
        """Claim what serving has room for; how many requests this round handed it."""
        handed, full = 0, {ids.key(model): model for model in self.serving.full_models()}
        for _ in range(MAX_FINDS):
            free = self.serving.free()
            if free <= 0:
                break
            query = status_filter(Status.PENDING)
            if full:
                query = {**query, "model": {"$nin": list(full.values())}}
            documents = await self.requests.find(query).limit(free).to_list()
            chosen = await self._choose(documents, full)
            claimed = await self._claim(chosen) if chosen else []
            for document in claimed:
                handed += await self._hand_over(document)
            if len(documents) < free and len(claimed) == len(chosen):
                break  # every pending request was seen and nobody raced for them
        return handed

    async def _choose(self, documents: list[dict], full: dict) -> list[dict]:
        """The documents to claim; those that end here (malformed, cancelled, out of attempts) end now.

        A model whose share is reached joins `full` (by `ids.key`), which the next find leaves out; only
        plain ids can be left out, and a request naming anything else fails once claimed.
        """
        chosen, taking = [], Counter()
        for document in documents:
            try:
                state = parse(RequestState, document)
            except BadRecord as exc:
                await fail_malformed(self.requests, REQUEST_TRANSITIONS, document.get("_id"), Status.PENDING, exc,
                                     self.skipped)
                continue
            if state.cancel:
                await transition(self.requests, state.id, Status.PENDING, Status.CANCELLED, REQUEST_TRANSITIONS,
                                 unset=("cancel",))
                continue
            if state.attempts >= self.settings.max_attempts:
                await self._give_up(state)
                continue
            model = document.get("model")
            key = ids.key(model)
            if taking[key] >= self.serving.room_for(model):
                if _plain(model):
                    full[key] = model
                continue
            taking[key] += 1
            chosen.append(document)
        return chosen

    async def _claim(self, documents: list[dict]) -> list[dict]:
        """The documents this daemon now holds (as read before the claim), out of `documents`."""
        claim, wanted = uuid.uuid4().hex, [document["_id"] for document in documents]
        moved = await transition_many(
            self.requests, wanted, Status.PENDING, Status.RUNNING, REQUEST_TRANSITIONS,
            match={"cancel": {"$ne": True}, "attempts": {"$not": {"$gte": self.settings.max_attempts}}},
            fields={"lease": {**lease(self.owner, self.settings.request_lease_s), "claim": claim},
                    "started_at": now()},
            inc={"attempts": 1})
        if moved == len(documents):  # ids are unique: every one moved, so every one is this claim's
            return documents
        by_key = {ids.key(document["_id"]): document for document in documents}
        got = self.requests.find({"_id": {"$in": wanted}, "lease.claim": claim}, {"_id": 1})
        return [by_key[ids.key(row["_id"])] async for row in got]

    async def _hand_over(self, document: dict) -> int:
        """Give a claimed request to serving, or fail it if it is not a valid request; 1 if handed over."""
        try:
            spec: RequestSpec = parse_request(document, self.settings.limits)
        except SpecError as exc:
            self.counters["requests_failed"] += 1
            await transition(self.requests, document["_id"], Status.RUNNING, Status.FAILED, REQUEST_TRANSITIONS,
                             match={"lease.owner": {"$eq": self.owner}}, fields={"error": exc.as_error()},
                             unset=("lease",))
            log.info("%s %.200r is invalid: %s", defaults.REQUESTS, document["_id"], exc)
            return 0
        self.serving.submit(spec)
        return 1

    async def _give_up(self, state: RequestState) -> None:
        error = {"type": "too_many_attempts", "message": f"{state.attempts} attempts to answer this request did not "
                 "finish (each time its daemon stopped or its worker was killed); insert a new request to try again"}
        await transition(self.requests, state.id, Status.PENDING, Status.FAILED, REQUEST_TRANSITIONS,
                         fields={"error": error})


def _plain(model) -> bool:
    try:
        ids.check(model)
    except ids.BadId:
        return False
    return True
