"""The daemon: watch `_models` and `_requests`, claim what is pending, train and answer.

Read `Daemon.work` top to bottom: clean up after killed children -> register -> start periodic
work -> open the streams (each scans for pending documents once it is open) -> wait for a stop
signal -> stop training children and the serving worker, give back their leases, deregister.
Every document read is parsed where it is read (`listener.records`); one bad document is failed
or skipped, never the end of a loop.
"""

import asyncio
import contextlib
import logging
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable

from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from listener import embedded, gangs, gpus, health, housekeeping, indexes, leases, liveness, metrics, schema
from listener.batch_predictions import predict_collection
from listener.connection import connect, database_name, redact
from listener.forks import Forks, forget_connection_environment
from listener.intake import Intake
from listener.jobs import supervise
from listener.periodic import Periodic
from listener.leases import claim_model, fail_malformed, fail_undecodable
from listener.records import BadRecord, ModelState, RequestState, SkipLog, decoded, parse, raw, raw_id
from listener.retrain import Retrainer
from listener.serving import Serving
from listener.settings import Settings
from listener.status import MODEL_TRANSITIONS, REQUEST_TRANSITIONS, Status, now, status_filter, transition
from listener.streams import REQUEST_EVENTS, watch
from listener.tasks import cancel_and_wait
from training import defaults, ids
from training.config import ModelSpec, SpecError, parse_model
from training.lineage import versions

log = logging.getLogger(__name__)

SHUTDOWN_DB_S = 5.0  # what a stopping daemon spends giving its leases back before it exits anyway
CLIENT_ROLES = (None, "bookkeeping", "retrain")  # the daemon's clients: its work, its bookkeeping, users' streams

# Runs one claimed training to its end and records its final status: `supervise` starts the real
# child; the fast tests pass a stand-in so claim, slot and release logic run in milliseconds.
TrainingRunner = Callable[..., Awaitable[Status]]


