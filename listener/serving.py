"""Answering `_requests`: claimed requests queue here, fairly across models, and a killable worker answers them.

Serving cannot be wedged: rendering and generation run in `python -m training.worker`, and every
command to it is awaited with a wall-clock limit while a watchdog reads its memory. A batch past a
limit, or whose worker died, fails with an error naming the cap and its setting; the worker is
killed and the next batch gets a fresh one. Requests wait in one queue per model (keyed by
`ids.key`), oldest first; models take turns, one batch each, and a batch holds only requests that
generate alike (same checkpoint, same normalised parameters).
"""

import asyncio
import json
import logging
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bson import json_util
from pydantic import ValidationError
from pymongo.errors import PyMongoError

from listener.jobs import public_env, stop_child
from listener.leases import lease
from listener.settings import Settings
from listener.status import REQUEST_TRANSITIONS, Status, now, transition
from training import checkpoints, defaults, ids
from training.config import CheckpointRef, RequestSpec, SpecError, parse_model
from training.errors import public_message
from training.inference import normalised

log = logging.getLogger("mongotune.listener")

MAX_LINE = 2**26  # bytes of one reply line from the worker: max_batch outputs of max_new_tokens each
WATCH_S = 0.5  # how often the watchdog reads the worker's resident memory
KILL_GRACE_S = 2.0  # SIGTERM to SIGKILL for the worker


class Failure(Exception):
    """A whole batch failed; `kind` and `message` go into each of its requests' `error`."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


@dataclass(eq=False)
class Queued:
    spec: RequestSpec
    since: float = field(default_factory=time.monotonic)

    @property
    def batch_key(self) -> str:
        """Requests with equal keys are answered by one `generate` call."""
        ref = self.spec.checkpoint if isinstance(self.spec.checkpoint, str) else self.spec.checkpoint.model_dump()
        return json.dumps([ref, normalised(self.spec.params)], sort_keys=True)

    @property
    def prompt(self):
        return self.spec.input if isinstance(self.spec.input, str) else [m.model_dump() for m in self.spec.input]


def _size(n: int) -> str:
    return f"{n / 2**30:g} GiB" if n >= 2**30 else f"{n / 2**20:g} MiB"


class Worker:
    """One worker process and its memory watchdog; after any failure it is killed, never reused."""

    def __init__(self, settings: Settings, db_name: str):
        self.settings, self.db_name = settings, db_name
        self.process: asyncio.subprocess.Process | None = None
        self.over_memory = False
        self._watchdog: asyncio.Task | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "training.worker", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env=public_env(self.settings.uri), limit=MAX_LINE, start_new_session=True)
        config = {"uri": self.settings.uri, "db": self.db_name, "work_dir": str(self.settings.home / "serving"),
                  "limits": self.settings.limits.model_dump(mode="json"), "disk_bytes": self.settings.serving_disk_bytes,
                  "memory_bytes": self.settings.serving_memory_bytes}
        self.process.stdin.write(json_util.dumps(config).encode() + b"\n")
        self._watchdog = asyncio.create_task(self._watch())
        log.info("serving worker started (pid %d)", self.process.pid)

    async def _watch(self) -> None:
        """Kill the worker once its resident memory passes the operator's cap."""
        while self.process.returncode is None:
            if _resident_bytes(self.process.pid) > self.settings.serving_memory_bytes:
                self.over_memory = True
                self.process.kill()
                return
            await asyncio.sleep(WATCH_S)

    async def call(self, command: dict, timeout: float, doing: str, setting: str) -> dict:
        """Send one command and wait for its reply; past `timeout` (the operator's `setting`), a memory
        kill or the worker's death kill it and raise `Failure`."""
        try:
            line = await asyncio.wait_for(self._exchange(command), timeout)
            reply = json_util.loads(line) if line else None
        except TimeoutError:
            await self.kill()
            raise Failure("request_timeout", f"{doing} took longer than the operator's limit of {timeout:g} s "
                                             f"(MONGOTUNE_{setting})") from None
        except ValueError:  # a reply line over MAX_LINE, or not JSON
            await self.kill()
            raise Failure("worker_crashed", f"the serving worker's reply was unreadable while {doing}") from None
        except BaseException:  # cancelled (the daemon stops): a worker mid-command is never left running
            await self.kill()
            raise
        if reply is None:
            await self.kill()
            raise self._death(doing)
        return reply

    async def _exchange(self, command: dict) -> bytes:
        """The reply line; empty when the worker is gone."""
        try:
            self.process.stdin.write(json_util.dumps(command).encode() + b"\n")
            await self.process.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            return b""
        return await self.process.stdout.readline()

    def _death(self, doing: str) -> Failure:
        if self.over_memory:
            cap = self.settings.serving_memory_bytes
            return Failure("memory_limit", f"{doing} needed more than the operator's limit of {_size(cap)} of memory "
                                           "(MONGOTUNE_SERVING_MEMORY_BYTES); ask for a smaller model or fewer tokens")
        code = self.process.returncode
        how = f"exit code {code}" if code is None or code >= 0 else f"signal {-code}"
        return Failure("worker_crashed", f"the serving worker stopped ({how}) while {doing}; the next request "
                                         "gets a fresh one")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def kill(self) -> None:
        if self._watchdog:
            self._watchdog.cancel()
        if self.process:
            await stop_child(self.process, KILL_GRACE_S)


