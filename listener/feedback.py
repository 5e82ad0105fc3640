"""The feedback trigger: once `feedback.every` new ratings of a model's answers were written since its last run
started, one preference run starts (`trigger: "feedback"`, `training.feedback` reads its rows).

The count lives in the requests themselves, so nothing in a daemon's memory can be lost or counted twice: at each
retrain check every daemon stamps this model's rated, done answers that carry no stamp yet with `feedback_run: <the
model's run>` (at most `max_feedback_rows` a pass, by `_id`; a request is stamped once, by whichever daemon gets
there first), and the ended ones no run reads (left out by `feedback.filter`, of a shape no run uses, or not `done`)
with 0 (never counted, never looked at again), then counts the stamps of the current run on rated answers it selects
(`count_documents`; a stamp anyone wrote on anything else counts for nothing). On MongoDB the index `{model,
feedback_run, feedback.rating}`, over rated requests only, serves all three, so a pass reads only the ratings
written since the last one, however many requests the model has (the embedded server's planner uses no index for a
query with `$and` or `$jsonSchema`: it scans). A rating written while run R trains is stamped R and counts toward
the run after R; nothing is stamped while a run is pending (its number is not known yet): such ratings are stamped
once it is claimed and count toward the run after it (which comes a little early rather than late, as with
`retrain.on_new_documents`). `retrain.start` (`succeeded -> pending` at that run) makes the run start exactly once
across daemons. Before starting, the rows are read, newest first and only until they do, to see that they make a run
(DPO: at least `preferences.MIN_ROWS` pairs), and the ratings written since the pass stamped are stamped then,
toward the run that will read them; a model whose count has not moved since it had too few is not read again. Only
ratings of a shape a run uses are selected at all (`feedback.usable`, checked by the server). Ratings rewritten or
deleted between this check and the run's read end that run `nothing_to_train` (`training.feedback.NothingToTrain`):
the model serves as before and the ratings written after it count toward the next run. The operator's
`retrain_max_models` bounds how many models a daemon counts (succeeded or running ones), in the order it first saw
them (a model whose run is pending keeps its place; a failed or cancelled one holds none), an order it keeps in
`_listener` so that a restart keeps it too (as the retrainer keeps its tallies). A model whose turn is slow (SLOW_S:
its filter scans long) takes one turn among the slow ones each pass: a writer's many slow filters cost each pass one
turn.
"""

import asyncio
import logging
import time

from pydantic import BaseModel, ConfigDict, Field
from pymongo import UpdateOne
from pymongo.errors import BulkWriteError, DocumentTooLarge, ExecutionTimeout, OperationFailure

from listener.records import BadRecord, ModelState, SkipLog, parse, raw, raw_id
from listener.status import Status, now
from listener.turns import Queue, Sightings
from training import defaults, feedback, ids
from training.config import ModelSpec
from training.errors import briefly
from training.limits import Limits

log = logging.getLogger(__name__)

COUNTING = (Status.SUCCEEDED, Status.RUNNING)  # a run's number is known: ratings count toward the next
HOLD_NO_PLACE = (Status.FAILED, Status.CANCELLED)  # a person looks at those first; every other model keeps its place
QUERY_MS = 10_000  # each query of a model's pass: a filter or a flood that scans long gives up, and is tried again
SLOW_S = 2.0  # a model whose turn took longer (its filter scans long, or the server ignores QUERY_MS) is slow...
SLOW_PER_PASS = 1  # ...and slow models take this many turns a pass between them, the longest waiting first
ORDER = "feedback_order"  # `kind` of a daemon's stored order of the models it counts feedback for
ENOUGH_BATCH = 100  # rated answers read first to see whether they make a run: a model's first batch mostly does
DIGEST_CHARS = 32  # each model of the stored order: this much of the SHA-256 of its key, in hex


class StoredOrder(BaseModel):
    """A daemon's order of the models it counts feedback for, as stored in `_listener`: each model as `ids.digest` of
    its key, in the order first seen, and those of them that were counted."""

    model_config = ConfigDict(extra="ignore", strict=True)

    keys: list[str] = Field(default_factory=list)
    counted: list[str] = Field(default_factory=list)


