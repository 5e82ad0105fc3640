"""Prometheus metrics and `/healthz` for one daemon, served from its own process (`--metrics-port`).

The daemon's loop takes a snapshot every heartbeat (models and requests by status from the
database, this daemon's counters, its trainings' steps per second, serving's queue depth, GPU
memory from nvidia-smi) and the HTTP thread serves only that snapshot, so a scrape never touches the loop's
objects or the database. Request latencies (claim to done) are observed as each request ends.
`/healthz` answers with the same check as `listener status --check`, for this daemon's name.
"""

import asyncio
import logging
import shutil
import subprocess
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pymongo.errors import PyMongoError

from listener import health
from listener.records import SkipLog, read_each
from listener.status import BY_STATUS, MODEL_TRANSITIONS, REQUEST_TRANSITIONS, Status
from training import defaults, ids

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)  # seconds, claim to done
MIB = 2**20  # nvidia-smi reports memory in MiB
MAX_GPUS = 64  # more lines than any host has GPUs is not nvidia-smi talking


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args) -> None:
        """Scrapes every few seconds would drown the daemon's own log."""


class Snapshot:
    """The metric families of the last refresh; the HTTP thread reads them, the loop replaces them whole."""

    def __init__(self):
        self.families: list = []

    def collect(self):
        return iter(self.families)


