"""Predictions over a collection: one `_requests` document answers every matching document of a collection.

`{model, collection, filter, input, output_field, watch}`: `input` names a field, or is a plain
template whose "{field}" placeholders are replaced by those fields' values (a substitution, never
`str.format`, so no attribute or index lookups). Each answered document gets
`output_field: {text, checkpoint: {run, step} | "base", request}` (or `{error, checkpoint, request}` when
its input cannot be used), so a crash resumes with exactly the documents that lack an answer from this
checkpoint. The answer names its request, and is written only where `output_field` is absent or holds
that request's answer: never over a value anyone else wrote (the operator allows the collection itself
with `MONGOTUNE_ANSWER_COLLECTIONS`). A document the write cannot land on is skipped, logged and counted,
never fetched again by the job. The request shows `progress: {done, total, skipped}` and ends `done`; with
`watch: true` it stays `running` and answers documents inserted, or whose input fields change, through a
change stream on the collection, until it is cancelled (`cancel: true`). An answer written, by any request,
never triggers an answer: only other changes to an input field do, so requests cannot feed each other.

Generation goes through the daemon's serving worker (`Serving.generate`), one chunk of at most
`max_batch` documents at a time, so interactive requests wait at most one chunk.
"""

import logging

from pymongo.errors import PyMongoError, WriteError

from listener.serving import Serving
from listener.serving_worker import Failure
from listener.status import REQUEST_TRANSITIONS, Status, now, transition
from training import defaults, ids
from training.config import TEMPLATE_FIELD, RequestSpec, SpecError, check_collection_type, input_fields
from training.inference import normalised

log = logging.getLogger(__name__)

CANCEL_CHECK_S = 2.0  # how often a watching request looks for `cancel: true`


def _value(document: dict, path: str):
    for part in path.split("."):
        document = document.get(part) if isinstance(document, dict) else None
    return document


def render(spec: RequestSpec, document: dict, max_chars: int) -> str:
    """The prompt for one document; ValueError naming the field when it cannot be used."""
    fields = input_fields(spec.input)
    for name in fields:
        if not isinstance(_value(document, name), (str, int, float)) or isinstance(_value(document, name), bool):
            raise ValueError(f"field {name!r} is missing or not text")
    text = (TEMPLATE_FIELD.sub(lambda m: str(_value(document, m.group(1))), spec.input)
            if TEMPLATE_FIELD.search(spec.input) else str(_value(document, fields[0])))
    if len(text) > max_chars:
        raise ValueError(f"the input is {len(text):,} characters, over the operator's limit of {max_chars:,}")
    return text


MAX_UNWRITABLE = 1_000  # documents one job may fail to write before it fails: each stays in every later query


def is_answer(value) -> bool:
    """Whether a field's value is an answer this listener wrote: it names the request that wrote it."""
    return isinstance(value, dict) and {"checkpoint", "request"} <= value.keys()