class Daemon:
    def __init__(self, client, settings: Settings, train: TrainingRunner = supervise, bookkeeping=None,
                 retraining=None):
        """`bookkeeping` (heartbeats, claims, leases) and `retraining` (the change streams users' models ask
        for) are clients beside `client`, each with a pool of its own, so that no number of users' streams
        delays a heartbeat or a claim; both are `client` when not given."""
        self.settings = settings
        self.train = train
        self.db = client[settings.db]
        self.books = (bookkeeping or client)[settings.db]
        self.owner = f"{settings.name}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.trainings: dict[str, asyncio.Task | None] = {}  # by ids.key of the model
        self.ports: dict[str, socket.socket] = {}  # rendezvous ports held for gangs it is node 0 of (listener.gangs)
        self.resting = 0.0  # until when this daemon joins no gang, having given one back unstarted (`_rests`)
        self.gpus = gpus.GpuPool(gpus.visible() if settings.gpus is None else settings.gpus)
        self.forks = Forks(gpus=bool(self.gpus.devices))  # starts training children and serving workers
        self.counters = {k: 0 for k in ("trainings_started", "trainings_succeeded", "trainings_failed",
                                        "requests_done", "requests_failed", "invalid_documents")}
        self.stop_event = asyncio.Event()
        self.skipped = SkipLog()
        self.health = health.Health(settings.home, settings.name, self.owner)
        self.serving = Serving(self.db, settings, self.owner, self.counters, self.forks, predict_collection)
        self.intake = Intake(self.books, settings, self.owner, self.serving, self.counters, self.skipped,
                             stopping=self.stop_event.is_set, warm_first=True)
        self.serving.on_room = self.intake.wake
        self.periodic = Periodic()  # the one owner of timed work; `_shutdown` awaits it
        self.retrainer = Retrainer((retraining or client)[settings.db], settings, self.owner, self.periodic, self.skipped)
        self.metrics: metrics.Metrics | None = None  # with --metrics-port, from `work`

    async def work(self) -> None:
        self.metrics = metrics.attach(self, self.periodic)  # first: a taken port stops the start
        housekeeping.clean(self.settings)
        if self.settings.validators:
            await schema.install(self.db, self.settings.limits)
        await indexes.make(self.db, self.settings.requests_ttl_s)
        await self._heartbeat(started=True)
        self.periodic.every(self.settings.heartbeat_s, self._heartbeat)
        self.periodic.every(self.settings.scan_s, self.scan)
        self.periodic.every(max(1.0, self.settings.lease_s / 2), self.reap_models)
        self.periodic.every(self.settings.heartbeat_s, self.reap_requests)
        self.periodic.every(self.settings.request_lease_s / 3, self.serving.renew)
        self.retrainer.start()
        self.periodic.start()
        loops = [  # ended by cancellation alone, with nothing to clean up
            asyncio.create_task(watch(self.db, defaults.MODELS, self.settings.name, self.isolated, self._scan_models),
                                name=f"stream:{defaults.MODELS}"),
            asyncio.create_task(watch(self.db, defaults.REQUESTS, self.settings.name, self._request_event,
                                      self._scan_requests, pipeline=REQUEST_EVENTS, lookup=False,
                                      handling=self.serving.arrivals), name=f"stream:{defaults.REQUESTS}"),
            asyncio.create_task(self.intake.run(), name="intake"),
        ]
        serving = asyncio.create_task(self.serving.serve(), name="serving")
        log.info("listening on %s, database %r, as %s", redact(self.settings.uri), self.settings.db, self.owner)
        stop = asyncio.create_task(self.stop_event.wait())
        done, _ = await asyncio.wait([stop, *loops, serving], return_when=asyncio.FIRST_COMPLETED)
        await self._shutdown(loops, serving)
        for task in done:
            if task is not stop and task.exception():
                raise task.exception()

    async def _shutdown(self, loops: list[asyncio.Task], serving: asyncio.Task) -> None:
        await self.periodic.close(SHUTDOWN_DB_S)
        await self.retrainer.close(SHUTDOWN_DB_S)
        if self.metrics:
            self.metrics.close()
        trainings = [task for task in self.trainings.values() if task is not None]
        # Serving and trainings stop a process once cancelled, which a second cancel would cut short: they are
        # cancelled once. The loops are cancelled until they end: a cancel can be lost (`listener.tasks`).
        for task in [serving, *trainings]:
            task.cancel()
        await asyncio.gather(cancel_and_wait(loops, SHUTDOWN_DB_S, "streams"), serving, *trainings,
                             self.serving.seat.close(), return_exceptions=True)
        self.health.remove()
        try:  # with the database away, leases expire and the reaper hands the work on: never wait long
            await asyncio.wait_for(self._give_back(), SHUTDOWN_DB_S)
        except (TimeoutError, PyMongoError) as exc:
            log.warning("could not give back leases at exit (%s); they expire within %.0f s",
                        type(exc).__name__, self.settings.lease_s)

    async def _give_back(self) -> None:
        await self._release_all()
        await gangs.forget_all(self.books[defaults.LISTENER], self.owner)
        await self.books[defaults.LISTENER].delete_one({"_id": self._record_id})

    async def _heartbeat(self, started: bool = False) -> None:
        record = {"kind": "daemon", "name": self.settings.name, "owner": self.owner, "host": socket.gethostname(),
                  **liveness.identity(), "heartbeat_at": now(), "alive_until": leases.alive_until(self.settings.heartbeat_s),
                  "counters": self.counters,
                  "trainings": list(self.trainings), **self.gpus.heartbeat()}
        if started:
            record.update(started_at=now(), versions=versions())
        try:
            await self.books[defaults.LISTENER].update_one({"_id": self._record_id}, {"$set": record}, upsert=True)
        except PyMongoError as exc:
            log.warning("heartbeat not recorded: %s", exc)
            return
        self.health.beat(trainings=len(self.trainings), counters=self.counters)

    @property
    def _record_id(self) -> str:
        return f"{defaults.DAEMON_RECORD}{self.owner}"

    async def scan(self) -> None:
        await self._scan_models()
        await self._scan_requests()

    async def reap_models(self) -> None:
        """Requeue the runs of dead daemons, once their lease ran out; a requeued run then goes through the usual claim.

        What this daemon still trains is left alone even if its lease ran out while the daemon was paused:
        its own supervisor renews it (`leases.reap`). A run is not taken from a daemon for a missed
        heartbeat alone: its training child may still be at work."""
        if await leases.reap(self.books[defaults.MODELS], MODEL_TRANSITIONS, ModelState, self.settings.max_attempts,
                             self.skipped, self.owner, self.trainings):
            await self._scan_models()

    async def reap_requests(self) -> None:
        """Requeue the requests of daemons whose heartbeat stopped, at once, and any whose lease ran out; forget
        their gangs' node records.

        Requests are short and their answers are written fenced on owner and lease, so a daemon that
        was only paused loses its requests and its late answers are never written (`leases.take_over`)."""
        requests, s = self.books[defaults.REQUESTS], self.settings
        requeued = await leases.take_over(requests, REQUEST_TRANSITIONS, RequestState, s.max_attempts, self.skipped,
                                          self.books[defaults.LISTENER], self.owner)
        requeued += await leases.reap(requests, REQUEST_TRANSITIONS, RequestState, s.max_attempts, self.skipped,
                                      self.owner, self.serving.queues.held())
        await gangs.forget_dead(self.books[defaults.LISTENER], s.gang_wait_s)
        if requeued:
            self.intake.wake()

    async def _scan_models(self) -> None:
        await scan_pending(self)

    async def _scan_requests(self) -> None:
        self.intake.wake()

    async def _request_event(self, change: dict) -> None:
        self.intake.wake()

    async def isolated(self, document: dict) -> None:
        """One model document's problem fails that document, never the stream, the scan or the daemon.

        Network errors still propagate, so the stream reconnects and the event is delivered again.
        """
        try:
            await self.consider_model(document)
        except ConnectionFailure:
            raise
        except Exception as exc:
            if self.skipped.first("error models", document.get("_id")):  # once per document, not per scan
                log.exception("listener error on %s %.200r", defaults.MODELS, document.get("_id"))
            error = {"type": "listener_error", "message": f"the listener failed on this document "
                     f"({type(exc).__name__}); the operator's log says more. Set status to 'pending' to retry"}
            try:
                await transition(self.db[defaults.MODELS], document["_id"], Status.PENDING, Status.FAILED,
                                 MODEL_TRANSITIONS, fields={"error": error})
            except (OperationFailure, KeyError):
                pass  # nothing can be written to it (an _id the server will not update): logged once above

    async def _admit(self, document: dict) -> tuple[ModelState, ModelSpec] | None:
        """The (state, spec) of a pending model that is valid and not cancelled; None once handled.

        A malformed or invalid document ends `failed` and a cancelled one `cancelled`, here.
        """
        models = self.db[defaults.MODELS]
        try:
            state = parse(ModelState, document)
        except BadRecord as exc:
            await fail_malformed(models, MODEL_TRANSITIONS, document.get("_id"), Status.PENDING, exc, self.skipped)
            return None
        if state.status not in (None, Status.PENDING):
            return None
        if state.cancel:
            await transition(models, state.id, Status.PENDING, Status.CANCELLED, MODEL_TRANSITIONS, unset=("cancel",))
            return None
        try:
            spec = parse_model(document, self.settings.limits)
        except SpecError as exc:
            self.counters["invalid_documents"] += 1
            await transition(models, state.id, Status.PENDING, Status.FAILED, MODEL_TRANSITIONS,
                             fields={"error": exc.as_error()})
            log.info("model %r is invalid: %s", state.id, exc)
            return None
        return state, spec

    async def consider_model(self, document: dict) -> None:
        """Validate, then claim a pending model if this daemon has room for another training."""
        models = self.books[defaults.MODELS]
        admitted = await self._admit(document)
        key = ids.key(document.get("_id"))
        if admitted is None or key in self.trainings:
            self.gpus.forget(key)  # cancelled, failed, taken elsewhere or already training here: not waiting
            return
        state, spec = admitted
        if len(self.trainings) >= self.settings.max_jobs or self.stop_event.is_set() or \
                (spec.trainer.num_nodes > 1 and self._rests()):
            return
        self.trainings[key] = None  # the slot is taken before the await, so no other task can take it too
        work = None
        try:
            placed = await gpus.reserve(self.gpus, self.db, key, spec.trainer.num_gpus)
            if placed.error:
                await transition(models, state.id, Status.PENDING, Status.FAILED, MODEL_TRANSITIONS,
                                 fields={"error": placed.error})
            elif placed.wait:
                pass
            elif spec.trainer.num_nodes > 1:  # one node of it: claimed once the gang is whole (listener.gangs)
                work = (self._gang, key, state, spec, placed.devices)
            elif (claimed := await claim_model(models, state, self.owner, self.settings.lease_s,
                                               spec.warnings())) is not None:
                self.counters["trainings_started"] += 1
                work = (self._train, state.id, claimed["run"], placed.devices)
        finally:
            if work is None:
                self.trainings.pop(key, None)
                self.gpus.give_back(key)
        if work is not None:
            self.trainings[key] = asyncio.create_task(self._in_slot(key, *work))

    async def _in_slot(self, key: str, work: Callable[..., Awaitable[bool]], *args) -> None:
        """`work(*args)` holding the job slot `key`; the slot and its GPUs are free again once it returns (a training
        returns only once its child has exited). Once the slot did something (`work` says so), the daemon looks for
        more work; a gang with no place left it idle, and rescanning then would only find that gang again, flat out
        (the change stream and the periodic scan bring it back)."""
        try:
            worked = await work(*args)
        finally:
            self.trainings.pop(key, None)
            self.gpus.give_back(key)
        if worked and not self.stop_event.is_set():
            await self._scan_models()

    async def _gang(self, key: str, state: ModelState, spec, devices: tuple[int, ...] | None) -> bool:
        """One node of a job of several: take a place in its gang, wait for the others, then train it
        (`listener.gangs`); whether this daemon held a place in it."""
        models, listener = self.books[defaults.MODELS], self.books[defaults.LISTENER]
        gang = gangs.Gang(models, listener, self.settings, self.owner, state, key, spec.trainer.num_nodes,
                          spec.trainer.num_gpus, devices)
        try:
            try:
                rank = await gangs.take_place(gang, self.ports)
                if rank is None:
                    return False
                started = await gangs.form(gang, rank, spec.warnings(), self.gpus.waiting)
            except PyMongoError as exc:  # its entry, no longer renewed, expires: the others give the gang back
                log.warning("model %.200r: its gang could not form (%s); leaving it pending", state.id,
                            type(exc).__name__)
                return False
            except BadRecord as exc:  # a user rewrote the gang's fields as it formed
                await fail_malformed(models, MODEL_TRANSITIONS, state.id, Status.PENDING, exc, self.skipped)
                return True
            if started is gangs.GivenBack.OVERDUE:
                self.resting = asyncio.get_running_loop().time() + self.settings.gang_wait_s
            elif started is not None:
                node, run = started
                self.counters["trainings_started"] += node.rank == 0
                await self._train(state.id, run, devices, node)
            return True
        finally:
            gangs.release(self.ports, key)
            with contextlib.suppress(PyMongoError):
                await gangs.leave(models, listener, state.id, self.owner, key)

    def _rests(self) -> bool:
        """Whether this daemon gave any gang back at its deadline less than `gang_wait_s` ago (never for a cancel or a
        lost entry, which a writer can make at will): every job of one node goes
        first meanwhile. Resting each gang alone let a daemon go from one gang that cannot form (its hosts busy) to
        the next, each deadline, while another user's job waited; now N such gangs cost that job at most one
        `gang_wait_s` however large N is. The change stream and the periodic scan bring the gangs back."""
        return asyncio.get_running_loop().time() < self.resting

    async def _train(self, model_id, run: int, devices: tuple[int, ...] | None, node: gangs.Node | None = None) -> bool:
        """Train one claimed run to its end; True: the slot worked (`_in_slot`)."""
        outcome = await self.train(self.books, self.settings, model_id, run, self.owner, self.forks, devices=devices,
                                   **({"node": node} if node else {}))
        if outcome is Status.SUCCEEDED:
            self.counters["trainings_succeeded"] += 1
        elif outcome is Status.FAILED:
            self.counters["trainings_failed"] += 1
        return True

    async def _release_all(self) -> None:
        """Give back what this daemon holds, so any daemon resumes or answers it at once."""
        for name, table in ((defaults.MODELS, MODEL_TRANSITIONS), (defaults.REQUESTS, REQUEST_TRANSITIONS)):
            held = self.books[name].find({"status": Status.RUNNING.value, "lease.owner": {"$eq": self.owner}},
                                         {"_id": 1})
            async for document in held:
                await leases.give_back(self.books[name], table, document["_id"], self.owner)
                log.info("released %s %r for another daemon", name, document["_id"])


