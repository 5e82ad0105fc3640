"""Predictions over a collection: one `_requests` document answers every matching document of a collection.

`{model, collection, filter, input, output_field, watch}`: `input` names a field, or is a plain
template whose "{field}" placeholders are replaced by those fields' values (a substitution, never
`str.format`, so no attribute or index lookups). Each answered document gets
`output_field: {text, checkpoint: {run, step} | "base"}` (or `{error, checkpoint}` when its input
cannot be used), so a crash resumes with exactly the documents that lack an answer from this
checkpoint. The request shows `progress: {done, total}` and ends `done`; with `watch: true` it stays
`running` and answers documents inserted, or whose input fields change, through a change stream on
the collection, until it is cancelled (`cancel: true`). Writes of `output_field` never trigger an
answer: only events touching an input field do.

Generation goes through the daemon's serving worker (`Serving.generate`), one chunk of at most
`max_batch` documents at a time, so interactive requests wait at most one chunk.
"""

import logging

from pymongo import UpdateOne
from pymongo.errors import PyMongoError

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


class CollectionJob:
    """One collection request, claimed by this daemon: answer what lacks an answer, then maybe watch."""

    def __init__(self, serving: Serving, spec: RequestSpec):
        self.serving, self.spec = serving, spec
        self.db, self.owner = serving.db, serving.owner
        self.target = self.db[spec.collection]
        self.requests = self.db[defaults.REQUESTS]

    async def answer_all(self) -> None:
        try:
            model, entry = await self.serving.resolve(self.spec.model, self.spec.checkpoint)
            used = {"run": entry["run"], "step": entry["step"]} if entry else "base"
            base = self.spec.filter or {}
            todo = {"$and": [base, {f"{self.spec.output_field}.checkpoint": {"$ne": used}}]}
            await self._check_collection()
            total = await self.target.count_documents(base)
            done = total - await self.target.count_documents(todo)
            await self._progress(done, total)
            while batch := await self._next(todo):
                await self._answer(batch, model, entry, used)
                done += len(batch)
                await self._progress(min(done, total), total)
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

    async def _answer(self, batch: list[dict], model: dict, entry: dict | None, used) -> None:
        prompts, writes = [], {}
        for document in batch:
            try:
                prompts.append((document["_id"], render(self.spec, document,
                                                        self.serving.settings.limits.max_input_chars)))
            except ValueError as exc:
                writes[ids.key(document["_id"])] = (document["_id"], {"error": str(exc), "checkpoint": used})
        if prompts:
            results = await self.serving.generate(model, entry, [p for _, p in prompts], normalised(self.spec.params))
            for (doc_id, _), result in zip(prompts, results):
                answer = ({"text": result["output"]} if "output" in result else
                          {"error": result["error"]["message"]})
                writes[ids.key(doc_id)] = (doc_id, {**answer, "checkpoint": used})
        await self.target.bulk_write([UpdateOne({"_id": ids.eq(doc_id)}, {"$set": {self.spec.output_field: value}})
                                      for doc_id, value in writes.values()], ordered=False)

    async def _watch(self, model: dict, entry: dict | None, used) -> None:
        """Answer inserted documents and those whose input fields changed, until the request is cancelled."""
        roots = {name.split(".")[0] for name in input_fields(self.spec.input)}
        pipeline = [{"$match": {"operationType": {"$in": ["insert", "update", "replace"]}}}]
        async with await self.target.watch(pipeline, max_await_time_ms=int(CANCEL_CHECK_S * 1000)) as changes:
            log.info("watching %s for request %s", self.spec.collection, ids.key(self.spec.id))
            while not await self._cancelled():
                change = await changes.try_next()
                if change is None:
                    continue
                description = change.get("updateDescription") or {}
                touched = {name.split(".")[0] for name in [*(description.get("updatedFields") or {}),
                                                           *(description.get("removedFields") or [])]}
                if change["operationType"] == "update" and not touched & roots:
                    continue  # an answer written, or another field: nothing to answer again
                document = await self.target.find_one({"$and": [{"_id": ids.eq(change["documentKey"]["_id"])},
                                                                self.spec.filter or {}]})
                if document is not None:
                    await self._answer([document], model, entry, used)
                    await self.requests.update_one({"_id": ids.eq(self.spec.id), **self._mine()},
                                                   {"$inc": {"progress.done": 1, "progress.total": 1}})
        await transition(self.requests, self.spec.id, Status.RUNNING, Status.CANCELLED, REQUEST_TRANSITIONS,
                         match=self._mine(), unset=("lease",))

    async def _cancelled(self) -> bool:
        found = await self.requests.find_one({"_id": ids.eq(self.spec.id)}, {"cancel": 1, "status": 1, "lease": 1})
        return not found or found.get("cancel") is True or (found.get("lease") or {}).get("owner") != self.owner

    async def _progress(self, done: int, total: int) -> None:
        await self.requests.update_one({"_id": ids.eq(self.spec.id), **self._mine()},
                                       {"$set": {"progress": {"done": done, "total": total}}})

    def _mine(self) -> dict:
        return {"status": Status.RUNNING.value, "lease.owner": {"$eq": self.owner}}


async def predict_collection(serving: Serving, spec: RequestSpec) -> None:
    """Run one collection request to its end; database trouble leaves it to the lease reaper, which retries it."""
    try:
        await CollectionJob(serving, spec).answer_all()
    except PyMongoError as exc:
        log.warning("predictions over %s for request %s stopped: %s", spec.collection, ids.key(spec.id), exc)
