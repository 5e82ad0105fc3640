"""Retraining the daemons start by themselves: when new documents arrive, and on a schedule.

One rule makes it safe with any number of daemons: a retrain is the transition `succeeded -> pending`
filtered on the model's `run` (`start`). The first daemon to write it starts the run; every other
attempt for that run finds the model no longer `succeeded`. So a retrain never starts while a run is
pending or going, nor after one that failed or was cancelled (a person looks at those first).

New documents (`retrain.on_new_documents: N`): each daemon watches each data collection that such models
follow through one change stream, shared by them all, of the inserts matching their `data.filter`s (an
update that makes an old document match does not count: it did not arrive). It keeps a tally per
collection in `_listener` (`retrain:<daemon>:<collection>`): for each model the count and the run it
counts toward, and the resume token of the last insert counted, written in one update, so a restarted
daemon resumes after the last insert it counted and neither loses nor counts one twice. Every daemon
counts every insert, so whichever reaches N first starts the run. Counting toward run R starts once R
is claimed, a little before R reads its data: an insert in between is trained on and also counted, so a
retrain comes early rather than late. Inserts during a run count toward the next one. A failed or
cancelled model is not followed (it never retrains by itself); it is again once set back to pending.
Users decide how many models follow; the operator bounds what that costs a daemon: at most
`retrain_max_collections` streams, on a client of their own, for at most `retrain_max_models` models, those
counted already keeping their places (a newcomer never takes one, whatever its id). One document costs only its
own model: a filter is tried before it joins a shared stream, and a stream goes on past an insert the server
cannot deliver.

Schedule (`retrain.schedule`, `training.schedule`): every daemon's scheduler fires at each tick, and
the tick is claimed in `_listener` (`retrain-tick:<model>`, whose `tick` only moves forward), so one
daemon per tick acts on it, even when the run it started has already finished by the time another
daemon's job fires. A tick that finds a run pending or going is skipped, with a log line.

Feedback (`feedback: {method, every}`): the same pass counts the ratings of each such model's answers and
starts its feedback runs (`listener.feedback`).

The set of models followed is refreshed every `retrain_check_s`: a model given `retrain` later starts
being watched, a deleted one stops. The same pass starts what is due, e.g. a run that ended after N
documents had already arrived while it trained.
"""

import asyncio
import datetime as dt
import functools
import hashlib
import logging
from typing import Any

import bson
from pydantic import BaseModel, ConfigDict, Field
from pymongo.errors import DuplicateKeyError, ExecutionTimeout, OperationFailure, PyMongoError

from listener.feedback import FeedbackTrigger
from listener.periodic import Periodic
from listener.records import BadRecord, ModelState, SkipLog, parse, raw, read_each, readable
from listener.settings import Settings
from listener.status import DOCUMENT_VALIDATION_FAILURE, FINAL, MODEL_TRANSITIONS, Status, now, transition
from listener.streams import LOST_TOKEN_CODES
from listener.tasks import cancel_and_wait
from listener.turns import Queue, Sightings
from training import defaults, ids, schedule
from training.config import LISTENER_FIELDS, LOGICAL, ModelSpec, SpecError, check_collection_type, parse_model
from training.errors import briefly

log = logging.getLogger(__name__)

TALLY = "retrain_tally"  # `kind` of a daemon's counts of new documents in one collection
TICK = "retrain_tick"  # `kind` of a model's last claimed schedule tick
TICKS_KEPT = 20  # recent ticks kept on a tick record: when, which daemon took it, what came of it
TICK_LOOKBACK_S = 60.0  # how late a schedule job may run and still find the tick it fired for
STATE_FIELDS = {"status": 1, "run": 1, "started_at": 1, "finished_at": 1}
CLOSE_S = 5.0  # how long `close` waits for the watchers to end before it leaves them
EVERY_INSERT = [{"$match": {"operationType": "insert"}}, {"$project": {"documentKey": 1}}]
NOT_FOLLOWED = (Status.FAILED, Status.CANCELLED)  # a person looks at those first: no retrain starts by itself
FILTER_CHECK_MS = 1000  # how long the server may look for a document to try a model's data.filter on
FILTER_CHECKS_PER_PASS = 4  # filters newly tried in one pass; models whose filters are not tried yet wait
NOWHERE = object()  # a watcher's `failed_at` before any failure: unlike None (no point yet), equal to no position