async def scan_pending(daemon: Daemon) -> None:
    """Every pending model, one at a time, read raw: one nested deeper than the listener reads (which the driver
    may not even decode) fails by its id (or is skipped where the server cannot change it), and the others are
    considered."""
    models = daemon.db[defaults.MODELS]
    async for document in raw(models).find(status_filter(Status.PENDING)):
        try:
            value = decoded(document)
        except SpecError as exc:
            try:
                await fail_undecodable(models, MODEL_TRANSITIONS, document, exc, daemon.skipped)
            except OperationFailure as again:  # it had an id: logged once, and read again by the next scan
                daemon.skipped.skip(defaults.MODELS, raw_id(document), again)
            continue
        await daemon.isolated(value)


async def _serve(settings: Settings) -> None:
    clients = []
    try:
        for role in CLIENT_ROLES:
            clients.append(await connect(settings.uri, role=role))
        client, bookkeeping, retraining = clients
        daemon = Daemon(client, settings, bookkeeping=bookkeeping, retraining=retraining)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, daemon.stop_event.set)
        await daemon.work()
    finally:
        try:  # ends sessions and kills cursors on the server: bounded like every other write at exit
            await asyncio.wait_for(asyncio.gather(*(client.close() for client in clients)), SHUTDOWN_DB_S)
        except (TimeoutError, PyMongoError) as exc:
            log.warning("could not close the connection to MongoDB cleanly at exit (%s)", type(exc).__name__)


def serve(settings: Settings) -> None:
    """Run a daemon until SIGTERM/SIGINT; with no URI, on the embedded server."""
    gangs.check_advertised(settings.advertise_addr)
    forget_connection_environment(settings.uri)  # what this daemon starts inherits its environment
    if settings.uri:
        asyncio.run(_serve(settings.model_copy(update={"db": database_name(settings.uri, settings.db)})))
        return
    # The home's server outlives this daemon: other daemons and mongosh sessions may use it.
    server = embedded.EmbeddedServer(settings.home / "embedded").start(f"daemon {settings.name} (pid {os.getpid()})")
    db = database_name(server.uri, settings.db)
    log.info("embedded server at %s (data in %s)", server.uri_for(db), server.folder)
    try:
        asyncio.run(_serve(settings.model_copy(update={"uri": server.uri, "db": db})))
    finally:
        log.info("the embedded server at %s keeps running; `listener server stop` stops it", server.uri_for(db))
