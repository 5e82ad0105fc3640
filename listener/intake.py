"""Taking pending requests a batch at a time: few round trips, fair across models, no more than serving answers soon.

Anything that may mean new pending requests (a change event, a stream opened again, room freed in
serving, the periodic scan, a requeue) calls `wake`; wake-ups during a round make one more round, not
one each. A round costs the database the same whatever its size:

1. one `find` of pending requests per kind of request with room, at most as many as serving has room
   for, leaving out the models whose share of this daemon is full (`$nin`), so one model's flood never
   hides another model's lone request. Requests over a collection, which run long (watching ones until
   cancelled), are claimed against places of their own (`Queues.free(collection=True)`), in a find of
   their own, so a flood of them (junk included) never fills the finds of interactive requests; their
   shares are a model's over one collection (`$nor` of the full pairs), so requests naming a model over one
   collection never hide that model's requests over other collections (whoever writes them: a writer may
   fill the pair of another's model and another's listed collection);
2. one `update_many` that moves those still pending, not cancelled and not out of attempts to
   `running` under this daemon's lease, marked with this claim's id;
3. only if that moved fewer than it was given (another daemon took some first): one `find` of
   the ids this claim got.

So daemons that race split a burst between them instead of each wasting a claim per request, and a
daemon whose serving is full claims nothing: it leaves the work to daemons that can answer it soon. Nor
does a daemon whose serving worker has not started yet (`warm_first`): the first pending request it chooses that
names a model that exists starts the worker, and such requests are claimed once that runs; those that can only fail
are ended meanwhile without one.
Finds read raw BSON and decode each document on its own, so one nested deeper than the listener reads
(which the driver may not even decode) fails alone, by its id, before the claim. A request is parsed
once claimed; an invalid one fails naming its field. Before the claim, only what the claim itself needs
is checked: an id over 1 kB fails at once (a batch's ids travel in one command), a
request naming anything but a plain model id is claimed whatever that value's share (it fails once
claimed; `$nin` could not leave it out), and a request the server refuses to change (one just under
16 MB cannot take a lease) is logged once and left out of this daemon's finds for a while. A round
whose finds came back full to the last, and that ended or claimed some, wakes the loop again: requests
that fail free no room in serving, and nothing else would wake it before the periodic scan.
"""

import asyncio
import logging
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable

from bson.errors import BSONError
from bson.raw_bson import RawBSONDocument
from pymongo.errors import OperationFailure, PyMongoError

from listener.batching import share_of
from listener.leases import fail_malformed, fail_undecodable, lease
from listener.records import BadRecord, RequestState, SkipLog, decoded, parse, raw, raw_id
from listener.status import (REQUEST_TRANSITIONS, Status, now, query_for, status_filter, transition, transition_each,
                             transition_many, update_for)
from training import defaults, ids
from training.config import SpecError, check_request_id, parse_request

log = logging.getLogger(__name__)

MAX_FINDS = 4  # per round: a burst raced by other daemons, or full models to leave out, then the next wake-up
# A request over a collection or not, as the server tells them apart (an array holding a string is a `string`);
# each kind is claimed against its own places in serving. A value other than a string fails once claimed.
KINDS = {False: {"collection": {"$not": {"$type": "string"}}}, True: {"collection": {"$type": "string"}}}
MAX_STUCK = 1_000  # pending requests the server refused to change, left out of this daemon's finds (ids <= 1 kB)
STUCK_S = 60.0  # for this long, then tried again (the refusal may have been the server's passing trouble)


