"""Answering `_requests`: claimed requests queue here and are generated in batches.

Requests for the same model, checkpoint and parameters are answered by one `generate` call;
loading and generation run in a worker thread so the daemon's event loop keeps watching.
"""

import asyncio
import json
import logging
import time
from pathlib import Path

from bson import json_util
from pymongo.errors import PyMongoError

from listener import defaults
from listener.leases import lease
from listener.status import REQUEST_TRANSITIONS, Status, now, transition
from training.config import RequestSpec, SpecError, parse_model

log = logging.getLogger("mongotune.listener")


def batch_key(spec: RequestSpec) -> str:
    ref = spec.checkpoint if isinstance(spec.checkpoint, str) else spec.checkpoint.model_dump()
    return json.dumps([str(spec.model), ref, spec.params.model_dump()], sort_keys=True, default=str)


class Serving:
    def __init__(self, db, sync_db, work_dir: Path, owner: str, counters: dict):
        self.db, self.sync_db, self.work_dir, self.owner = db, sync_db, work_dir, owner
        self.counters = counters
        self._pending: list[tuple[RequestSpec, float]] = []
        self._held: dict[str, object] = {}  # claimed requests not yet answered, by their _id as JSON
        self._ready = asyncio.Event()
        self._cache = None

    def submit(self, spec: RequestSpec) -> None:
        self._held[json_util.dumps(spec.id)] = spec.id
        self._pending.append((spec, time.monotonic()))
        self._ready.set()

    async def renew(self) -> None:
        """Extend the leases of exactly the requests queued or generating here; nothing else."""
        if self._held:
            await self.db[defaults.REQUESTS].update_many(
                {"_id": {"$in": list(self._held.values())}, "status": Status.RUNNING.value, "lease.owner": self.owner},
                {"$set": {"lease.expires_at": lease(self.owner)["expires_at"]}},
            )

    def _next_batch(self) -> list[tuple[RequestSpec, float]]:
        key = batch_key(self._pending[0][0])
        batch = [item for item in self._pending if batch_key(item[0]) == key][: defaults.MAX_BATCH]
        self._pending = [item for item in self._pending if item not in batch]
        if not self._pending:
            self._ready.clear()
        return batch

    async def run(self) -> None:
        while True:
            await self._ready.wait()
            await asyncio.sleep(defaults.BATCH_WINDOW_S)  # requests inserted together batch together
            batch = self._next_batch()
            try:
                await self._answer(batch)
            except PyMongoError as exc:
                # The answers could not be written; their leases run out and the reaper requeues them.
                log.warning("could not record answers for %d request(s): %s", len(batch), exc)
            finally:
                for spec, _ in batch:
                    self._held.pop(json_util.dumps(spec.id), None)

    async def fail(self, request_id, message: str, kind: str = "invalid_request") -> None:
        self.counters["requests_failed"] += 1
        await transition(self.db[defaults.REQUESTS], request_id, Status.RUNNING, Status.FAILED, REQUEST_TRANSITIONS,
                         fields={"error": {"type": kind, "message": message}}, unset=("lease",))

    async def _answer(self, batch: list[tuple[RequestSpec, float]]) -> None:
        spec = batch[0][0]
        try:
            loaded, entry = await self._load(spec)
            prompts = [s.input if isinstance(s.input, str) else [m.model_dump() for m in s.input] for s, _ in batch]
            from training.inference import generate

            results = await asyncio.to_thread(generate, loaded, prompts, spec.params)
        except (LookupError, SpecError) as exc:
            for s, _ in batch:
                await self.fail(s.id, str(exc))
            return
        except Exception as exc:
            if len(batch) > 1:  # one bad request must not fail the others: answer each alone
                for item in batch:
                    await self._answer([item])
                return
            log.exception("generation failed for model %r", spec.model)
            await self.fail(spec.id, f"{type(exc).__name__}: {exc}"[:2000], kind="generation_failed")
            return
        used = {"run": entry["run"], "step": entry["step"]} if entry else "base"
        for (s, started), result in zip(batch, results):
            self.counters["requests_done"] += 1
            await transition(self.db[defaults.REQUESTS], s.id, Status.RUNNING, Status.DONE, REQUEST_TRANSITIONS,
                             fields={**result, "checkpoint_used": used, "batch_size": len(batch),
                                     "latency_ms": round((time.monotonic() - started) * 1000, 1),
                                     "completed_at": now()},
                             unset=("lease",))

    async def _load(self, spec: RequestSpec):
        document = await self.db[defaults.MODELS].find_one({"_id": spec.model})
        if document is None:
            raise LookupError(f"model: no document with _id {spec.model!r} in {defaults.MODELS}")
        try:
            model_spec = parse_model(document)
        except SpecError as exc:
            raise LookupError(f"model: {spec.model!r} is not a usable model definition ({exc})") from None
        from training import checkpoints
        from training.inference import ModelCache

        ref = spec.checkpoint if isinstance(spec.checkpoint, str) else spec.checkpoint.model_dump()
        entry = checkpoints.select(document, ref)
        if self._cache is None:
            self._cache = ModelCache(self.sync_db, self.work_dir, defaults.MAX_CACHED_MODELS)
        loaded = await asyncio.to_thread(self._cache.get, model_spec, entry)
        return loaded, entry