class CollectionJob:
    """One collection request, claimed by this daemon: answer what lacks an answer, then maybe watch."""

    def __init__(self, serving: Serving, spec: RequestSpec):
        self.serving, self.spec = serving, spec
        self.db, self.owner = serving.db, serving.owner
        self.target = self.db[spec.collection]
        self.requests = self.db[defaults.REQUESTS]
        self.unwritable: list = []  # ids of documents whose answer could not be written, left out of `todo`

    async def answer_all(self) -> None:
        try:
            model, entry = await self.serving.resolve(self.spec.model, self.spec.checkpoint)
            used = {"run": entry["run"], "step": entry["step"]} if entry else "base"
            base = self.spec.filter or {}
            await self._check_collection()
            total = await self.target.count_documents(base)
            skipped = await self.target.count_documents({"$and": [base, {"$nor": [self._ours()]}]})
            done = total - skipped - await self.target.count_documents(self._todo(base, used))
            await self._progress(done, total, skipped)
            while batch := await self._next(self._todo(base, used)):
                missed = await self._answer(batch, model, entry, used)
                self.unwritable += missed
                done, skipped = done + len(batch) - len(missed), skipped + len(missed)
                await self._progress(min(done, total), total, skipped)
                if len(self.unwritable) > MAX_UNWRITABLE:
                    await self.serving.fail(self.spec.id, self._too_many_unwritable())
                    return
            if self.spec.watch:
                await self._watch(model, entry, used)
                return
            await transition(self.requests, self.spec.id, Status.RUNNING, Status.DONE, REQUEST_TRANSITIONS,
                             match=self._mine(), fields={"checkpoint_used": used, "completed_at": now()},
                             unset=("lease",))
        except Failure as exc:
            await self.serving.fail(self.spec.id, exc.message, exc.kind)
        except SpecError as exc:
            await self.serving.refuse(self.spec.id, exc)

    async def _check_collection(self) -> None:
        """The collection is still a collection: a view created under its name would read ours with our rights."""
        listed = await (await self.db.list_collections(filter={"name": self.spec.collection})).to_list()
        check_collection_type(listed, "collection")

    async def _next(self, todo: dict) -> list[dict]:
        """The next chunk to answer, read only from a collection (checked before each chunk: the job is long)."""
        await self._check_collection()
        return await self.target.find(todo).sort("_id", 1).limit(self.serving.settings.max_batch).to_list()

    def _ours(self) -> dict:
        """Documents this request may write: `output_field` absent, or holding this request's own answer."""
        field = self.spec.output_field
        return {"$or": [{field: {"$exists": False}}, {f"{field}.request": {"$eq": self.spec.id}}]}

    def _todo(self, base: dict, used) -> dict:
        """What is left: documents it may write that lack an answer from `used`, past those that failed."""
        todo = [base, self._ours(), {f"{self.spec.output_field}.checkpoint": {"$ne": used}}]
        return {"$and": todo + ([{"_id": {"$nin": self.unwritable}}] if self.unwritable else [])}

    def _too_many_unwritable(self) -> str:
        return (f"over {MAX_UNWRITABLE:,} documents of {self.spec.collection!r} cannot take an answer at "
                f"{self.spec.output_field!r} (the daemon's log names them): choose another output_field, or a "
                "filter that leaves them out")

    async def _answer(self, batch: list[dict], model: dict, entry: dict | None, used) -> list:
        """Answer the documents of `batch` and write each answer; the ids of those it could not write."""
        prompts, writes = [], {}
        for document in batch:
            try:
                prompts.append((document["_id"], render(self.spec, document,
                                                        self.serving.settings.limits.max_input_chars)))
            except ValueError as exc:
                writes[ids.key(document["_id"])] = (document["_id"], {"error": str(exc)})
        if prompts:
            results = await self.serving.generate(model, entry, [p for _, p in prompts], normalised(self.spec.params))
            for (doc_id, _), result in zip(prompts, results):
                writes[ids.key(doc_id)] = (doc_id, {"text": result["output"]} if "output" in result else
                                           {"error": result["error"]["message"]})
        return [doc_id for doc_id, answer in writes.values()
                if not await self._write(doc_id, {**answer, "checkpoint": used, "request": self.spec.id})]

    async def _write(self, doc_id, answer: dict) -> bool:
        """Write one answer where this request still may; a document it cannot land on is logged and skipped."""
        try:
            result = await self.target.update_one({"$and": [{"_id": ids.eq(doc_id)}, self._ours()]},
                                                  {"$set": {self.spec.output_field: answer}})
            if result.matched_count:
                return True
            reason = "it is gone, or its field was written by someone else meanwhile"
        except WriteError as exc:
            reason = f"the server refused the write (code {exc.code})"
        log.warning("document %s of %s not answered for request %s: %s", ids.key(doc_id), self.spec.collection,
                    ids.key(self.spec.id), reason)
        return False

    async def _watch(self, model: dict, entry: dict | None, used) -> None:
        """Answer inserted documents and those whose input fields changed, until the request is cancelled.

        An answer written by this listener, for this request or another, never counts as a change: answers
        never trigger answers, so no two requests can feed each other."""
        roots = {name.split(".")[0] for name in input_fields(self.spec.input)}
        pipeline = [{"$match": {"operationType": {"$in": ["insert", "update", "replace", "invalidate"]}}}]
        async with await self.target.watch(pipeline, max_await_time_ms=int(CANCEL_CHECK_S * 1000)) as changes:
            log.info("watching %s for request %s", self.spec.collection, ids.key(self.spec.id))
            while not await self._cancelled():
                change = await changes.try_next()
                if change is None or change["operationType"] == "invalidate":
                    if not changes.alive:  # the collection was dropped or renamed: the server ended the stream
                        await self.serving.fail(self.spec.id, f"collection {self.spec.collection!r} was dropped or "
                                                "renamed while watched: nothing is left to watch")
                        return
                    continue
                if change["operationType"] == "update" and not _touched(change) & roots:
                    continue  # an answer written, or another field: nothing to answer again
                document = await self.target.find_one({"$and": [{"_id": ids.eq(change["documentKey"]["_id"])},
                                                                self.spec.filter or {}, self._ours()]})
                if document is not None:
                    missed = len(await self._answer([document], model, entry, used))
                    await self.requests.update_one({"_id": ids.eq(self.spec.id), **self._mine()}, {"$inc": {
                        "progress.done": 1 - missed, "progress.skipped": missed, "progress.total": 1}})
        await transition(self.requests, self.spec.id, Status.RUNNING, Status.CANCELLED, REQUEST_TRANSITIONS,
                         match=self._mine(), unset=("lease",))

    async def _cancelled(self) -> bool:
        """Cancelled, or no longer this daemon's (a lease of any shape but its own is not)."""
        mine = {"_id": ids.eq(self.spec.id), **self._mine(), "cancel": {"$ne": True}}
        return await self.requests.find_one(mine, {"_id": 1}) is None

    async def _progress(self, done: int, total: int, skipped: int) -> None:
        await self.requests.update_one({"_id": ids.eq(self.spec.id), **self._mine()},
                                       {"$set": {"progress": {"done": done, "total": total, "skipped": skipped}}})

    def _mine(self) -> dict:
        return {"status": Status.RUNNING.value, "lease.owner": {"$eq": self.owner}}


def _touched(change: dict) -> set[str]:
    """The top-level fields an update changed, answers the listener wrote left out."""
    description = change.get("updateDescription") or {}
    updated = [name for name, value in (description.get("updatedFields") or {}).items() if not is_answer(value)]
    return {name.split(".")[0] for name in [*updated, *(description.get("removedFields") or [])]}


async def predict_collection(serving: Serving, spec: RequestSpec) -> None:
    """Run one collection request to its end; database trouble leaves it to the lease reaper, which retries it."""
    try:
        await CollectionJob(serving, spec).answer_all()
    except PyMongoError as exc:
        log.warning("predictions over %s for request %s stopped: %s", spec.collection, ids.key(spec.id), exc)
