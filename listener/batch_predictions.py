"""Predictions over a collection: one `_requests` document answers every matching document of a collection.

`{model, collection, filter, input, output_field, watch}`: `input` names a field, or is a plain
template whose "{field}" placeholders are replaced by those fields' values (a substitution, never
`str.format`, so no attribute or index lookups). Each answered document gets
`output_field: {text, checkpoint: {run, step} | "base", request, token}` (or `{error, checkpoint, request,
token}` when its input cannot be used), so a crash resumes with exactly the documents that lack an answer from
this checkpoint. The answer names its request by `_id` and by the token its first job drew (a later request
reusing a deleted one's `_id` has another), and is written only where `output_field` and every parent of it are
absent, or where it holds exactly that request's answer, and only while the document matches the request's
filter: never over nor inside a value anyone else wrote (the operator allows the collection itself with
`MONGOTUNE_ANSWER_COLLECTIONS`). A document the write cannot land
on, or the driver cannot decode, is skipped, logged and counted, and passed over by the job's later passes without
its `_id` ever going into a query (the server may not take it there). Every read
is bracketed by checks that the name still names the same collection, never a view swapped in. The request
shows `progress: {done, total, skipped}` and ends `done`; with
`watch: true` it stays `running` and answers documents inserted, or whose input fields change, through a
change stream on the collection, until it is cancelled (`cancel: true`). An answer written, by any request,
never triggers an answer: only other changes to an input field do, so requests cannot feed each other.

Generation goes through the daemon's serving worker (`Serving.generate`), one chunk of at most
`max_batch` documents at a time, so interactive requests wait at most one chunk.
"""

import asyncio
import contextlib
import logging
import re
import time
import uuid
from dataclasses import dataclass

import bson
from bson.errors import BSONError
from bson.raw_bson import RawBSONDocument
from pymongo.errors import CursorNotFound, ExecutionTimeout, OperationFailure, PyMongoError, WriteError

from listener import records
from listener.serving import Serving
from listener.serving_worker import Failure
from listener.status import REQUEST_TRANSITIONS, Status, now, transition
from training import defaults, ids
from training.config import (TEMPLATE_FIELD, UNCHECKED, RequestSpec, SpecError, check_collection_type,
                             input_fields)
from training.errors import briefly
from training.inference import normalised

log = logging.getLogger(__name__)

CANCEL_CHECK_S = 2.0  # how often a watching request looks for `cancel: true`
REOPEN_MAX_S = 60.0  # the longest wait before a watch opens a failed stream again (see `_watch`)
WATCHED = [{"$match": {"operationType": {"$in": ["insert", "update", "replace", "invalidate"]}}}]


def _value(document: dict, path: str):
    for part in path.split("."):
        document = document.get(part) if isinstance(document, dict) else None
    return document


@dataclass(frozen=True)
class Prompt:
    """A request's `input`, split once per job: the fields it reads (and their paths), and the prompt's pieces,
    text and field names in turn (text, field, text, ..., text; one field named is `("", field, "")`)."""

    fields: tuple[str, ...]
    paths: tuple[tuple[str, ...], ...]
    pieces: tuple[str, ...]

    @classmethod
    def of(cls, text: str) -> "Prompt":
        fields = tuple(input_fields(text))
        pieces = tuple(TEMPLATE_FIELD.split(text)) if TEMPLATE_FIELD.search(text) else ("", text, "")
        return cls(fields, tuple(tuple(name.split(".")) for name in fields), pieces)

    def render(self, document: dict, max_chars: int) -> str:
        """The prompt for one document; ValueError naming the field when it cannot be used. Its length is counted
        from the fields' lengths before it is built: a template repeating a large field never builds more than the
        operator's limit."""
        values = {}
        for name in self.fields:
            value = _value(document, name)
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError(f"field {name!r} is missing or not text")
            values[name] = str(value)
        pieces = [values[part] if n % 2 else part for n, part in enumerate(self.pieces)]  # the values, unbuilt
        length = sum(map(len, pieces))
        if length > max_chars:
            raise ValueError(f"the input is {length:,} characters, over the operator's limit of {max_chars:,}")
        return "".join(pieces)


