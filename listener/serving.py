"""Answering `_requests`: claimed requests are batched (`listener.batching`) and a killable worker answers them.

Serving cannot be wedged: rendering and generation run in a worker process (`listener.serving_worker`),
every command to it awaited with a wall-clock limit while a watchdog reads its memory. A batch past a
limit, or whose worker died, fails with an error naming the cap and its setting; the worker is
killed and the next batch gets a fresh one. Which requests make a batch, and when it starts, is
`listener.batching`'s; a promoted checkpoint to preload takes a turn between batches too. A batch of
models of one base is answered as one mixed-adapter batch (peft's `adapter_names`) when their LoRA
adapters share one loaded base, and one `generate` per checkpoint otherwise; requests claimed while
it generates make the next batch, right after it. A batch's endings are written in one `bulk_write`.

Streaming (`stream: true`) does not split batches: a batch holding any streamed request streams
as a whole, because the worker's streamer follows every row of one `generate` call at no extra
cost, and generating streamed requests alone would give up batching exactly when clients are
waiting. Only the streamed requests' documents get the partial `output` writes, in chunks (every
few tokens or about 200 ms, see `training.inference.Chunks`); `done` with `usage` comes last.
A request's own `timeout_s` travels with its batch's generate command: past it the worker ends those
answers as `timeout` and goes on (`training.inference.Deadline`), so one writer's deadline never
throws away the bases and adapters the shared worker holds for everyone. Only the operator's
`request_timeout_s` kills the worker, so it is never left wedged; its batch fails as `request_timeout`.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from pydantic import ValidationError
from pymongo.errors import PyMongoError

from listener.answers import Answers
from listener.batching import Arrivals, Queued, Queues
from listener.forks import Forks
from listener.leases import lease
from listener.preload import watch_promotions
from listener.serving_worker import Failure
from listener.settings import Settings
from listener.status import Status
from listener.worker_seat import Seat
from training import checkpoints, defaults, ids
from training.config import CheckpointRef, RequestSpec, SpecError, parse_model
from training.errors import public_message
from training.inference import normalised

log = logging.getLogger(__name__)


class Serving:
    """Answers claimed requests batch by batch on the worker (`seat`), ends them (`answers`), and renews the leases
    on what it holds."""

    def __init__(self, db, settings: Settings, owner: str, counters: dict, forks: Forks,
                 collection_job: Callable[["Serving", RequestSpec], Awaitable[None]],
                 on_room: Callable[[], None] = lambda: None):
        self.db, self.settings, self.owner = db, settings, owner
        self.on_room = on_room  # called whenever requests leave: the daemon's intake claims more
        self.collection_job = collection_job  # `batch_predictions.predict_collection`, which builds on this class
        self.seat = Seat(settings, db.name, forks)
        self.answers = Answers(db, owner, counters)
        self.queues = Queues(settings)  # what is held here, and which batch is next
        self._work_waiting = asyncio.Event()  # a batch or a preload is waiting for its turn
        self.arrivals = Arrivals()  # a batch starts once the requests inserted with its first are claimed
        self._preloads: dict[str, object] = {}  # model ids whose best checkpoint to load when idle, by ids.key
        self._jobs: dict[str, asyncio.Task] = {}  # predictions over a collection, by request key

    def submit(self, spec: RequestSpec) -> None:
        """Queue a claimed request; one already queued or generating here (its writer set it back to pending,
        and this daemon claimed it again) is not queued twice: the copy here answers it, under the same lease."""
        if not self.queues.hold(spec):
            log.info("%s %.200r is already queued here; not queued again", defaults.REQUESTS, spec.id)
            return
        if spec.collection is not None:
            self._start_job(spec)
            return
        self.queues.enqueue(spec)
        self._work_waiting.set()

    async def renew(self) -> None:
        """Extend the leases of exactly the requests queued or generating here; nothing else."""
        held = self.queues.held_ids()
        if held:
            await self.db[defaults.REQUESTS].update_many(
                {"_id": {"$in": held},
                 "status": Status.RUNNING.value, "lease.owner": {"$eq": self.owner}},
                {"$set": {"lease.expires_at": lease(self.owner, self.settings.request_lease_s)["expires_at"]}},
            )

    def _start_job(self, spec: RequestSpec) -> None:
        """Predictions over a collection run beside the batches, sharing the worker through `generate`."""
        key = ids.key(spec.id)

        async def job() -> None:
            try:
                await self.collection_job(self, spec)
            finally:
                self.queues.release(spec.id)
                self._jobs.pop(key, None)
                self.on_room()

        self._jobs[key] = asyncio.create_task(job())

    async def generate(self, model: dict, entry: dict | None, prompts: list, params: dict) -> list[dict]:
        """Answers for `prompts` from the shared worker, in turn with the request batches; `Failure` if it fails."""
        async with self.seat.turn:
            command = {"model": model, "checkpoint": entry}
            await self.seat.ask({**command, "op": "load"}, "loading the model", "load_timeout_s")
            reply = await self.seat.ask({**command, "op": "generate", "prompts": prompts, "params": params},
                                        "generating the answers", "request_timeout_s")
        return reply["results"]

    async def resolve(self, model_id, checkpoint) -> tuple[dict, dict | None]:
        """The parsed model document and the checkpoint entry `checkpoint` selects; `Failure` if unusable."""
        return await self._model(model_id, checkpoint)

    def preload(self, model_id) -> None:
        """Load this model's best checkpoint at its turn: when idle, else between two batches (`preload_best`)."""
        self._preloads[ids.key(model_id)] = model_id
        self._work_waiting.set()

    async def serve(self) -> None:
        """Batch by batch until cancelled, preloads when idle; the worker never outlives this loop."""
        promotions = (asyncio.create_task(watch_promotions(self.db, self.preload))
                      if self.settings.preload_best else None)
        preload_due = False  # a waiting preload takes the turn after each batch: steady load never starves it
        try:
            while True:
                await self._work_waiting.wait()
                # requests inserted together batch together, and another model's request that arrived meanwhile is
                # claimed before the next batch is chosen (a flood's full batches never run back to back past it)
                await self.arrivals.settled(self.settings.batch_window_s)
                if not self.queues.waiting() or (self._preloads and preload_due):
                    preload_due = False
                    async with self.seat.turn:
                        await self._preload_next()
                    continue
                batch, preload_due = self.queues.next_batch(), True
                if not self.queues.waiting() and not self._preloads:
                    self._work_waiting.clear()
                try:
                    async with self.seat.turn:
                        await self._answer(batch)
                except PyMongoError as exc:  # the answers' leases run out and the reaper requeues them
                    log.warning("could not record answers for %d request(s): %s", len(batch), exc)
                finally:
                    for item in batch:
                        self.queues.release(item.spec.id)
                self.on_room()
        finally:
            for task in [promotions, self.seat.warming, *self._jobs.values()]:
                if task:
                    task.cancel()
            await self.seat.close()

    async def _preload_next(self) -> None:
        model_id = self._preloads.pop(next(iter(self._preloads)))
        if not self._preloads and not self.queues.waiting():
            self._work_waiting.clear()
        try:
            model, entry = await self._model(model_id, "best")
            if entry is not None:
                await self.seat.ask({"op": "load", "model": model, "checkpoint": entry}, "preloading the model",
                                    "load_timeout_s")
                log.info("preloaded model %s, checkpoint run %d step %d", ids.key(model_id), entry["run"],
                         entry["step"])
        except Failure as exc:
            log.info("nothing preloaded for model %s: %s", ids.key(model_id), exc.message)
        except PyMongoError as exc:
            log.warning("cannot read model %s to preload it: %s", ids.key(model_id), exc)

    async def _answer(self, batch: list[Queued]) -> None:
        """Answer one batch; each way it can fail ends its requests with an error that says why."""
        streamed = [item.spec.stream for item in batch]
        keys = list(dict.fromkeys(item.checkpoint_key for item in batch))  # one group per model and checkpoint
        try:
            groups = []
            for key in keys:
                spec = next(item.spec for item in batch if item.checkpoint_key == key)
                model, entry = await self._model(spec.model, spec.checkpoint)
                groups.append({"model": model, "checkpoint": entry})
                await self.seat.ask({**groups[-1], "op": "load"}, "loading the model", "load_timeout_s")
            log.info("generating %d answer(s) for model %s%s", len(batch), ids.key(batch[0].spec.model),
                     f" and {len(keys) - 1} other checkpoint(s) of its base" if len(keys) > 1 else "")
            command = {"groups": groups, "rows": [keys.index(item.checkpoint_key) for item in batch]}
            started = time.monotonic()
            reply = await self.seat.ask({**command, "op": "generate", "prompts": [item.prompt for item in batch],
                                         "params": normalised(batch[0].spec.params), "stream": any(streamed),
                                         "timeout_s": batch[0].spec.timeout_s},
                                        "generating the answer", "request_timeout_s",
                                        self.answers.partial_writer(batch) if any(streamed) else None)
            generation_s = time.monotonic() - started
        except Failure as exc:
            if exc.kind == "generation_failed" and len(batch) > 1:  # one bad request must not fail the others
                parts = [[item] for item in batch]
            else:  # nor one unusable model the other models of its base
                parts = [[item for item in batch if item.checkpoint_key == key] for key in keys]
            if len(parts) > 1:
                for part in parts:
                    await self._answer(part)
                return
            await self.answers.end([self.answers.failed(item.spec.id, exc.message, exc.kind) for item in batch])
            return
        endings = []  # one bulk write: one round trip for the whole batch, not one per request
        for item, result in zip(batch, reply["results"]):
            entry = groups[keys.index(item.checkpoint_key)]["checkpoint"]
            used = {"run": entry["run"], "step": entry["step"]} if entry else "base"
            if "error" in result:
                endings.append(self.answers.failed(item.spec.id, result["error"]["message"], result["error"]["type"]))
            else:
                endings.append(self.answers.done(item, result, used, len(batch), {
                    "queued_s": round(started - item.since, 3), "generation_s": round(generation_s, 3)}))
        await self.answers.end(endings)

    async def _model(self, model_id, checkpoint: str | CheckpointRef) -> tuple[dict, dict | None]:
        """The model definition (as parsed) and the checkpoint entry a request asks for."""
        document = await self.db[defaults.MODELS].find_one({"_id": ids.eq(model_id)})
        if document is None:
            raise Failure("model_unavailable", f"model: no document with _id {model_id!r} in {defaults.MODELS}")
        try:
            model = parse_model(document, self.settings.limits)
            self.queues.bases[ids.key(model_id)] = ids.key([model.model_name_or_path, model.model_kwargs.model_dump(),
                                                      model.tokenizer_kwargs.model_dump(), model.trainer.bits])
            ref = checkpoint if isinstance(checkpoint, str) else checkpoint.model_dump()
            entry = checkpoints.select(document, ref)
            if entry is not None:
                entry = {**CheckpointRef.model_validate({"run": entry["run"], "step": entry["step"]}).model_dump(),
                         "files_id": entry.get("files_id")}
        except SpecError as exc:
            raise Failure("model_unavailable", f"model {model_id!r} is not a usable model definition "
                                               f"(its field {exc.field or '_id'} is not); see its own error") from None
        except (KeyError, TypeError, AttributeError, ValidationError):
            raise Failure("model_unavailable", f"model {model_id!r} lists checkpoints the listener cannot "
                                               "read") from None
        except LookupError as exc:
            raise Failure("model_unavailable", public_message(str(exc))) from None
        return model.model_dump(by_alias=True, exclude_unset=True), entry