class Intake:
    """Claims pending requests for `serving` whenever woken, while it has room."""

    def __init__(self, db, settings, owner: str, serving, counters: dict, skipped: SkipLog,
                 stopping: Callable[[], bool], warm_first: bool = False):
        self.requests, self.models = db[defaults.REQUESTS], db[defaults.MODELS]
        self.raw_requests = raw(self.requests)  # read undecoded: see `_pending`
        self.settings, self.owner, self.serving, self.counters, self.skipped = settings, owner, serving, counters, skipped
        self.stopping = stopping
        self.warm_first = warm_first  # nothing a worker answers is claimed before it runs (`_until_warm`)
        self._woken = asyncio.Event()
        # Pending requests no write could move (one just under 16 MB cannot take a lease): every find would
        # return them first again, so they are left out for a while, by id, oldest forgotten first.
        self._stuck: OrderedDict[str, tuple[object, float]] = OrderedDict()

    def wake(self) -> None:
        self._woken.set()

    async def run(self) -> None:
        """Claim rounds until cancelled; a round that fails, on the database or on one document, waits for the next
        wake-up (the periodic scan is one)."""
        while True:
            await self._woken.wait()
            self._woken.clear()
            if self.stopping():
                continue
            try:
                with self.serving.arrivals:  # a batch waits for the requests a claim in progress brings
                    await self.round()
            except (PyMongoError, BSONError) as exc:  # BSONError: a command too large for the server (DocumentTooLarge)
                log.warning("cannot claim pending requests: %s", exc)
            except Exception:  # whatever one document makes a round raise ends that round, never the daemon's intake
                log.exception("a claim round failed; the next wake-up tries again")

    async def round(self) -> int:
        """Claim what serving has room for; how many requests this round handed it."""
        queues, handed, progressed = self.serving.queues, 0, False
        full = {kind: {ids.key(share): share for share in queues.full(kind)} for kind in KINDS}
        more = set(KINDS)  # the kinds that may have pending requests this round has not seen
        for _ in range(MAX_FINDS):
            free = {kind: places for kind in more if (places := queues.free(kind)) > 0}
            if not free:
                break
            found = {kind: await self._pending(kind, places, full[kind]) for kind, places in free.items()}
            chosen, ended = await self._choose([document for kind in free for document in found[kind]], full, free)
            waiting = await self._until_warm(chosen)
            chosen = [document for document in chosen if not any(document is other for other in waiting)]
            claimed = await self._claim(chosen) if chosen else []
            handed += await self._hand_over(claimed)
            progressed = progressed or bool(ended or claimed)
            if waiting:
                break  # they stay pending until the worker runs, which wakes this loop (`Seat.warm_up`)
            raced = len(claimed) < len(chosen)  # another daemon took some: their places are still free here
            more = {kind for kind, places in free.items() if len(found[kind]) == places or raced}
            if not more:
                self.serving.arrivals.all_claimed()  # nothing inserted with them is left to wait for
                break  # every pending request was seen and nobody raced for them
        else:
            # Finds came back full to the last: more may be pending. Requests that ended here (invalid,
            # cancelled, out of attempts) free no room in serving, so nothing else would wake this loop
            # before the periodic scan: another round, for as long as rounds make progress.
            if progressed:
                self.wake()
        return handed

    async def _until_warm(self, chosen: list[dict]) -> list[dict]:
        """Of the requests chosen to claim, those that wait for serving's worker to run, whose start this begins
        (`warm_first`, every daemon's intake): the ones naming a model that exists, so that none waits in a daemon
        still importing its libraries while another daemon could answer it at once. The others can only fail
        (no such model, an id of no model's shape) and are claimed and ended without a worker: a daemon that only
        ever sees those never pays for its imports."""
        if not self.warm_first or self.serving.seat.started:
            return []
        named = {ids.key(model): model for document in chosen if _plain(model := document.get("model"))}
        if not named:
            return []
        found = self.models.find({"_id": {"$in": list(named.values())}}, {"_id": 1})
        existing = {ids.key(model["_id"]) async for model in found}
        waiting = [document for document in chosen
                   if _plain(document.get("model")) and ids.key(document["model"]) in existing]
        if waiting:
            self.serving.seat.warm_up(self.wake)
        return waiting

    async def _pending(self, kind: bool, places: int, full: dict) -> list[RawBSONDocument]:
        """Up to `places` pending requests of one kind, undecoded: a kind's flood (junk included) fills only its own
        find, and one document the driver cannot decode fails alone in `_choose`."""
        query = {**status_filter(Status.PENDING), **_of_kind(kind, full)}
        if self._stuck:
            query["_id"] = {"$nin": self._left_out()}
        return await self.raw_requests.find(query).limit(places).to_list()

    async def _choose(self, documents: list[RawBSONDocument], full: dict, free: dict) -> tuple[list[dict], int]:
        """The documents to claim (decoded), and how many ended here instead (undecodable, malformed, cancelled,
        out of attempts).

        Each kind of request takes at most its `free` places. A share (`batching.share_of`: a model, or a model
        over a collection) whose places of its kind are taken joins `full[kind]` (by `ids.key`), which the next
        find leaves out; only plain ids and collection names can be left out, and a request naming anything
        else fails once claimed.
        """
        chosen, taking, ended = [], Counter(), 0
        for raw_document in documents:
            try:
                document = decoded(raw_document)
            except SpecError as exc:
                ended += await self._fail_undecodable(raw_document, exc)
                continue
            try:
                state = parse(RequestState, document)
            except BadRecord as exc:
                ended += await fail_malformed(self.requests, REQUEST_TRANSITIONS, document.get("_id"), Status.PENDING,
                                              exc, self.skipped)
                continue
            try:
                if state.cancel:
                    ended += await transition(self.requests, state.id, Status.PENDING, Status.CANCELLED,
                                              REQUEST_TRANSITIONS, unset=("cancel",)) is not None
                    continue
                if state.attempts >= self.settings.max_attempts:
                    ended += await self._give_up(state)
                    continue
                try:
                    check_request_id(state.id)  # before the claim, which lists every id of the batch
                except SpecError as exc:
                    ended += await transition(self.requests, state.id, Status.PENDING, Status.FAILED,
                                              REQUEST_TRANSITIONS, fields={"error": exc.as_error()}) is not None
                    continue
            except OperationFailure as exc:
                self._refused(state.id, exc)
                continue
            kind = _over_collection(document)
            if taking[kind] >= free.get(kind, 0):
                continue  # its kind has no more places here: it stays pending
            share = _share(document, kind)
            if share is not None:  # anything else fails once claimed: it takes no share, and a find could not skip it
                key = ids.key(share)
                if taking[kind, key] >= self.serving.queues.room_for(share, kind):
                    full[kind][key] = share
                    continue
                taking[kind, key] += 1
            taking[kind] += 1
            chosen.append(document)
        return chosen, ended

    async def _claim(self, documents: list[dict]) -> list[dict]:
        """The documents this daemon now holds (as read before the claim), out of `documents`."""
        claim, wanted = uuid.uuid4().hex, [document["_id"] for document in documents]
        change = {"match": {"cancel": {"$ne": True}, "attempts": {"$not": {"$gte": self.settings.max_attempts}}},
                  "fields": {"lease": {**lease(self.owner, self.settings.request_lease_s), "claim": claim},
                             "started_at": now()},
                  "inc": {"attempts": 1}}
        try:
            moved = await transition_many(self.requests, wanted, Status.PENDING, Status.RUNNING, REQUEST_TRANSITIONS,
                                          **change)
        except OperationFailure as exc:
            # One document the server cannot change ends the update_many there, the ones before it moved:
            # keep those, and claim the others one at a time, leaving out any the server refuses again.
            log.info("claiming %d request(s) one at a time: %.300s", len(documents), exc)
            got = await self._claimed(documents, claim)
            held = {ids.key(document["_id"]) for document in got}
            for document in documents:
                if ids.key(document["_id"]) in held:
                    continue
                try:
                    if await transition(self.requests, document["_id"], Status.PENDING, Status.RUNNING,
                                        REQUEST_TRANSITIONS, **change) is not None:
                        got.append(document)
                except OperationFailure as again:
                    self._refused(document["_id"], again)
            return got
        if moved == len(documents):  # ids are unique: every one moved, so every one is this claim's
            return documents
        return await self._claimed(documents, claim)

    async def _claimed(self, documents: list[dict], claim: str) -> list[dict]:
        """Those of `documents` that claim `claim` moved (read back)."""
        by_key = {ids.key(document["_id"]): document for document in documents}
        got = self.requests.find({"_id": {"$in": [document["_id"] for document in documents]}, "lease.claim": claim},
                                 {"_id": 1})
        return [by_key[ids.key(row["_id"])] async for row in got]

    def _refused(self, doc_id, exc: OperationFailure) -> None:
        """A pending request the server refused to change: logged once, and left out of this daemon's finds."""
        self.skipped.skip(f"claim {defaults.REQUESTS}", doc_id, exc)
        try:
            check_request_id(doc_id)  # an id too long for a find to list stays where it is
        except SpecError:
            return
        key = ids.key(doc_id)
        self._stuck.pop(key, None)
        self._stuck[key] = (doc_id, time.monotonic() + STUCK_S)
        while len(self._stuck) > MAX_STUCK:
            self._stuck.popitem(last=False)

    def _left_out(self) -> list:
        """The ids of the stuck requests to leave out of a find now."""
        clock = time.monotonic()
        while self._stuck and next(iter(self._stuck.values()))[1] <= clock:
            self._stuck.popitem(last=False)
        return [doc_id for doc_id, _ in self._stuck.values()]

    async def _hand_over(self, claimed: list[dict]) -> int:
        """Give claimed requests to serving, and fail those that are not valid requests, in one bulk write;
        how many were handed over."""
        specs, invalid = [], []
        for document in claimed:
            try:
                specs.append(parse_request(document, self.settings.limits))
            except SpecError as exc:
                log.info("%s %.200r is invalid: %s", defaults.REQUESTS, document["_id"], exc)
                invalid.append((query_for(document["_id"], Status.RUNNING, {"lease.owner": {"$eq": self.owner}}),
                                update_for(Status.RUNNING, Status.FAILED, REQUEST_TRANSITIONS,
                                           fields={"error": exc.as_error()}, unset=("lease",))))
        self.counters["requests_failed"] += len(invalid)
        for spec in specs:
            self.serving.submit(spec)
        await transition_each(self.requests, invalid)
        return len(specs)

    async def _fail_undecodable(self, document: RawBSONDocument, exc: SpecError) -> bool:
        try:
            return await fail_undecodable(self.requests, REQUEST_TRANSITIONS, document, exc, self.skipped)
        except OperationFailure as again:  # it had an id: left out of the finds instead
            self._refused(raw_id(document), again)
            return False

    async def _give_up(self, state: RequestState) -> bool:
        error = {"type": "too_many_attempts", "message": f"{state.attempts} attempts to answer this request did not "
                 "finish (each time its daemon stopped or its worker was killed); insert a new request to try again"}
        return await transition(self.requests, state.id, Status.PENDING, Status.FAILED, REQUEST_TRANSITIONS,
                                fields={"error": error}) is not None


def _of_kind(kind: bool, full: dict) -> dict:
    """The pending requests of one kind (see `KINDS`) to find, leaving out the shares that are full: models, or
    models over a collection (at most `max_collection_jobs` of them)."""
    if not full:
        return KINDS[kind]
    if not kind:
        return {**KINDS[kind], "model": {"$nin": list(full.values())}}
    return {**KINDS[kind], "$nor": [{"model": {"$eq": model}, "collection": {"$eq": collection}}
                                    for model, collection in full.values()]}


def _share(document: dict, kind: bool):
    """The share (`batching.share_of`) a pending request would take, or None where it names no plain model (or,
    over a collection, no plain collection name): such a request fails once claimed."""
    model, collection = document.get("model"), document.get("collection")
    if not _plain(model) or kind and not isinstance(collection, str):
        return None
    return share_of(model, collection if kind else None)


def _over_collection(document: dict) -> bool:
    """Whether `KINDS[True]` matches the document: the server takes an array holding a string for a string."""
    value = document.get("collection")
    return isinstance(value, str) or isinstance(value, list) and any(isinstance(item, str) for item in value)


def _plain(model) -> bool:
    try:
        ids.check(model)
    except ids.BadId:
        return False
    return True
