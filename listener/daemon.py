"""The daemon: watch `_models` and `_requests`, claim what is pending, train and answer.

Read `Daemon.run` top to bottom: register -> start periodic work -> open the streams (each scans
for pending documents once it is open) -> wait for a stop signal -> stop training children,
give back their leases, deregister.
"""

import asyncio
import logging
import os
import signal
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from bson import json_util
from pymongo import MongoClient
from pymongo.errors import ConnectionFailure, OperationFailure

from listener import defaults, embedded, leases, schema
from listener.connection import connect, database_name, redact
from listener.jobs import supervise
from listener.leases import claim_model, claim_request
from listener.serving import Serving
from listener.status import MODEL_TRANSITIONS, REQUEST_TRANSITIONS, Status, now, status_filter, transition
from listener.streams import watch
from training.config import LISTENER_FIELDS, SpecError, parse_model, parse_request

log = logging.getLogger("mongotune.listener")


@dataclass
class Settings:
    uri: str
    db: str
    home: Path
    name: str = field(default_factory=socket.gethostname)
    max_jobs: int = defaults.MAX_TRAINING_JOBS
    validators: bool = True  # install the $jsonSchema validators at start


class Daemon:
    def __init__(self, client, settings: Settings):
        self.settings = settings
        self.db = client[settings.db]
        self.owner = f"{settings.name}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.trainings: dict = {}
        self.counters = {k: 0 for k in ("trainings_started", "trainings_succeeded", "trainings_failed",
                                        "requests_done", "requests_failed", "invalid_documents")}
        self.stop_event = asyncio.Event()
        self._sync_client = MongoClient(settings.uri)
        self.serving = Serving(self.db, self._sync_client[settings.db], settings.home / "serving", self.owner,
                               self.counters)

    async def run(self) -> None:
        if self.settings.validators:
            await schema.install(self.db)
        await self._heartbeat(started=True)
        scheduler = AsyncIOScheduler()
        scheduler.add_job(self._heartbeat, "interval", seconds=defaults.HEARTBEAT_S)
        scheduler.add_job(self.scan, "interval", seconds=defaults.SCAN_S)
        scheduler.add_job(self.reap, "interval", seconds=max(1.0, defaults.LEASE_S / 2))
        scheduler.add_job(self.serving.renew, "interval", seconds=defaults.LEASE_S / 4)
        scheduler.start()
        tasks = [
            asyncio.create_task(watch(self.db, defaults.MODELS, self.settings.name, self._on_model, self._scan_models)),
            asyncio.create_task(watch(self.db, defaults.REQUESTS, self.settings.name, self._on_request,
                                      self._scan_requests)),
            asyncio.create_task(self.serving.run()),
        ]
        log.info("listening on %s, database %r, as %s", redact(self.settings.uri), self.settings.db, self.owner)
        stop = asyncio.create_task(self.stop_event.wait())
        done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        scheduler.shutdown(wait=False)
        trainings = [task for task in self.trainings.values() if task is not None]
        for task in [*tasks, *trainings]:
            task.cancel()
        await asyncio.gather(*tasks, *trainings, return_exceptions=True)
        await self._release_all()
        await self.db[defaults.LISTENER].delete_one({"_id": f"daemon:{self.owner}"})
        self._sync_client.close()
        for task in done:
            if task is not stop and task.exception():
                raise task.exception()

    async def _heartbeat(self, started: bool = False) -> None:
        record = {"kind": "daemon", "name": self.settings.name, "owner": self.owner, "host": socket.gethostname(),
                  "pid": os.getpid(), "heartbeat_at": now(), "counters": self.counters,
                  "trainings": list(self.trainings)}
        if started:
            record["started_at"] = now()
        await self.db[defaults.LISTENER].update_one({"_id": f"daemon:{self.owner}"}, {"$set": record}, upsert=True)

    async def scan(self) -> None:
        await self._scan_models()
        await self._scan_requests()

    async def reap(self) -> None:
        """Requeue what dead daemons held; a requeued document then goes through the usual claim."""
        if await leases.reap(self.db[defaults.MODELS], MODEL_TRANSITIONS, defaults.MAX_ATTEMPTS):
            await self._scan_models()
        if await leases.reap(self.db[defaults.REQUESTS], REQUEST_TRANSITIONS, defaults.MAX_ATTEMPTS):
            await self._scan_requests()

    async def _scan_models(self) -> None:
        async for document in self.db[defaults.MODELS].find(status_filter(Status.PENDING)):
            await self._isolated(defaults.MODELS, document, self.consider_model)

    async def _scan_requests(self) -> None:
        async for document in self.db[defaults.REQUESTS].find(status_filter(Status.PENDING)):
            await self._isolated(defaults.REQUESTS, document, self.consider_request)

    async def _on_model(self, change: dict) -> None:
        if change.get("fullDocument"):
            await self._isolated(defaults.MODELS, change["fullDocument"], self.consider_model)

    async def _on_request(self, change: dict) -> None:
        if change.get("fullDocument"):
            await self._isolated(defaults.REQUESTS, change["fullDocument"], self.consider_request)

    async def _isolated(self, name: str, document: dict, handle) -> None:
        """One document's problem fails that document, never the stream, the scan or the daemon.

        Network errors still propagate, so the stream reconnects and the event is delivered again.
        """
        try:
            await handle(document)
        except ConnectionFailure:
            raise
        except Exception as exc:
            log.warning("cannot handle %s %r: %s", name, document.get("_id"), exc)
            error = {"type": "unusable_document", "message": f"the listener could not handle this document: {exc}; "
                     f"fields the listener owns ({', '.join(sorted(LISTENER_FIELDS))}) must not be set by users"}
            table = MODEL_TRANSITIONS if name == defaults.MODELS else REQUEST_TRANSITIONS
            try:
                await transition(self.db[name], document["_id"], Status.PENDING, Status.FAILED, table,
                                 fields={"error": error})
            except OperationFailure as again:
                log.warning("and cannot mark it failed either: %s", again)

    async def consider_model(self, document: dict) -> None:
        """Validate, then claim a pending model if this daemon has room for another training."""
        key = json_util.dumps(document["_id"])
        if document.get("status") not in (None, Status.PENDING.value) or key in self.trainings:
            return
        models = self.db[defaults.MODELS]
        if document.get("cancel"):
            await transition(models, document["_id"], Status.PENDING, Status.CANCELLED, MODEL_TRANSITIONS,
                             unset=("cancel",))
            return
        try:
            parse_model(document)
        except SpecError as exc:
            self.counters["invalid_documents"] += 1
            await transition(models, document["_id"], Status.PENDING, Status.FAILED, MODEL_TRANSITIONS,
                             fields={"error": exc.as_error()})
            log.info("model %r is invalid: %s", document["_id"], exc)
            return
        if len(self.trainings) >= self.settings.max_jobs or self.stop_event.is_set():
            return
        self.trainings[key] = None  # the slot is taken before the await, so no other task can take it too
        claimed = None
        try:
            claimed = await claim_model(models, document, self.owner)
        finally:
            if claimed is None:
                self.trainings.pop(key, None)
        if claimed is None:
            return
        self.counters["trainings_started"] += 1
        self.trainings[key] = asyncio.create_task(self._train(key, claimed))

    async def _train(self, key: str, document: dict) -> None:
        try:
            outcome = await supervise(self.db, self.settings.uri, document, self.owner, self.settings.home / "logs")
            if outcome is Status.SUCCEEDED:
                self.counters["trainings_succeeded"] += 1
            elif outcome is Status.FAILED:
                self.counters["trainings_failed"] += 1
        finally:
            self.trainings.pop(key, None)
        if not self.stop_event.is_set():
            await self._scan_models()

    async def consider_request(self, document: dict) -> None:
        if document.get("status") not in (None, Status.PENDING.value):
            return
        requests = self.db[defaults.REQUESTS]
        if document.get("cancel"):
            await transition(requests, document["_id"], Status.PENDING, Status.CANCELLED, REQUEST_TRANSITIONS)
            return
        claimed = await claim_request(requests, document["_id"], self.owner)
        if claimed is None:
            return
        try:
            spec = parse_request(claimed)
        except SpecError as exc:
            await self.serving.fail(claimed["_id"], str(exc))
            return
        self.serving.submit(spec)

    async def _release_all(self) -> None:
        """Give back what this daemon holds, so any daemon resumes or answers it at once."""
        for name, table in ((defaults.MODELS, MODEL_TRANSITIONS), (defaults.REQUESTS, REQUEST_TRANSITIONS)):
            held = self.db[name].find({"status": Status.RUNNING.value, "lease.owner": self.owner}, {"_id": 1})
            async for document in held:
                await transition(self.db[name], document["_id"], Status.RUNNING, Status.PENDING, table,
                                 match={"lease.owner": self.owner}, unset=("lease",))
                log.info("released %s %r for another daemon", name, document["_id"])


async def _serve(settings: Settings) -> None:
    client = await connect(settings.uri)
    daemon = Daemon(client, settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, daemon.stop_event.set)
    try:
        await daemon.run()
    finally:
        await client.close()


def serve(uri: str | None, db: str | None, **options) -> None:
    """Run a daemon until SIGTERM/SIGINT; with no URI, on the embedded server."""
    home = embedded.home()
    if uri:
        asyncio.run(_serve(Settings(uri=uri, db=database_name(uri, db), home=home, **options)))
        return
    with embedded.EmbeddedServer() as server:
        log.info("embedded server at %s (data in %s)", server.uri, server.folder)
        asyncio.run(_serve(Settings(uri=server.uri, db=database_name(server.uri, db), home=home, **options)))
