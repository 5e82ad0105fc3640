"""The operator's settings, parsed once at start: options over environment over defaults.

Nothing reads the environment at import time, so `listener --help` works whatever it holds, and a
bad value is one line naming the variable (`SettingsError`), never a traceback. The `Settings`
object is passed down; `limits` travels on to the training child and the serving worker.
"""

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from training.limits import ENV_PREFIX, Limits
from training.offline import cache_root


ALIVE_BEATS = 4  # heartbeats a daemon may miss before the others take its requests over (`leases.alive`)

# Settings `listener start` has an option of its own for; every other one is `--set NAME=VALUE`.
OPTION_NAMES = {"uri": "--uri", "uri_file": "--uri-file", "db": "--db", "name": "--name", "max_jobs": "--max-jobs", "gpus": "--gpus",
                "validators": "--validators", "model_roots": "--model-root", "metrics_port": "--metrics-port",
                "log_format": "--log-format", "advertise_addr": "--advertise-addr"}


class SettingsError(ValueError):
    """A setting the operator gave that cannot be used; the message names it."""


def default_home() -> Path:
    """MONGOTUNE_HOME, else the per-user data folder."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "mongotune"


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str | None = Field(None, description="MongoDB URI; none: the embedded server")
    uri_file: Path | None = Field(None, description="a file holding the URI, so no password shows in `ps`")
    db: str | None = Field(None, description="database; else the URI's path, else MONGOTUNE_DB, else 'mongotune'")
    home: Path = Field(default_factory=default_home, description="embedded server data, job logs, caches")
    name: str = Field(default_factory=socket.gethostname, min_length=1, max_length=200,
                      description="this daemon's name; its resume tokens are kept under it")
    max_jobs: int = Field(1, ge=1, le=64, description="trainings this daemon runs at once")
    gpus: tuple[int, ...] | None = Field(None, description="GPU ids this daemon may give its trainings (0,1,2,3); "
                                         "unset: every visible GPU; 'none': run on the CPU (listener.gpus)")
    validators: bool = Field(True, description="install $jsonSchema validators at start")
    lease_s: float = Field(60.0, ge=1.0, le=86_400, description="a training's claim lifetime; renewed every quarter "
                           "of it")
    request_lease_s: float = Field(15.0, ge=1.0, le=3_600, description="a request's claim lifetime; renewed every "
                                   "third of it while queued or generating")
    scan_s: float = Field(30.0, ge=0.5, le=86_400, description="catch-up scan for pending documents")
    heartbeat_s: float = Field(2.0, ge=0.5, le=3_600, description="how often the daemon records that it lives; "
                               f"after {ALIVE_BEATS} missed, other daemons take over its requests")
    retrain_check_s: float = Field(5.0, ge=0.2, le=3_600, description="how often the daemon looks for models to "
                                   "retrain and for new ones whose data it must watch")
    retrain_max_collections: int = Field(16, ge=1, le=1_000, description="data collections one daemon follows for "
                                         "`retrain.on_new_documents`: one change stream each, on a client of its own")
    retrain_max_models: int = Field(1_000, ge=1, le=10_000, description="models one daemon counts new documents "
                                    "for; the rest wait, in order of their ids, until others stop following")
    max_attempts: int = Field(3, ge=1, le=100, description="claims of one run or request before it is failed")
    max_run_s: float = Field(24 * 3600.0, ge=10, description="wall-clock time of one training run")
    kill_grace_s: float = Field(30.0, ge=1, le=3_600, description="SIGTERM to SIGKILL for a child told to stop")
    request_timeout_s: float = Field(300.0, ge=1, le=86_400, description="generation time for one batch of requests")
    load_timeout_s: float = Field(600.0, ge=1, le=86_400, description="time to load one model for serving")
    serving_memory_bytes: int = Field(16 * 2**30, ge=2**26, description="memory of the serving worker")
    serving_disk_bytes: int = Field(20 * 2**30, ge=2**20, description="checkpoints unpacked on disk for serving")
    max_log_bytes: int = Field(20 * 2**20, ge=2**16, description="one training job's log file")
    max_batch: int = Field(16, ge=1, le=1024, description="requests generated together")
    batch_window_s: float = Field(0.5, ge=0, le=10,
                                  description="longest wait after a request for those inserted with it to be claimed")
    max_queue_per_model: int = Field(32, ge=1, description="requests one daemon holds for one model")
    max_queued_requests: int = Field(64, ge=1, description="requests one daemon holds in all: what it cannot "
                                     "answer soon stays pending for another daemon")
    max_collection_jobs: int = Field(4, ge=1, description="requests over a collection (watching ones too) one "
                                     "daemon runs at once, apart from the places of other requests")
    max_collection_jobs_per_model: int = Field(2, ge=1, description="requests over one collection one daemon "
                                               "runs at once for one model")
    metrics_port: int | None = Field(None, ge=1, le=65_535,
                                     description="serve Prometheus metrics and /healthz on this port; none: off")
    metrics_host: str = Field("127.0.0.1", min_length=1, max_length=255,
                              description="address the metrics port listens on (0.0.0.0 for probes from outside)")
    log_format: Literal["text", "json"] = Field("text", description="'json': one JSON object per log line")
    preload_best: bool = Field(False, description="load a model's best checkpoint for serving as soon as it is "
                                                   "promoted or its run ends, before the first request")
    requests_ttl_s: int | None = Field(None, ge=1, le=10 * 365 * 86_400,
                                       description="answered requests are deleted this long after; none: kept")
    advertise_addr: str = Field("127.0.0.1", min_length=1, max_length=255,
                                description="the address other hosts reach this daemon at, for the rendezvous of "
                                "jobs of several nodes it is node 0 of (listener.gangs)")
    rendezvous_ports: tuple[int, int] = Field((29400, 29499), description="the ports (FIRST-LAST) this daemon "
                                              "hosts those rendezvous on; open them between the hosts")
    gang_wait_s: float = Field(60.0, ge=1, le=86_400, description="how long the nodes of a job of several "
                               "nodes wait for the rest of them before each is given back")
    limits: Limits = Field(default_factory=Limits)

    @field_validator("gpus", mode="before")
    @classmethod
    def _no_gpus(cls, value):
        """`--gpus none` (or an empty list): declare no GPU at all."""
        if isinstance(value, str):
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        if isinstance(value, (tuple, list)) and [str(v).lower() for v in value] in ([], ["none"]):
            return ()
        return value

    @field_validator("rendezvous_ports", mode="before")
    @classmethod
    def _port_range(cls, value):
        """FIRST-LAST (or one port), within 1-65535 and in order."""
        if isinstance(value, (tuple, list)) and len(value) == 1:  # as `from_text` splits a variable
            value = value[0]
        if isinstance(value, str):
            parts = value.split("-")
            if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
                raise ValueError("give a port range as FIRST-LAST, e.g. 29400-29499")
            value = (int(parts[0]), int(parts[-1]))
        if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(type(v) is int for v in value)):
            raise ValueError("give a port range as FIRST-LAST, e.g. 29400-29499")  # "29400,29499" splits in two
        first, last = value
        if not 1 <= first <= last <= 65_535:
            raise ValueError("give a port range FIRST-LAST with 1 <= FIRST <= LAST <= 65535")
        return (first, last)

    @property
    def job_logs(self) -> Path:
        return self.home / "logs"

    @classmethod
    def load(cls, options: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> "Settings":
        """Options (None means unset) over `MONGOTUNE_*` variables over defaults; limits likewise."""
        environ = os.environ if environ is None else environ
        options = {k: v for k, v in (options or {}).items() if v is not None and v != ()}
        values = _gather(cls, options, environ, skip={"limits", "db"})  # MONGOTUNE_DB ranks below the URI's path
        if "db" in options:
            values["db"] = (options["db"], "--db")
        given = {k: v for k, v in (options.get("limits") or {}).items() if v is not None and v != ()}
        limits = _gather(Limits, given, environ, skip={"private_roots"})
        settings = _build(cls, values)
        limits.setdefault("model_roots", ((cache_root(),), "default"))
        limits["private_roots"] = ((settings.home,), "--home")
        return settings.model_copy(update={"limits": _build(Limits, limits), **_uri_from_file(settings)})


def _gather(model: type[BaseModel], options: Mapping[str, Any], environ: Mapping[str, str], skip: set) -> dict:
    values = {}
    for name in model.model_fields:
        if name in skip:
            continue
        variable = ENV_PREFIX + name.upper()
        if name in options:
            values[name] = (options[name], OPTION_NAMES.get(name, f"--set {name}"))
        elif environ.get(variable, "") != "":
            values[name] = (from_text(model, name, environ[variable]), variable)
    return values


def from_text(model: type[BaseModel], name: str, raw: str):
    """A setting as typed in a variable or `--set`: lists split on ',' (folders on ':'), the rest as is."""
    if "tuple" not in str(model.model_fields[name].annotation):
        return raw
    separator = os.pathsep if name.endswith("roots") else ","
    return tuple(part.strip() for part in raw.split(separator) if part.strip())


def _build(model: type[BaseModel], values: dict):
    try:
        return model.model_validate({name: value for name, (value, _) in values.items()})
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0])
        given, source = values.get(name, (None, ENV_PREFIX + name.upper()))
        raise SettingsError(f"{source}: {err['msg'].removeprefix('Value error, ').lower()} (got {given!r:.80})") from None


def _uri_from_file(settings: Settings) -> dict:
    if settings.uri or not settings.uri_file:
        return {}
    try:
        uri = settings.uri_file.read_text().strip()
    except OSError as exc:
        raise SettingsError(f"--uri-file: cannot read {settings.uri_file}: {exc.strerror}") from None
    if not uri:
        raise SettingsError(f"--uri-file: {settings.uri_file} is empty")
    return {"uri": uri}