def _resident_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            line = next((line for line in status if line.startswith("VmRSS:")), "VmRSS: 0 kB")
    except OSError:
        return 0
    return int(line.split()[1]) * 1024


class Serving:
    """The queues of claimed requests, the worker that answers them, and the leases on both."""

    def __init__(self, db, settings: Settings, owner: str, counters: dict,
                 on_room: Callable[[], Awaitable[None]] | None = None):
        self.db, self.settings, self.owner, self.counters, self.on_room = db, settings, owner, counters, on_room
        self._queues: dict[str, deque[Queued]] = {}  # by ids.key of the model, oldest first
        self._turns: deque[str] = deque()  # models with queued requests, the next to be served first
        self._held: dict[str, tuple[str, object]] = {}  # queued or generating: request key -> (model key, _id)
        self._ready = asyncio.Event()
        self._worker: Worker | None = None

    def has_room(self, model_id) -> bool:
        """Whether to claim another request for this model; if not it stays pending for a daemon that can."""
        model = ids.key(model_id)
        for_model = sum(1 for key, _ in self._held.values() if key == model)
        return for_model < self.settings.max_queue_per_model and len(self._held) < self.settings.max_queued_requests

    def submit(self, spec: RequestSpec) -> None:
        model = ids.key(spec.model)
        self._held[ids.key(spec.id)] = (model, spec.id)
        if model not in self._queues:
            self._queues[model] = deque()
            self._turns.append(model)
        self._queues[model].append(Queued(spec))
        self._ready.set()

    async def renew(self) -> None:
        """Extend the leases of exactly the requests queued or generating here; nothing else."""
        if self._held:
            await self.db[defaults.REQUESTS].update_many(
                {"_id": {"$in": [request_id for _, request_id in self._held.values()]},
                 "status": Status.RUNNING.value, "lease.owner": {"$eq": self.owner}},
                {"$set": {"lease.expires_at": lease(self.owner, self.settings.lease_s)["expires_at"]}},
            )

    async def run(self) -> None:
        """Batch by batch until cancelled; the worker never outlives this loop."""
        try:
            while True:
                await self._ready.wait()
                await asyncio.sleep(self.settings.batch_window_s)  # requests inserted together batch together
                batch = self._next_batch()
                try:
                    await self._answer(batch)
                except PyMongoError as exc:  # the answers' leases run out and the reaper requeues them
                    log.warning("could not record answers for %d request(s): %s", len(batch), exc)
                finally:
                    for item in batch:
                        self._held.pop(ids.key(item.spec.id), None)
                await self._room()
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop the worker (SIGTERM, then SIGKILL): a stopping daemon never waits for a generation."""
        worker, self._worker = self._worker, None
        if worker:
            await worker.kill()

    async def fail(self, request_id, message: str, kind: str = "invalid_request") -> None:
        self.counters["requests_failed"] += 1
        await transition(self.db[defaults.REQUESTS], request_id, Status.RUNNING, Status.FAILED, REQUEST_TRANSITIONS,
                         match={"lease.owner": {"$eq": self.owner}},
                         fields={"error": {"type": kind, "message": message}}, unset=("lease",))

    def _next_batch(self) -> list[Queued]:
        """From the model whose turn it is: its oldest request and the next ones that generate alike."""
        model = self._turns.popleft()
        queue = self._queues.pop(model)
        key = queue[0].batch_key
        batch = [item for item in queue if item.batch_key == key][: self.settings.max_batch]
        rest = deque(item for item in queue if item not in batch)
        if rest:
            self._queues[model] = rest
            self._turns.append(model)
        if not self._turns:
            self._ready.clear()
        return batch

    async def _room(self) -> None:
        if self.on_room:
            try:
                await self.on_room()
            except PyMongoError as exc:
                log.warning("cannot look for pending requests: %s", exc)

    async def _answer(self, batch: list[Queued]) -> None:
        """Answer one batch; each way it can fail ends its requests with an error that says why."""
        try:
            model, entry = await self._model(batch[0].spec)
            command = {"model": model, "checkpoint": entry}
            await self._ask({**command, "op": "load"}, "loading the model", "load_timeout_s")
            log.info("generating %d answer(s) for model %s", len(batch), ids.key(batch[0].spec.model))
            reply = await self._ask({**command, "op": "generate", "prompts": [item.prompt for item in batch],
                                     "params": normalised(batch[0].spec.params)},
                                    "generating the answer", "request_timeout_s")
        except Failure as exc:
            if exc.kind == "generation_failed" and len(batch) > 1:  # one bad request must not fail the others
                for item in batch:
                    await self._answer([item])
                return
            for item in batch:
                await self.fail(item.spec.id, exc.message, exc.kind)
            return
        used = {"run": entry["run"], "step": entry["step"]} if entry else "base"
        for item, result in zip(batch, reply["results"]):
            if "error" in result:
                await self.fail(item.spec.id, result["error"]["message"], result["error"]["type"])
            else:
                await self._done(item, result, used, len(batch))

    async def _done(self, item: Queued, result: dict, used, batch_size: int) -> None:
        self.counters["requests_done"] += 1
        await transition(self.db[defaults.REQUESTS], item.spec.id, Status.RUNNING, Status.DONE, REQUEST_TRANSITIONS,
                         match={"lease.owner": {"$eq": self.owner}},
                         fields={"output": result["output"], "usage": result["usage"], "checkpoint_used": used,
                                 "batch_size": batch_size, "completed_at": now(),
                                 "latency_ms": round((time.monotonic() - item.since) * 1000, 1)},
                         unset=("lease",))

    async def _ask(self, command: dict, doing: str, timeout_setting: str) -> dict:
        """One command to the worker (started if there is none); a reply that says it failed raises `Failure`."""
        if self._worker is None or not self._worker.alive:
            await self.close()
            self._worker = Worker(self.settings, self.db.name)
            try:
                await self._worker.start()
            except OSError as exc:
                raise Failure("worker_crashed", f"the serving worker could not start ({exc.strerror})") from None
        timeout = getattr(self.settings, timeout_setting)
        reply = await self._worker.call(command, timeout, doing, timeout_setting.upper())
        if not reply.get("ok"):
            raise Failure(reply["error"]["type"], reply["error"]["message"])
        return reply

    async def _model(self, spec: RequestSpec) -> tuple[dict, dict | None]:
        """The model definition (as parsed) and the checkpoint entry the request asks for."""
        document = await self.db[defaults.MODELS].find_one({"_id": ids.eq(spec.model)})
        if document is None:
            raise Failure("model_unavailable", f"model: no document with _id {spec.model!r} in {defaults.MODELS}")
        try:
            model = parse_model(document, self.settings.limits)
            ref = spec.checkpoint if isinstance(spec.checkpoint, str) else spec.checkpoint.model_dump()
            entry = checkpoints.select(document, ref)
            if entry is not None:
                entry = {**CheckpointRef.model_validate({"run": entry["run"], "step": entry["step"]}).model_dump(),
                         "files_id": entry.get("files_id")}
        except SpecError as exc:
            raise Failure("model_unavailable", f"model {spec.model!r} is not a usable model definition "
                                               f"(its field {exc.field or '_id'} is not); see its own error") from None
        except (KeyError, TypeError, AttributeError, ValidationError):
            raise Failure("model_unavailable", f"model {spec.model!r} lists checkpoints the listener cannot "
                                               "read") from None
        except LookupError as exc:
            raise Failure("model_unavailable", public_message(str(exc))) from None
        return model.model_dump(by_alias=True, exclude_unset=True), entry