class Metrics:
    def __init__(self, daemon):
        self.daemon = daemon
        self.skipped = SkipLog()  # models it cannot read, logged once each
        self.registry = CollectorRegistry()
        self.snapshot = Snapshot()
        self.registry.register(self.snapshot)
        self.latency = Histogram("mongotune_request_latency_seconds", "Requests answered by this daemon, from "
                                 "claim to done", buckets=LATENCY_BUCKETS, registry=self.registry)
        self._steps: dict[str, tuple[int, float]] = {}  # model -> (step, time of that step's progress write)
        self._gpu = None  # a function giving [(device, used bytes, total bytes)], found on the first refresh
        self._server: _Server | None = None

    def start(self, host: str, port: int) -> None:
        app = make_wsgi_app(self.registry)
        settings = self.daemon.settings

        def route(environ, start_response):
            if environ.get("PATH_INFO") != "/healthz":
                return app(environ, start_response)
            healthy, why = health.check(settings.home, 3 * settings.heartbeat_s, settings.name)
            start_response("200 OK" if healthy else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [why.encode() + b"\n"]

        try:
            self._server = make_server(host, port, route, _Server, handler_class=_Quiet)
        except OSError as exc:
            raise RuntimeError(f"--metrics-port {port}: cannot listen on {host}:{port} ({exc.strerror})") from None
        threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True).start()
        log.info("metrics on http://%s:%d/metrics, health on /healthz", host, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    async def refresh(self) -> None:
        """Take a new snapshot; a database that does not answer leaves the counts out, not the rest."""
        daemon = self.daemon
        families = [self._counters(), self._queue_depth(), await self._gpu_memory()]
        try:
            families += [await self._by_status(defaults.MODELS, MODEL_TRANSITIONS, "mongotune_models"),
                         await self._by_status(defaults.REQUESTS, REQUEST_TRANSITIONS, "mongotune_requests"),
                         await self._step_rates()]
        except PyMongoError as exc:
            log.warning("metrics: cannot count documents: %s", exc)
        daemon_jobs = GaugeMetricFamily("mongotune_daemon_trainings", "Trainings this daemon runs now")
        daemon_jobs.add_metric([], len(daemon.trainings))
        self.snapshot.families = [*families, daemon_jobs]

    def _counters(self) -> CounterMetricFamily:
        family = CounterMetricFamily("mongotune_daemon_events", "What this daemon did since it started",
                                     labels=["event"])
        for event, value in dict(self.daemon.counters).items():
            family.add_metric([event], value)
        return family

    def _queue_depth(self) -> GaugeMetricFamily:
        family = GaugeMetricFamily("mongotune_serving_queue_depth", "Claimed requests waiting in this daemon, "
                                   "by model", labels=["model"])
        for model, depth in self.daemon.serving.queues.queued().items():
            family.add_metric([model], depth)
        return family

    async def _by_status(self, collection: str, table: dict, name: str) -> GaugeMetricFamily:
        """Documents of `collection` by status; a status users made up is not a label (labels stay few)."""
        family = GaugeMetricFamily(name, f"Documents in {collection} by status (all daemons)", labels=["status"])
        counts = {status.value: 0 for status in set(table).union(*table.values())}
        async for row in await self.daemon.db[collection].aggregate(BY_STATUS):
            if row["_id"] in counts:  # a status users made up is grouped as `other`
                counts[row["_id"]] += row["n"]
        for status, n in sorted(counts.items()):
            family.add_metric([status], n)
        return family

    async def _step_rates(self) -> GaugeMetricFamily:
        """Steps per second of this daemon's trainings, between the last two progress writes seen."""
        family = GaugeMetricFamily("mongotune_training_steps_per_second", "Training speed of this daemon's runs",
                                   labels=["model"])
        seen = {}
        running = {"status": Status.RUNNING.value, "lease.owner": {"$eq": self.daemon.owner}}
        for doc in await read_each(self.daemon.db[defaults.MODELS], running, {"progress": 1}, self.skipped, "metrics"):
            progress = doc.get("progress") if isinstance(doc.get("progress"), dict) else {}
            step, at = progress.get("step"), progress.get("updated_at")
            if not isinstance(step, int) or not hasattr(at, "timestamp"):
                continue
            key, now = ids.key(doc["_id"]), (step, at.timestamp())  # an ObjectId and its hex are two models
            seen[key] = before = self._steps.get(key, now)
            if now[1] > before[1] and now[0] >= before[0]:
                family.add_metric([key], (now[0] - before[0]) / (now[1] - before[1]))
                seen[key] = now
        self._steps = seen
        return family

    async def _gpu_memory(self) -> GaugeMetricFamily:
        family = GaugeMetricFamily("mongotune_gpu_memory_bytes", "GPU memory by device, all processes (nvidia-smi)",
                                   labels=["device", "kind"])
        if self._gpu is None:
            self._gpu = await asyncio.to_thread(_gpu_reader)
        for device, used, total in await asyncio.to_thread(self._gpu):
            family.add_metric([str(device), "used"], used)
            family.add_metric([str(device), "total"], total)
        return family


def _gpu_reader():
    """nvidia-smi's view of each GPU (every process's use, training children included) when it is installed.

    Not torch.cuda: reading memory through it opens a CUDA context on every GPU in the daemon, which
    costs each GPU a few hundred MiB that training could use, and imports torch into the daemon.
    A driver problem leaves the GPU series out, with one warning until nvidia-smi answers again.
    """
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return list
    failing = False

    def read():
        nonlocal failing
        try:
            found = parse_gpu_memory(_query(binary))
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            if not failing:
                log.warning("metrics: no GPU memory from %s (%s); left out until it answers", binary, exc)
            failing = True
            return []
        if failing:
            log.info("metrics: %s answers again; GPU memory is back", binary)
        failing = False
        return found

    return read


def _query(binary: str) -> str:
    query = [binary, "--query-gpu=index,memory.used,memory.total", "--format=csv,noheader,nounits"]
    done = subprocess.run(query, capture_output=True, text=True, timeout=10)
    if done.returncode:
        said = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise subprocess.SubprocessError(f"exit status {done.returncode}" + (f": {said[0][:200]}" if said else ""))
    return done.stdout


def parse_gpu_memory(text: str) -> list[tuple[int, int, int]]:
    """(index, used bytes, total bytes) from nvidia-smi's CSV in MiB; ValueError on anything else ("[N/A]" too)."""
    rows = []
    for line in text.strip().splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 3 or not all(field.isascii() and field.isdigit() for field in fields):
            raise ValueError(f"unexpected nvidia-smi line {line[:80]!r}")
        index, used, total = map(int, fields)
        rows.append((index, used * MIB, total * MIB))
    if len(rows) > MAX_GPUS:
        raise ValueError(f"{len(rows)} GPUs listed, more than the {MAX_GPUS} a host can have")
    return rows


def attach(daemon, periodic) -> Metrics | None:
    """Serve this daemon's metrics when `--metrics-port` is set: the HTTP thread, the refresh, the latency hook."""
    settings = daemon.settings
    if not settings.metrics_port:
        return None
    metrics = Metrics(daemon)
    metrics.start(settings.metrics_host, settings.metrics_port)
    daemon.serving.answers.on_answered = metrics.latency.observe
    periodic.every(settings.heartbeat_s, metrics.refresh)
    return metrics