# Documents one job may fail to write (or read) before it fails: each one's `_id` is kept (as BSON) for later passes
# to pass it over, so their ids' size is bounded as well as their number.
MAX_UNWRITABLE = 1_000
MAX_UNWRITABLE_BYTES = 2**20
TOKEN = "answers_token"  # the request's field: a token its first job draws, which its answers carry (`_token`)
TOKEN_SHAPE = "[0-9a-f]{32}"  # as drawn (`uuid4().hex`); a value of any other shape is replaced (`_token`)
ANSWER_KEYS = ({"text", "checkpoint", "request", "token"}, {"error", "checkpoint", "request", "token"})


def is_answer(value) -> bool:
    """Whether a value has exactly the fields of an answer this listener writes (whose request is then looked up)."""
    return isinstance(value, dict) and set(value) in ANSWER_KEYS


def id_key(doc_id) -> bytes:
    """A document's `_id` as BSON: what identifies it in the job's memory, decoded or raw alike."""
    return bson.encode({"_id": doc_id})


def answer_schema(path: str) -> dict:
    """A `$jsonSchema` query for documents holding exactly an answer's shape at `path`: an object with exactly an
    answer's keys, under objects only (never an array, whose elements a dotted path would match)."""
    schema = {"bsonType": "object", "additionalProperties": False, "required": ["checkpoint", "request", "token"],
              "properties": {key: {} for keys in ANSWER_KEYS for key in keys},
              "oneOf": [{"required": ["text"]}, {"required": ["error"]}]}
    for part in reversed(path.split(".")):
        schema = {"bsonType": "object", "required": [part], "properties": {part: schema}}
    return schema