class Count(BaseModel):
    """One model's count of inserts toward its next run."""

    model_config = ConfigDict(extra="ignore", strict=True)

    key: str
    model: Any
    run: int = Field(ge=0)
    count: int = Field(ge=0)


class Tally(BaseModel):
    """A daemon's counts for the models following one collection, as stored in `_listener`."""

    model_config = ConfigDict(extra="ignore", strict=True)

    collection: str
    token: dict | None = None
    counts: list[Count] = Field(default_factory=list)

    def of(self, key: str) -> Count | None:
        return next((c for c in self.counts if c.key == key), None)


Members = dict[str, tuple[ModelSpec, int]]  # the models counting inserts of one collection: spec, run when seen


def reconciled(tally: Tally, members: Members) -> Tally:
    """`tally` with a count for each of `members` and for no other model (a new member starts at 0)."""
    kept = {c.key: c for c in tally.counts if c.key in members}
    counts = [kept.get(key) or Count(key=key, model=spec.id, run=run, count=0) for key, (spec, run) in members.items()]
    return tally.model_copy(update={"counts": counts})


class TickRecord(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    tick: dt.datetime


async def start(models, model_id, run: int, trigger: str) -> bool:
    """Start the run after `run` if the model is `succeeded` at `run`; of all callers for one run, one wins."""
    moved = await transition(models, model_id, Status.SUCCEEDED, Status.PENDING, MODEL_TRANSITIONS,
                             match={"run": run}, fields={"trigger": trigger}, event={"trigger": trigger})
    if moved is not None:
        log.info("retraining %.200r after run %d (%s)", model_id, run, trigger)
    return moved is not None


async def claim_tick(records, model_id, tick: dt.datetime, owner: str) -> bool:
    """True for exactly one caller per model and tick: the one that moves the model's tick record to `tick`."""
    key = f"retrain-tick:{ids.key(model_id)}"
    try:
        result = await records.update_one(
            {"_id": key, "tick": {"$lt": tick}},
            {"$set": {"kind": TICK, "model": model_id, "tick": tick, "owner": owner, "at": now()}}, upsert=True)
    except DuplicateKeyError:  # the record holds this tick or a later one: another daemon took it
        await _drop_if_unreadable(records, key)
        return False
    return result.upserted_id is not None or result.modified_count == 1


async def _drop_if_unreadable(records, key: str) -> None:
    """A tick record someone overwrote would block every later claim: remove it, the next tick claims afresh."""
    try:
        parse(TickRecord, await records.find_one({"_id": key}))
    except BadRecord as exc:
        log.warning("tick record %s is unusable (%s); removing it", key, exc)
        await records.delete_one({"_id": key})


def on_full_document(query: dict) -> dict | None:
    """`query` applied to a change event's inserted document; None when an operator cannot be moved there."""
    moved = {}
    for name, value in query.items():
        if name in LOGICAL and isinstance(value, list) and all(isinstance(q, dict) for q in value):
            inner = [on_full_document(q) for q in value]
            if any(q is None for q in inner):
                return None
            moved[name] = inner
        elif name == "$comment":
            moved[name] = value
        elif name.startswith("$"):  # $expr, $text, $jsonSchema...: the server checks each insert instead
            return None
        else:
            moved[f"fullDocument.{name}"] = value
    return moved


def insert_pipeline(filters: list[dict | None]) -> tuple[list[dict], bool]:
    """The pipeline of one stream for the inserts matching any of `filters`, and whether each insert must then be
    checked against each filter by `_id` (when the stream cannot tell which filter it matched, or holds none)."""
    moved = [on_full_document(query or {}) for query in filters]
    if len(moved) == 1 and moved[0] is not None:
        return [{"$match": {"operationType": "insert", **moved[0]}}, EVERY_INSERT[1]], False
    if all(moved):  # each filter moved and none is empty
        return [{"$match": {"operationType": "insert", "$or": moved}}, EVERY_INSERT[1]], True
    return EVERY_INSERT, True


def filter_key(query: dict | None) -> str:
    """What identifies a filter: the hash of its exact BSON, types and order and all (extended JSON text reads a
    literal `{"$date": ...}` object as a date); the models with the same key share its verdict and its place in a
    stream."""
    return hashlib.sha256(bson.encode({"filter": query})).hexdigest()


def by_filter(members: Members) -> dict[str, tuple[dict | None, Members]]:
    """The members grouped by their filter, by its key (`filter_key`): an insert is checked once per filter."""
    groups: dict[str, tuple[dict | None, Members]] = {}
    for key, member in members.items():
        groups.setdefault(filter_key(member[0].data.filter), (member[0].data.filter, {}))[1][key] = member
    return groups


def filters_of(members: Members) -> dict[str, dict | None]:
    """The distinct filters of a collection's members, by their key."""
    return {key: query for key, (query, _) in by_filter(members).items()}


def filter_check(collection: str, query: dict | None) -> tuple[str, str]:
    """What a verdict on a filter is kept under: its collection and its key."""
    return collection, filter_key(query)


def without_filters(collection: str, exc: OperationFailure) -> tuple[list[dict], bool]:
    """The pipeline and check of a stream whose filters the server fails on: every insert, checked by `_id`."""
    log.warning("the server fails the data.filters of the models on %s in a change stream (%s); checking each insert "
                "by _id instead", collection, exc.code)
    return EVERY_INSERT, True


class Retrainer:
    """Follows the models with `retrain`; the daemon starts it with its `Periodic` and awaits `close`."""

    def __init__(self, db, settings: Settings, owner: str, periodic: Periodic, skipped: SkipLog):
        self.db, self.settings, self.owner, self.periodic, self.skipped = db, settings, owner, periodic, skipped
        self.specs: dict[str, tuple[str, ModelSpec | SpecError]] = {}  # by model key: a fingerprint of the document,
        # its parse or refusal
        self.following: dict[str, Members] = {}  # by collection: the models counting its inserts
        self.groups: dict[str, dict] = {}  # by collection: `following` by filter (`by_filter`), grouped once a pass
        self.watchers: dict[str, tuple[tuple, asyncio.Task]] = {}  # by collection: its filters, the stream task
        self.schedules: dict[str, str] = {}  # by model key: the cron expression scheduled
        self.tallies: dict[str, Tally] = {}  # by collection: this daemon's tally, as last written
        self.locks: dict[str, asyncio.Lock] = {}  # by collection: one writer of its tally at a time
        self.stopping: set[asyncio.Task] = set()  # watchers cancelled by `check` that have not ended yet
        self.sightings = Sightings()  # the order this daemon first saw the models that follow new documents in
        self.past_bound = 0  # how many models the bounds left uncounted at the last pass: logged when it changes
        self.filter_checks: dict[tuple[str, str], str | None] = {}  # by collection and filter: the server's refusal
        self.judged_again: set[tuple[str, str]] = set()  # the filters tried again after an insert's check failed
        self.filter_tries = Queue(FILTER_CHECKS_PER_PASS)  # by collection and filter not tried yet
        self.kept: set[str] | None = None  # the models holding places after the last pass (None: before the first)
        self.feedback = FeedbackTrigger(db, settings.limits, settings.retrain_max_models, skipped, settings.name)

    def start(self) -> None:
        self.periodic.every(self.settings.retrain_check_s, self.check, "retrain")

    async def close(self, timeout_s: float = CLOSE_S) -> None:
        """Stop counting: each watcher is cancelled until it has ended (a cancel can be lost, `listener.tasks`)."""
        tasks = [task for _, task in self.watchers.values()] + list(self.stopping)
        self.watchers.clear()
        await cancel_and_wait(tasks, timeout_s, "retrain watchers")

    async def check(self) -> None:
        """Follow the models with `retrain` or `feedback` as they are now, and start the runs that are due."""
        await self._forget_used_triggers()
        models = await self._models()
        retraining = {key: (spec, state) for key, (spec, state) in models.items()
                      if spec.retrain is not None and (spec.retrain.on_new_documents or spec.retrain.schedule)}
        await self._follow_data(retraining)
        self._follow_schedules(retraining)
        for key, (spec, state) in retraining.items():
            await self._start_if_due(key, spec, state)
        rated = {key: (spec, state) for key, (spec, state) in models.items() if spec.feedback is not None}
        for state in await self.feedback.due(rated):
            try:
                await start(self.db[defaults.MODELS], state.id, state.run, "feedback")
            except OperationFailure as exc:
                self.skipped.skip("retrain start", state.id, exc)

    async def _models(self) -> dict[str, tuple[ModelSpec, ModelState]]:
        found, parsed = {}, {}
        followed = {"$or": [{"retrain": {"$type": "object"}}, {"feedback": {"$type": "object"}}]}
        async for document in readable(raw(self.db[defaults.MODELS]).find(followed), self.skipped, "retrain"):
            try:
                state = parse(ModelState, document)
            except BadRecord as exc:  # the daemon's own pass fails the document where it must
                self.skipped.skip("retrain", document.get("_id"), exc)
                continue
            spec = await self._spec(document, parsed)
            if isinstance(spec, SpecError):
                self.skipped.skip("retrain", document.get("_id"), spec)
            elif spec.feedback is not None or spec.retrain is not None:
                found[ids.key(spec.id)] = (spec, state)
        self.specs = parsed
        return found

    async def _spec(self, document: dict, parsed: dict) -> ModelSpec | SpecError:
        """The document's parse, redone only when what the user wrote has changed, and then off the event loop (a
        cron check costs up to ~25 ms of CPU); a refusal is kept and returned as well, so a document refused costs
        one parse, not one at each pass."""
        user_part = {k: v for k, v in document.items() if k not in LISTENER_FIELDS}
        fingerprint = hashlib.sha256(bson.encode(user_part)).hexdigest()
        key = ids.key(document.get("_id"))
        cached = self.specs.get(key)
        if cached is None or cached[0] != fingerprint:
            try:
                outcome = await asyncio.to_thread(parse_model, document, self.settings.limits)
            except SpecError as exc:
                outcome = exc
            cached = (fingerprint, outcome)
        parsed[key] = cached
        return cached[1]

    async def _forget_used_triggers(self) -> None:
        """`trigger` is read when its run starts; once the run has ended it must not name the next one."""
        used = {"trigger": {"$exists": True}, "status": {"$in": [s.value for s in FINAL]}}
        try:
            await self.db[defaults.MODELS].update_many(used, {"$unset": {"trigger": ""}})
        except OperationFailure as exc:
            if exc.code != DOCUMENT_VALIDATION_FAILURE:  # else a document predates a stricter validator
                raise
            await self.db[defaults.MODELS].update_many(used, {"$unset": {"trigger": ""}},
                                                       bypass_document_validation=True)

    async def _counted(self, eligible: dict, counted: set[str]) -> dict[str, Members]:
        """The models that count new documents, by collection: those that can retrain by themselves, within the
        operator's bounds. Those counted already come first, then the others in the order this daemon first saw
        them, so a newcomer (whatever its id) never takes the place of a model or collection followed before it;
        the others wait until some stop following. A model whose filter is not tried yet holds its place against
        the bounds while it waits for its try (`_try_filters`), and keeps no model after it from counting."""
        placed: dict[str, Members] = {}
        total, past, waiting, s = 0, [], {}, self.settings
        for key in sorted(self.sightings.order(eligible), key=lambda k: k not in counted):
            spec, state = eligible[key]
            collection = spec.data.collection
            if total >= s.retrain_max_models or (collection not in placed
                                                 and len(placed) >= s.retrain_max_collections):
                past.append(spec.id)
                continue
            works = await self._filter_works(spec)
            if works is None:
                waiting[key] = spec
            if works is not False:
                placed.setdefault(collection, {})[key] = (spec, state.run)
                total += 1
        await self._try_filters(list(waiting.values()))
        tried = {key: await self._filter_works(spec) for key, spec in waiting.items()}  # None: waits on
        followed = {collection: kept for collection, members in placed.items()
                    if (kept := {key: member for key, member in members.items() if tried.get(key, True)})}
        if len(past) != self.past_bound and past:
            log.warning("not counting new documents for %d models (the first: %.200r): this daemon follows %d "
                        "models in %d collections, its bounds (MONGOTUNE_RETRAIN_MAX_MODELS, "
                        "MONGOTUNE_RETRAIN_MAX_COLLECTIONS)", len(past), past[0], total, len(placed))
        self.past_bound = len(past)
        self.kept = {key for members in followed.values() for key in members} | ({key for key, works in tried.items() if works is None} & counted)
        return followed

    async def _try_filters(self, waiting: list[ModelSpec]) -> None:
        """Try the filters of `waiting` models, at most FILTER_CHECKS_PER_PASS a pass (each may cost the server
        FILTER_CHECK_MS), those waiting longest first: a filter waits from the first pass that wanted it untried,
        so an edited filter, a new one, queues behind the others, however early its model was seen (otherwise one
        writer editing its filters at each pass would take every try)."""
        untried = {filter_check(spec.data.collection, spec.data.filter): spec.data.filter for spec in waiting}
        for check in self.filter_tries.turns(untried):
            self.filter_checks[check] = await self._refusal(check[0], untried[check])

    async def _follow_data(self, models: dict) -> None:
        wanted = await self._counted(self._eligible(models), await self._counted_before())
        stale = []
        for collection, (filters, task) in list(self.watchers.items()):
            if collection not in wanted or tuple(sorted(filters_of(wanted[collection]))) != filters or task.done():
                if task.done() and not task.cancelled() and task.exception():
                    log.warning("counting new documents stopped (%r); starting again", task.exception())
                stale.append(task)
                self.stopping.add(task)
                task.add_done_callback(self.stopping.discard)
                del self.watchers[collection]
        await cancel_and_wait(stale, CLOSE_S, "retrain watchers")  # ended before a new one counts for its models
        self.following, self.groups = wanted, {collection: by_filter(members) for collection, members in wanted.items()}
        for collection in set(self.tallies) - set(wanted):
            del self.tallies[collection]
            self.locks.pop(collection, None)
        for collection, members in wanted.items():
            if collection in self.watchers and collection in self.tallies:
                async with self._lock(collection):
                    tally = self.tallies[collection]
                    if reconciled(tally, members) != tally:
                        await self._save(reconciled(tally, members))
            elif collection not in self.watchers:
                filters = filters_of(members)
                task = asyncio.create_task(self._watch(collection, list(filters.values())),
                                           name=f"retrain-watch:{collection}")
                self.watchers[collection] = (tuple(sorted(filters)), task)
        await self.db[defaults.LISTENER].delete_many(
            {"kind": TALLY, "daemon": self.settings.name, "_id": {"$nin": [self._tally_id(c) for c in wanted]}})

    def _eligible(self, models: dict) -> dict:
        """The models that may count new documents: with `on_new_documents`, neither failed nor cancelled (a verdict
        on a filter is kept while some such model has that filter)."""
        candidates = {key: (spec, state) for key, (spec, state) in models.items()
                      if spec.retrain.on_new_documents and state.status not in NOT_FOLLOWED}
        current = {filter_check(spec.data.collection, spec.data.filter) for spec, _ in candidates.values()}
        self.filter_checks = {check: refusal for check, refusal in self.filter_checks.items() if check in current}
        self.judged_again &= current
        return candidates

    async def _counted_before(self) -> set[str]:
        """The models that hold places: as the last pass left them, or on the first pass those the stored tallies
        hold (a record it cannot read, which anyone may have written, holds none)."""
        if self.kept is not None:
            return self.kept
        counted = set()
        for record in await read_each(self.db[defaults.LISTENER], {"kind": TALLY, "daemon": self.settings.name},
                                      {"collection": 1, "counts": 1}, self.skipped, "retrain tally"):
            try:
                counted.update(count.key for count in parse(Tally, record).counts)
            except BadRecord as exc:
                self.skipped.skip("retrain tally", record.get("_id"), exc)
        return counted

    async def _filter_works(self, spec: ModelSpec) -> bool | None:
        """Whether the server runs the model's `data.filter` on its collection, as tried once per collection and
        filter (`_try_filters`) before it joins a stream shared with other models (one the server fails on would
        stop counting for all); a refusal is logged and added to the model's `warnings`. None: not tried yet."""
        check = filter_check(spec.data.collection, spec.data.filter)
        if check not in self.filter_checks:
            return None
        refusal = self.filter_checks[check]
        if refusal is not None:
            await self.skipped.warn(self.db[defaults.MODELS], f"retrain filter {check[1]}", spec.id,
                                    f"not counting new documents for retrain: {refusal}")
        return refusal is None

    async def _refusal(self, collection: str, query: dict | None) -> str | None:
        """Why a model may not count the inserts of `collection` that match `query`, or None. The name must name a
        collection, never a view (its pipeline, a `$lookup` into any collection, would run with the daemon's rights
        at each check of an insert), and the server must run the filter: tried on at most one document (raw: any
        `_id`), for at most FILTER_CHECK_MS (a filter that matches nothing may scan the whole collection; the
        stream still contains a filter that passes and fails later)."""
        listed = await (await self.db.list_collections(filter={"name": collection})).to_list()
        try:
            check_collection_type(listed, "data.collection")
        except SpecError as exc:
            return str(exc)
        if not query:
            return None
        try:
            await raw(self.db[collection]).find_one(query, max_time_ms=FILTER_CHECK_MS)
        except ExecutionTimeout:  # it ran out of its time: no verdict on the filter
            return None
        except OperationFailure as exc:
            return f"the server refuses data.filter ({briefly(exc)})"
        return None

    def _follow_schedules(self, models: dict) -> None:
        wanted = {key: spec.retrain.schedule for key, (spec, _) in models.items() if spec.retrain.schedule}
        for key, expression in list(self.schedules.items()):
            if wanted.get(key) != expression:
                self.periodic.remove(f"retrain-schedule:{key}")
                del self.schedules[key]
        for key, expression in wanted.items():
            if key not in self.schedules:
                cron = schedule.trigger(expression)
                job = functools.partial(self._tick, models[key][0].id, cron)
                self.periodic.add(cron, job, f"retrain-schedule:{key}")
                self.schedules[key] = expression

    async def _start_if_due(self, key: str, spec: ModelSpec, state: ModelState) -> None:
        """Start the model's next run if enough new documents arrived; a model the server refuses to update (one
        just under 16 MB) is logged once and left, so it stops neither the pass nor the stream that called."""
        tally, wanted = self.tallies.get(spec.data.collection), spec.retrain.on_new_documents
        count = tally.of(key) if tally else None
        if wanted and state.status is Status.SUCCEEDED and count and count.run == state.run and count.count >= wanted:
            try:
                await start(self.db[defaults.MODELS], state.id, state.run, "new_documents")
            except OperationFailure as exc:
                self.skipped.skip("retrain start", state.id, exc)

    async def _state(self, model_id) -> ModelState | None:
        document = await self.db[defaults.MODELS].find_one({"_id": ids.eq(model_id)}, STATE_FIELDS)
        return None if document is None else parse(ModelState, document)

    async def _states(self, members: Members) -> dict[str, ModelState]:
        """The state of each of `members` still there and readable, by key, in one query."""
        found = {}
        wanted = {"_id": {"$in": [spec.id for spec, _ in members.values()]}}
        for document in await read_each(self.db[defaults.MODELS], wanted, STATE_FIELDS, self.skipped, "retrain"):
            key = ids.key(document.get("_id"))
            if key not in members:  # the server's numeric equality: 5 for Int64(5), another model
                continue
            try:
                found[key] = parse(ModelState, document)
            except BadRecord as exc:  # the daemon's own pass fails the model; nothing to count toward
                self.skipped.skip("retrain", document.get("_id"), exc)
        return found

    def _lock(self, collection: str) -> asyncio.Lock:
        return self.locks.setdefault(collection, asyncio.Lock())

    async def _watch(self, collection: str, filters: list[dict | None]) -> None:
        """Count the inserts of `collection` for its members forever (cancel to stop); reconnects like the
        daemon's own streams, after a growing wait. A stream the server fails twice at the same point is taken past
        the one insert it cannot deliver (`_pass_over`), or, where the filters are what fails, opened without them;
        only a point the server no longer has makes it count from now on, never anything a model's document holds.
        A stream that fails before it ever had a point (the server will not watch the collection) is only tried
        again: nothing is passed over, nothing reset."""
        pipeline, checked = insert_pipeline(filters)
        backoff, position, failed_at = 0.5, None, NOWHERE
        while True:
            try:
                if position is None:
                    self.tallies[collection] = await self._load_tally(collection)
                    position = self.tallies[collection].token
                async with await self.db[collection].watch(pipeline, resume_after=position) as stream:
                    async with self._lock(collection):
                        tally = reconciled(self.tallies[collection], self.following.get(collection, {}))
                        await self._save(tally.model_copy(update={"token": tally.token or stream.resume_token}))
                    position = position or stream.resume_token
                    backoff = 0.5
                    async for change in stream:
                        await self._arrived(collection, change, stream.resume_token, checked)
                        position = stream.resume_token
            except OperationFailure as exc:
                if exc.code in LOST_TOKEN_CODES and position:
                    await self._count_from_now(collection, exc)
                    position = None
                    continue  # at once, this once: the next attempt has no token to lose
                if position != failed_at:  # once may be passing; twice at one point is not
                    failed_at = position
                    log.warning("stream on %s failed (%s); opening it again in %.1f s", collection, briefly(exc),
                                backoff)
                elif position is not None:  # a point a stream had reached: an insert there may be what fails
                    try:
                        position = await self._pass_over(collection, pipeline, position)
                    except OperationFailure as refused:
                        if pipeline is not EVERY_INSERT:
                            pipeline, checked = without_filters(collection, refused)
                        else:
                            await self._count_from_now(collection, refused)
                            position = None
                elif pipeline is not EVERY_INSERT and await self._opens(collection):  # the filters are what fails
                    pipeline, checked = without_filters(collection, exc)
                else:
                    log.warning("the server will not open a stream on %s (%s); trying again in %.1f s", collection,
                                briefly(exc), backoff)
            except PyMongoError as exc:
                log.warning("stream on %s broke (%s); reconnecting in %.1f s", collection, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def _opens(self, collection: str) -> bool:
        """Whether the server opens a stream of every insert into `collection`: where it refuses the filtered one too
        (a view, a missing privilege, an election), the filters are not to blame and stay. Anything the server or the
        network says no with is such a refusal: this runs inside the watcher's handler, which nothing may leave."""
        try:
            async with await self.db[collection].watch(EVERY_INSERT):
                return True
        except PyMongoError:
            return False

    async def _pass_over(self, collection: str, pipeline: list[dict], position: dict) -> dict:
        """The point just past the next insert after `position` that `pipeline` selects, found by a stream that
        carries only its time (an insert whose `_id` nests deeper than the server puts in a change event fails
        any stream that carries the `_id`); it is not counted. `position` where there is none yet. Raises the
        server's refusal of the stream itself."""
        probe = [pipeline[0], {"$project": {"clusterTime": 1}}]
        async with await self.db[collection].watch(probe, resume_after=position) as stream:
            change = await stream.try_next()
            if change is None:
                return position
            log.warning("passing over one insert into %s at %s: the server cannot put it in a change event",
                        collection, change.get("clusterTime"))
            async with self._lock(collection):
                await self._save(self._tally(collection).model_copy(update={"token": stream.resume_token}))
            return stream.resume_token

    async def _count_from_now(self, collection: str, exc: OperationFailure) -> None:
        log.warning("cannot resume counting new documents of %s (%s); counting from now on", collection, exc.code)
        async with self._lock(collection):
            await self._save(self._tally(collection).model_copy(update={"token": None}))

    def _tally(self, collection: str) -> Tally:
        return self.tallies.get(collection) or Tally(collection=collection)

    async def _load_tally(self, collection: str) -> Tally:
        """This daemon's stored tally of `collection`; a fresh one when there is none."""
        fresh = Tally(collection=collection)
        record = await self.db[defaults.LISTENER].find_one({"_id": self._tally_id(collection)})
        if record is None:
            return fresh
        try:
            stored = parse(Tally, record)
        except BadRecord as exc:
            log.warning("tally %s is unusable (%s); counting afresh", self._tally_id(collection), exc)
            return fresh
        return stored if stored.collection == collection else fresh

    def _tally_id(self, collection: str) -> str:
        return f"retrain:{self.settings.name}:{collection}"

    async def _save(self, tally: Tally) -> None:
        """Write the tally whole, counts and token together; callers hold the collection's lock."""
        record = {"kind": TALLY, "daemon": self.settings.name, "at": now(), **tally.model_dump()}
        await self.db[defaults.LISTENER].update_one({"_id": self._tally_id(tally.collection)}, {"$set": record},
                                                    upsert=True)
        self.tallies[tally.collection] = tally

    async def _arrived(self, collection: str, change: dict, token: dict, checked: bool) -> None:
        """One insert: count it toward the current run of each member it matches, with its token, in one write,
        and start the runs that are due."""
        doc_id = (change.get("documentKey") or {}).get("_id")
        members = self.following.get(collection, {})
        matched = {}
        for query, group in self.groups.get(collection, {}).values():
            if not checked or not query or await self._matches(collection, query, doc_id):
                matched.update(group)
        states = await self._states(matched) if matched else {}
        if not states:  # nothing to count: a restart may see this insert again, and count it for no one again
            return
        async with self._lock(collection):
            counts = []
            for count in reconciled(self.tallies[collection], members).counts:
                state = states.get(count.key)
                if state is not None:
                    count = count.model_copy(update={
                        "run": state.run, "count": (count.count if count.run == state.run else 0) + 1})
                counts.append(count)
            await self._save(Tally(collection=collection, token=token, counts=counts))
        for key, state in states.items():
            await self._start_if_due(key, matched[key][0], state)

    async def _matches(self, collection: str, query: dict, doc_id) -> bool:
        """Whether the insert `doc_id` matches `query`. A check the server fails concerns this one insert (an `_id`
        nested too deep to query by, a value the filter fails on), which then counts for none of the filter's models,
        logged once; whether the filter itself fails is for its own check to say (`_judge_again`)."""
        try:
            return await self.db[collection].find_one(
                {"$and": [{"_id": ids.eq(doc_id)}, query]}, {"_id": 1}) is not None
        except OperationFailure as exc:
            self.skipped.skip(f"retrain insert into {collection}", doc_id, exc)
            await self._judge_again(collection, query)
            return False

    async def _judge_again(self, collection: str, query: dict) -> None:
        """Try a filter again by its own check after the check of an insert failed on it (a filter can pass its
        first try and fail on later documents: the training run would fail on it too, so the next pass stops
        following it); once per filter while it is followed, as each try costs the server up to FILTER_CHECK_MS."""
        check = filter_check(collection, query)
        if check in self.filter_checks and check not in self.judged_again:
            self.judged_again.add(check)
            self.filter_checks[check] = await self._refusal(collection, query)

    async def _tick(self, model_id, cron) -> None:
        """A schedule tick: the daemon that claims it starts a run, unless one is pending or going."""
        tick = schedule.latest_tick(cron, now(), TICK_LOOKBACK_S)
        records = self.db[defaults.LISTENER]
        if tick is None or not await claim_tick(records, model_id, tick, self.owner):
            return
        state, models = await self._state(model_id), self.db[defaults.MODELS]
        if state is None:
            outcome = "skipped: the model is gone"
        elif state.status is Status.SUCCEEDED and await start(models, model_id, state.run, "schedule"):
            outcome = f"started run {state.run + 1}"
        else:
            outcome = f"skipped: the model is {state.status.value if state.status else 'pending'}"
            log.info("scheduled retrain of %.200r at %s %s", model_id, tick.isoformat(), outcome)
        entry = {"tick": tick, "owner": self.owner, "outcome": outcome}
        await records.update_one({"_id": f"retrain-tick:{ids.key(model_id)}", "tick": tick},
                                 {"$push": {"ticks": {"$each": [entry], "$slice": -TICKS_KEPT}}})