def digest(key: str) -> str:
    """A model's key as the stored order holds it: of one small size, whatever the id."""
    return ids.digest(key, DIGEST_CHARS)


class FeedbackTrigger:
    """Counts ratings for the models with `feedback`; the retrainer calls `due` and starts what it returns."""

    def __init__(self, db, limits: Limits, max_models: int, skipped: SkipLog, daemon: str, slow_s: float = SLOW_S):
        self.db, self.limits, self.max_models, self.skipped, self.slow_s = db, limits, max_models, skipped, slow_s
        self.order_id = f"feedback:{daemon}"  # this daemon's stored order, in `_listener`
        self.stored: tuple[list, list] | None = None  # (order, counted) as last stored, digests (None: not read yet)
        self.slow = Queue(SLOW_PER_PASS)  # the slow models, by key: each waits for its turn from its last one
        self.sightings = Sightings()  # the order this daemon first saw the models in
        self.held: set[str] = set()  # the models counted since this daemon started, or stored before it did
        self.too_few: dict[str, tuple[int, int]] = {}  # by model key: (run, count) when its rows made no run
        self.past_bound = 0  # how many models there were when some were past the bound: logged when it changes

    async def due(self, models: dict[str, tuple[ModelSpec, ModelState]]) -> list[ModelState]:
        """The states of the models whose feedback run is due, each at the run it follows. Only models that can count
        (succeeded or running) take a place among the `max_models` counted, as with `retrain`."""
        placed = [key for key, (_, state) in models.items() if state.status not in HOLD_NO_PLACE]
        models = {key: (spec, state) for key, (spec, state) in models.items()
                  if state.status in COUNTING and state.run >= 1}
        # A model whose run waits to be claimed keeps its place in the order (a newcomer seen meanwhile stays behind
        # it): only failed and cancelled ones are forgotten, as by the retrainer.
        if self.stored is None:
            await self._restore(placed)
        ordered = self.sightings.order(placed)
        followed = [key for key in ordered if key in models][:self.max_models]
        await self._store(self._placed(ordered, followed))
        self.too_few = {key: seen for key, seen in self.too_few.items() if key in models}
        if len(models) > len(followed) and len(models) != self.past_bound:
            log.warning("counting feedback for %d of %d models (MONGOTUNE_RETRAIN_MAX_MODELS)", len(followed),
                        len(models))
        self.past_bound = len(models) if len(models) > len(followed) else 0
        due = []
        for key in self._turns(followed):
            spec, state = models[key]
            started = time.monotonic()
            try:
                if await self._due(key, spec, state):
                    due.append(state)
            except ExecutionTimeout as exc:  # a filter or a flood that scans long: tried again, as a slow model
                self.skipped.skip(f"feedback of run {state.run}", spec.id, exc)
            except OperationFailure as exc:  # its filter fails on the server
                self.skipped.skip(f"feedback of run {state.run}", spec.id, exc)
                await self._filter_refused(spec)
            except Exception as exc:  # noqa: BLE001  one model's pass never stops the others'
                if self.skipped.first(f"feedback of run {state.run}", spec.id):
                    log.exception("the feedback pass of %.200r failed: %.300s", spec.id, exc)
            if time.monotonic() - started > self.slow_s:
                if key not in self.slow:
                    log.warning("counting feedback for %.200r is slow (its feedback.filter scans long?): it takes one "
                                "turn among the slow models each pass, so it never delays the others'", spec.id)
                self.slow.wait(key)
            else:
                self.slow.leave(key)
        return due

    async def _restore(self, placed: list[str]) -> None:
        """Seen first, in their order: the models this daemon held places for when it last stored them. A record
        it cannot use (it is the listener's own, but a person may have edited it) is an order of none."""
        stored = StoredOrder()
        try:
            record = await self.db[defaults.LISTENER].find_one({"_id": self.order_id}, {"keys": 1, "counted": 1})
            stored = parse(StoredOrder, record) if record is not None else stored
        except (OperationFailure, BadRecord) as exc:
            self.skipped.skip("feedback order", self.order_id, exc)
        self.stored = (stored.keys, stored.counted)
        by_digest = {digest(key): key for key in placed}
        restored = [by_digest[d] for d in stored.keys[:self._bound()] if d in by_digest]
        self.sightings.remember(restored)
        counted = set(stored.counted)
        self.held = {key for key in restored if digest(key) in counted}

    async def _store(self, keys: list[str]) -> None:
        """Keep the order up to the last model counted (pending ones among them keep their places), and which of them
        were counted, when it changed: each model as a digest of its key, so that the record stays small (at most
        20,000 of 32 characters), whatever the ids (a key is the JSON of an id, up to 6 KB for 512 characters of
        emoji: 2,000 such made a record the driver refuses, which ended the pass for every model)."""
        keys = keys[:self._bound()]
        stored = ([digest(key) for key in keys], [digest(key) for key in keys if key in self.held])
        if stored == self.stored:
            return
        try:
            await self.db[defaults.LISTENER].update_one(
                {"_id": self.order_id},
                {"$set": {"kind": ORDER, "at": now(), "keys": stored[0], "counted": stored[1]}}, upsert=True)
            self.stored = stored
        except (OperationFailure, DocumentTooLarge) as exc:  # tried again next pass; counting goes on meanwhile
            self.skipped.skip("feedback order", self.order_id, exc)

    def _placed(self, ordered: list[str], followed: list[str]) -> list[str]:
        """The order to store: every model counted, and, among them, at most `max_models` whose runs wait, those
        counted before first (then the first others): however many models a writer keeps waiting ahead of them, the
        counted ones are all kept, and a counted one whose run waits too."""
        present, counting = set(ordered), set(followed)
        self.held = {key for key in self.held if key in present} | counting
        ahead = ordered[:ordered.index(followed[-1]) + 1] if followed else []
        waiting = [key for key in ahead if key not in counting]
        kept = counting | set(([key for key in waiting if key in self.held]
                               + [key for key in waiting if key not in self.held])[:self.max_models])
        return [key for key in ahead if key in kept]

    def _bound(self) -> int:
        """How many keys the stored order holds at most: the counted ones and the pending ones among them."""
        return 2 * self.max_models

    def _turns(self, followed: list[str]) -> list[str]:
        """The models counted this pass, in their order: every model that is not slow, and SLOW_PER_PASS slow ones,
        those waiting longest first. However many slow models one writer makes, they cost a pass one turn's time."""
        slow = set(self.slow.turns(key for key in followed if key in self.slow))
        return [key for key in followed if key not in self.slow or key in slow]

    async def _filter_refused(self, spec: ModelSpec) -> None:
        """Tell a model's writer, once, in its `warnings`, that the server refuses its `feedback.filter`."""
        if not spec.feedback.filter:
            return
        try:
            await self.db[defaults.REQUESTS].find_one({"$and": [{"model": ids.eq(spec.id)}, spec.feedback.filter]},
                                                      max_time_ms=QUERY_MS)  # never run over others' requests
        except ExecutionTimeout:
            return
        except OperationFailure as exc:
            await self.skipped.warn(self.db[defaults.MODELS], "feedback filter", spec.id,
                                    f"not counting feedback: the server refuses feedback.filter ({briefly(exc)})")

    async def _stamp(self, query: dict, stamp: int, at_most: int | None = None, as_bytes: bool = False) -> int:
        """Stamp at most `at_most` (`max_feedback_rows`) of the requests `query` selects, each by its `_id` (found in
        the index's order: a sort would read the whole flood): bounded work per pass, whatever a writer floods in (the
        rest wait for the next passes); how many were found. One a stamp cannot be written on (it would pass 16 MB) is
        skipped, not the others. With `as_bytes`, a document `_id` is read and written back as its bytes, so that it
        matches whatever the order of its fields (the driver would write a DBRef's in its own)."""
        requests = self.db[defaults.REQUESTS]
        found_in = raw(requests) if as_bytes else requests
        at_most = self.limits.max_feedback_rows if at_most is None else at_most
        if at_most <= 0:  # a limit of 0 is none at all to the server
            return 0
        found = found_in.find(query, {"_id": 1}, limit=at_most, max_time_ms=QUERY_MS)
        batch = [raw_id(doc) if as_bytes else doc["_id"] async for doc in found]
        found_count, batch = len(batch), [doc_id for doc_id in batch if not as_bytes or doc_id is not None]
        if not batch:
            return found_count
        try:
            await requests.bulk_write([UpdateOne({"_id": ids.eq(doc_id), **feedback.UNSTAMPED},
                                                 {"$set": {"feedback_run": stamp}}) for doc_id in batch], ordered=False)
        except BulkWriteError as exc:
            for error in exc.details.get("writeErrors", []):
                self.skipped.skip("rating to stamp", batch[error["index"]], error.get("errmsg"))
        return found_count

    async def _due(self, key: str, spec: ModelSpec, state: ModelState) -> bool:
        """Stamp, count and check this model's ratings: every stamp of the pass (counted, written meanwhile, passed
        over) within the one bound of `max_feedback_rows`, those that count first."""
        unstamped = feedback.uncounted(spec, self.limits)
        left = self.limits.max_feedback_rows - await self._stamp(unstamped, state.run)  # of this pass's stamps
        due, left = await self._check(key, spec, state, unstamped, left)
        for documents in (False, True):  # a document `_id` the server cannot return fails only the second read
            try:
                left -= await self._stamp(feedback.passed_over(spec, self.limits, documents), feedback.PASSED_OVER,
                                          left, as_bytes=documents)
            except OperationFailure as exc:  # the server refuses the filter under $nor (a $text): looked at again
                self.skipped.skip("feedback filter", spec.id, exc)
        return due

    async def _check(self, key: str, spec: ModelSpec, state: ModelState, unstamped: dict, left: int
                     ) -> tuple[bool, int]:
        """Whether the model's run is due, and how many stamps the pass has left."""
        requests = self.db[defaults.REQUESTS]
        if state.status is not Status.SUCCEEDED:  # a running model's ratings are stamped; they count once it ends
            return False, left
        # Stamps on what is not a rating in this selection (anyone may write `feedback_run`) count for nothing.
        count = await requests.count_documents(
            {"$and": [feedback.selection(spec, self.limits), {"feedback_run": state.run}]},
            maxTimeMS=QUERY_MS)
        if count < spec.feedback.every or self.too_few.get(key) == (state.run, count):
            return False, left
        if not await self._enough(spec):
            self.too_few[key] = (state.run, count)
            log.info("feedback for %.200r: %d new ratings, but too few usable %s to train on yet", spec.id, count,
                     "pairs" if spec.feedback.method == "dpo" else "examples")
            return False, left
        # The run reads every rating there is: those written since this pass stamped count toward it, not the next
        # (stamped only once it is claimed, they would start another run at once with no new rating).
        return True, left - await self._stamp(unstamped, state.run, left)

    async def _enough(self, spec: ModelSpec) -> bool:
        """Whether the rated answers a run would read make a run (DPO: pairs), read newest first and checked at 100,
        300, 700, ... rows until they do: more rows never make fewer examples or pairs (nor a smaller training fold, for a
        `valid_fraction` up to 0.8), so the first rows that make a run answer for the whole selection, and a model
        with thousands of ratings costs a pass its first rows, not all of them. Each span is twice the last, so a
        selection that never makes a run is checked a few times, not once a batch. What is kept is bounded by the operator's
        caps (rows, input length), whatever anyone inserted: the server selects only requests of a shape a run uses
        (`feedback.usable`), and one too long as a whole is dropped as it comes, as the run skips it."""
        kept, read, checked, want = [], 0, 0, ENOUGH_BATCH
        found = self.db[defaults.REQUESTS].find(feedback.selection(spec, self.limits), feedback.FIELDS,
                                                sort=feedback.NEWEST_FIRST, limit=self.limits.max_feedback_rows,
                                                max_time_ms=QUERY_MS, batch_size=ENOUGH_BATCH)
        async with found:  # a cursor left early is closed on the server
            # One by one, never a batch held whole: a chat the server passes (each message within the caps) may hold
            # `max_messages` times what a run keeps of it, so only what is kept, and one reply, stay in memory.
            async for doc in found:
                read += 1
                if not feedback.too_long(doc, self.limits):
                    kept.append(doc)
                if read == checked + want:
                    if await asyncio.to_thread(feedback.enough, kept, spec, self.limits):
                        return True
                    checked, want = read, want * 2
        return read > checked and await asyncio.to_thread(feedback.enough, kept, spec, self.limits)