class CollectionJob:
    """One collection request, claimed by this daemon: answer what lacks an answer, then maybe watch."""

    def __init__(self, serving: Serving, spec: RequestSpec):
        self.serving, self.spec = serving, spec
        self.db, self.owner = serving.db, serving.owner
        self.target = self.db[spec.collection]
        self.requests = self.db[defaults.REQUESTS]
        self.unwritable: set[bytes] = set()  # documents that could not be answered (`id_key`), passed over
        self.unwritable_bytes = 0
        self.uuid = None  # the collection's, once the job has found it: the name must keep naming that one
        self.token = None  # the request's answers token, once the job has it (`_token`)
        self.ours: dict = {}  # what this request may write (`_ours`), once the token is known
        self.prompt = Prompt.of(spec.input)

    async def answer_all(self) -> None:
        try:
            self.token = await self._token()
            if self.token is None:
                return  # no longer this daemon's to run
            self.ours = self._ours()
            model, entry = await self.serving.resolve(self.spec.model, self.spec.checkpoint)
            used = {"run": entry["run"], "step": entry["step"]} if entry else "base"
            if not await self._pass(model, entry, used):
                return
            if self.spec.watch:
                await self._watch(model, entry, used)
                return
            await transition(self.requests, self.spec.id, Status.RUNNING, Status.DONE, REQUEST_TRANSITIONS,
                             match=self._mine(), fields={"checkpoint_used": used, "completed_at": now()},
                             unset=("lease",))
        except Failure as exc:
            await self.serving.answers.fail(self.spec.id, exc.message, exc.kind)
        except SpecError as exc:
            await self.serving.answers.refuse(self.spec.id, exc)

    async def _pass(self, model: dict, entry: dict | None, used, counted: bool = True) -> bool:
        """Answer every matching document that lacks an answer from `used`; False if the job ended meanwhile
        (cancelled, or failed past the documents it may skip). The first pass counts the matching documents and
        sets `progress`; a watch's catch-up pass (`counted` False) adds what it answers to `progress` instead, as
        the watch does, without the counts' three scans of the collection."""
        base = self.spec.filter or {}
        if counted:
            done, total, skipped = await self._read(lambda: self._counts(base, used))
            await self._progress(done, total, skipped)
        async with contextlib.aclosing(self._chunks(self._todo(base, used))) as chunks:
            async for chunk in chunks:
                batch, unreadable = self._decoded(chunk)
                missed = unreadable + await self._answer(batch, model, entry, used)
                self._leave_out(missed)
                if counted:
                    done, skipped = done + len(chunk) - len(missed), skipped + len(missed)
                    await self._progress(min(done, total), total, skipped)
                else:
                    await self._count(done=len(chunk) - len(missed), skipped=len(missed))
                if len(self.unwritable) > MAX_UNWRITABLE or self.unwritable_bytes > MAX_UNWRITABLE_BYTES:
                    await self.serving.answers.fail(self.spec.id, self._too_many_unwritable())
                    return False
                if await self._cancelled():  # looked for at each chunk: a long first pass can be stopped too
                    await self._end_cancelled()
                    return False
        return True

    async def _chunks(self, todo: dict):
        """What is left to answer, chunk by chunk, read from one cursor in `_id` order: a document a chunk could not
        answer lies behind it, so no query ever names one (its `_id` may be one the server cannot take in a query,
        nested too deep, say). A cursor the server dropped meanwhile (idle past its timeout while the model
        generated) is opened again; documents passed over then come back, as at a later pass, and are dropped here."""
        size = self.serving.settings.max_batch
        while True:
            cursor = records.raw(self.target).find(todo).sort("_id", 1).batch_size(size)
            try:
                while chunk := await self._read(lambda: cursor.to_list(size)):
                    if fresh := [doc for doc in chunk if id_key(records.raw_id(doc)) not in self.unwritable]:
                        yield fresh
                return
            except CursorNotFound:
                log.info("the cursor over %s for request %s was dropped: read again from the start",
                         self.spec.collection, ids.key(self.spec.id))
            finally:
                await cursor.close()

    async def _counts(self, base: dict, used) -> tuple[int, int, int]:
        """How many documents match: answered already, in all, and someone else's (skipped). A filter the server
        refuses where it reads the collection unfiltered (a `$regex` it cannot compile, say) fails the request naming
        `filter`, once: every retry would meet the same refusal. Anything else (an election, a time limit, a missing
        privilege, the collection dropped meanwhile) is left to the reaper."""
        try:
            total = await self.target.count_documents(base)
        except ExecutionTimeout:
            raise
        except OperationFailure as exc:
            if not await self._reads():
                raise
            raise SpecError("filter", f"the server refuses it over {self.spec.collection}: {briefly(exc)}") from None
        skipped = await self.target.count_documents({"$and": [base, {"$nor": [self.ours]}]})
        return total - skipped - await self.target.count_documents(self._todo(base, used)), total, skipped

    async def _reads(self) -> bool:
        """Whether the server reads the collection without the request's filter."""
        try:
            await records.raw(self.target).find_one({}, {"_id": 1})
        except PyMongoError:
            return False
        return True

    async def _read(self, read):
        """What `read()` returns, read only from a collection: the name is checked to name the same collection
        before and after (a view created under it meanwhile would read anything with our rights), and the one the
        job first found, once it exists. Checked for each read: the job is long."""
        before = await self._uuid(self.uuid if self.uuid is not None else UNCHECKED)
        result = await read()
        self.uuid = await self._uuid(before)
        return result

    async def _uuid(self, same_as) -> object:
        listed = await (await self.db.list_collections(filter={"name": self.spec.collection})).to_list()
        return check_collection_type(listed, "collection", same_as)

    async def _next(self, todo: dict) -> list[RawBSONDocument]:
        """The first documents `todo` matches, as raw BSON: one document the driver cannot decode must not fail the
        chunk."""
        found = records.raw(self.target).find(todo).sort("_id", 1).limit(self.serving.settings.max_batch)
        return await self._read(found.to_list)

    def _decoded(self, chunk: list[RawBSONDocument]) -> tuple[list[dict], list]:
        """The chunk's documents decoded one by one, and the ids of those the listener cannot read (nested deeper
        than it decodes, say), which are logged and skipped like documents that cannot take an answer."""
        decoded, unreadable = [], []
        for document in chunk:
            try:
                decoded.append(records.decoded(document))
            except SpecError as exc:
                unreadable.append(records.raw_id(document))
                log.warning("document %.200r of %s not answered for request %s: %s", unreadable[-1],
                            self.spec.collection, ids.key(self.spec.id), exc)
        return decoded, unreadable

    def _leave_out(self, missed: list) -> None:
        """Pass documents over at every later pass: counted, by number and by the size of their ids."""
        keys = {id_key(doc_id) for doc_id in missed} - self.unwritable
        self.unwritable |= keys
        self.unwritable_bytes += sum(map(len, keys))

    async def _token(self):
        """The request's answers token: drawn by the first job that runs it and kept for its retries, so a job
        resumes over its own answers. Answers name their request by it as well as by `_id`: a request the TTL
        deleted lends its `_id` to whoever inserts the next one, which then has another token (or one copied from
        the first one's document, which whoever may update `_requests` could rewrite anyway, so one set at insert
        is kept too). One round trip where the request has none yet. A value of any other shape than a drawn
        token's was never drawn here (a writer's, as the daemon's other fields may be): it is replaced, as those
        are, so no answer ever carries it. None when the request is no longer this daemon's."""
        mine, drawn = {"_id": ids.eq(self.spec.id), **self._mine()}, uuid.uuid4().hex
        if (await self.requests.update_one({**mine, TOKEN: {"$exists": False}},
                                           {"$set": {TOKEN: drawn}})).modified_count:
            return drawn
        found = await self.requests.find_one(mine, {TOKEN: 1})
        if found is None:
            return None
        if isinstance(found.get(TOKEN), str) and re.fullmatch(TOKEN_SHAPE, found[TOKEN]):
            return found[TOKEN]
        if (await self.requests.update_one({**mine, TOKEN: {"$eq": found.get(TOKEN)}},
                                           {"$set": {TOKEN: drawn}})).modified_count:
            return drawn
        raise SpecError(TOKEN, "was rewritten while the request's job began: leave it to the listener")

    def _ours(self) -> dict:
        """Documents this request may write: `output_field` and every parent of it absent (an answer never goes
        into, over or beside what anyone else wrote, an owner's object or another request's answer included), or
        the field holding this request's own answer: exactly an answer's shape, under objects only, naming this
        request and its token (a request with the same `_id` inserted after this one was deleted has another).
        Any other document is someone else's shape, skipped up front."""
        field = self.spec.output_field
        parts = field.split(".")
        paths = [".".join(parts[:n]) for n in range(1, len(parts) + 1)]
        return {"$or": [{"$and": [{path: {"$exists": False}} for path in paths]},
                        {"$jsonSchema": answer_schema(field), f"{field}.request": {"$eq": self.spec.id},
                         f"{field}.token": {"$eq": self.token}}]}

    def _todo(self, base: dict, used) -> dict:
        """What is left: documents it may write that lack an answer from `used` (those that failed are passed over by
        `_chunks`, never named here)."""
        return {"$and": [base, self.ours, {f"{self.spec.output_field}.checkpoint": {"$ne": used}}]}

    def _too_many_unwritable(self) -> str:
        return (f"over {MAX_UNWRITABLE:,} documents of {self.spec.collection!r}, or documents whose ids take over "
                f"{MAX_UNWRITABLE_BYTES:,} bytes, cannot take an answer at {self.spec.output_field!r} (the daemon's "
                "log names them): choose another output_field, or a filter that leaves them out")

    async def _answer(self, batch: list[dict], model: dict, entry: dict | None, used) -> list:
        """Answer the documents of `batch` and write each answer; the ids of those it could not write."""
        prompts, writes = [], {}
        for document in batch:
            try:
                prompts.append((document["_id"], self.prompt.render(
                    document, self.serving.settings.limits.max_input_chars)))
            except ValueError as exc:
                writes[ids.key(document["_id"])] = (document["_id"], {"error": str(exc)})
        if prompts:
            results = await self.serving.generate(model, entry, [p for _, p in prompts], normalised(self.spec.params))
            for (doc_id, _), result in zip(prompts, results):
                writes[ids.key(doc_id)] = (doc_id, {"text": result["output"]} if "output" in result else
                                           {"error": result["error"]["message"]})
        return [doc_id for doc_id, answer in writes.values()
                if not await self._write(doc_id, {**answer, "checkpoint": used, "request": self.spec.id,
                                                  "token": self.token})]

    async def _write(self, doc_id, answer: dict) -> bool:
        """Write one answer where this request still may, into a document that still matches its filter (one its
        owner took out of it while the model generated gets none); one it cannot land on is logged and skipped."""
        try:
            result = await self.target.update_one({"$and": [{"_id": ids.eq(doc_id)}, self.spec.filter or {},
                                                            self.ours]},
                                                  {"$set": {self.spec.output_field: answer}})
            if result.matched_count:
                return True
            reason = "it is gone, left the request's filter, or its field was written by someone else meanwhile"
        except WriteError as exc:
            reason = f"the server refused the write (code {exc.code})"
        log.warning("document %s of %s not answered for request %s: %s", ids.key(doc_id), self.spec.collection,
                    ids.key(self.spec.id), reason)
        return False

    async def _watch(self, model: dict, entry: dict | None, used) -> None:
        """Answer inserted documents and those whose input fields changed, until the request is cancelled.

        An answer written by this listener, for this request or another, never counts as a change: answers
        never trigger answers, so no two requests can feed each other. A stream the server fails at an event
        (one whose `_id` nests deeper than it can put in an event, history it no longer holds) is opened again
        from now, and a pass answers what lacks an answer meanwhile: one writer's insert never ends the watch.
        Only changes to the input fields of documents already answered, between that event and the new stream,
        go unanswered. Each stream that fails within `REOPEN_MAX_S` of being followed doubles the wait before the
        next one, from `CANCEL_CHECK_S` up to `REOPEN_MAX_S`: a writer who keeps making streams fail (inserting
        such `_id`s) gets a pass over the collection about once a minute, not every few seconds."""
        caught_up, wait_ms, pause = True, int(CANCEL_CHECK_S * 1000), CANCEL_CHECK_S  # the first pass has just run
        while True:
            async with await records.raw(self.target).watch(WATCHED, max_await_time_ms=wait_ms) as changes:
                if not caught_up and not await self._pass(model, entry, used, counted=False):
                    return
                log.info("watching %s for request %s", self.spec.collection, ids.key(self.spec.id))
                followed = time.monotonic()
                if not await self._follow(changes, model, entry, used):
                    return
            pause = CANCEL_CHECK_S if time.monotonic() - followed > REOPEN_MAX_S else pause
            if not await self._waited(pause):
                return
            caught_up, pause = False, min(2 * pause, REOPEN_MAX_S)

    async def _waited(self, seconds: float) -> bool:
        """Wait `seconds`, looking for `cancel: true` as often as a watch does; False if the request ended."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(CANCEL_CHECK_S, left))
            if await self._cancelled():
                await self._end_cancelled()
                return False
        return True

    async def _follow(self, changes, model: dict, entry: dict | None, used) -> bool:
        """Answer what the stream reports until the request is cancelled or the collection goes (the request
        ended: False), or the server fails the stream (True: open another)."""
        while not await self._cancelled():
            try:
                change = await changes.try_next()
            except OperationFailure as exc:
                log.warning("the change stream on %s failed for request %s (%.300s): opened again, and what lacks "
                            "an answer is answered", self.spec.collection, ids.key(self.spec.id), exc)
                return True
            if change is None or change["operationType"] == "invalidate":
                if not changes.alive:  # the collection was dropped or renamed: the server ended the stream
                    await self.serving.answers.fail(self.spec.id, f"collection {self.spec.collection!r} was dropped or "
                                            "renamed while watched: nothing is left to watch")
                    return False
                continue
            try:
                await self._changed(change, model, entry, used)
            except OperationFailure as exc:  # the server cannot read this one document (an `_id` nested too deep)
                log.warning("a change to %s not answered for request %s: %.300s", self.spec.collection,
                            ids.key(self.spec.id), exc)
                await self._count(done=0, skipped=1)
        await self._end_cancelled()
        return False

    async def _changed(self, change: RawBSONDocument, model: dict, entry: dict | None, used) -> None:
        """Answer the document one change names, if it changed an input field and still takes this answer."""
        if change["operationType"] == "update" and not await self._touched(change["updateDescription"]):
            return  # an answer written, or another field: nothing to answer again
        chunk = await self._next({"$and": [{"_id": ids.eq(change["documentKey"]["_id"])},
                                           self.spec.filter or {}, self.ours]})
        if chunk:
            batch, unreadable = self._decoded(chunk)
            missed = len(unreadable + await self._answer(batch, model, entry, used))
            await self._count(done=1 - missed, skipped=missed)

    async def _count(self, done: int, skipped: int) -> None:
        """Count watched documents in the request's progress: answered, and skipped."""
        await self.requests.update_one({"_id": ids.eq(self.spec.id), **self._mine()}, {"$inc": {
            "progress.done": done, "progress.skipped": skipped, "progress.total": done + skipped}})

    async def _end_cancelled(self) -> None:
        await transition(self.requests, self.spec.id, Status.RUNNING, Status.CANCELLED, REQUEST_TRANSITIONS,
                         match=self._mine(), unset=("lease",))

    async def _touched(self, raw: RawBSONDocument) -> bool:
        """Whether an update (its raw `updateDescription`) changed an input field. An answer is no change, wherever
        it sits along the input's path: written at `x.y` where `x` was absent, the stream reports `x: {y: <answer>}`.
        An update too deep to decode holds no answer: a change (the document's own read then skips it, if need be)."""
        try:
            description = records.decoded(raw)
        except SpecError:
            return True
        roots = {field[0] for field in self.prompt.paths}
        if any(name.split(".")[0] in roots for name in description.get("removedFields") or []):
            return True
        for name, value in (description.get("updatedFields") or {}).items():
            path = tuple(name.split("."))
            for field in self.prompt.paths:
                under = field[len(path):] if field[:len(path)] == path else ()  # the input's path inside `value`
                if path[0] == field[0] and not await self._holds_answer(path, value, under):
                    return True
        return False

    async def _holds_answer(self, path: tuple[str, ...], value, under: tuple[str, ...]) -> bool:
        """Whether `value`, written at `path`, is an answer, or holds one along `under`."""
        while not (is_answer(value) and await self._answered_at(".".join(path), value["request"], value["token"])):
            if not under or not isinstance(value, dict):
                return False
            path, value, under = (*path, under[0]), value.get(under[0]), under[1:]
        return True

    async def _answered_at(self, path: str, request_id, token) -> bool:
        """An answer's `request` and `token` name a request over this collection that writes at `path`: only such
        a request writes an answer there, so a person's object with the same fields is a change like any other."""
        if not isinstance(token, str):
            return False
        found = await self.requests.find_one({"_id": ids.eq(request_id), TOKEN: {"$eq": token},
                                              "collection": {"$eq": self.spec.collection},
                                              "output_field": {"$eq": path}}, {"_id": 1})
        return found is not None

    async def _cancelled(self) -> bool:
        """Cancelled, or no longer this daemon's (a lease of any shape but its own is not)."""
        mine = {"_id": ids.eq(self.spec.id), **self._mine(), "cancel": {"$ne": True}}
        return await self.requests.find_one(mine, {"_id": 1}) is None

    async def _progress(self, done: int, total: int, skipped: int) -> None:
        await self.requests.update_one({"_id": ids.eq(self.spec.id), **self._mine()},
                                       {"$set": {"progress": {"done": done, "total": total, "skipped": skipped}}})

    def _mine(self) -> dict:
        return {"status": Status.RUNNING.value, "lease.owner": {"$eq": self.owner}}


async def predict_collection(serving: Serving, spec: RequestSpec) -> None:
    """Run one collection request to its end; whatever stops it (database trouble, a reply the driver cannot
    decode, anything one document raises) is logged once and leaves it to the lease reaper, which retries it up
    to the operator's max attempts: the job's task is its boundary, so nothing it meets ends the daemon's. Anything
    but the database's or the driver's trouble is a programming error: logged with its traceback."""
    try:
        await CollectionJob(serving, spec).answer_all()
    except (PyMongoError, BSONError) as exc:
        log.warning("predictions over %s for request %s stopped: %s: %.300s", spec.collection, ids.key(spec.id),
                    type(exc).__name__, exc)
    except Exception as exc:  # the boundary of one document's job
        log.exception("predictions over %s for request %s stopped: %s: %.300s", spec.collection, ids.key(spec.id),
                      type(exc).__name__, exc)
