"""What the daemon reads back, parsed where it is read: anyone with write access may have written it.

Each read (change events, scans, reaps, renewals, `_listener` records) goes through one of these
typed parses. A record that does not fit raises `BadRecord` naming the field, and the caller skips
it (logging it once) or fails that one document; no loop ends because of one record.
"""

import datetime as dt
import logging
from collections import OrderedDict
from typing import Annotated, Any

import bson
from bson.codec_options import CodecOptions
from bson.errors import InvalidBSON
from bson.raw_bson import RawBSONDocument, _RawArrayBSONDocument  # pymongo pinned (requirements.lock)
from pymongo.errors import OperationFailure
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from listener.status import Status
from training import defaults, ids
from training.config import SpecError, check_depth, too_deep

log = logging.getLogger(__name__)


class BadRecord(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)


class Lease(_Record):
    owner: str
    expires_at: dt.datetime


class Member(_Record):
    """One node's entry in a model's `nodes` (`listener.gangs`): the listener's, but a user may rewrite any of it, so
    it counts only while its daemon's `NodeRecord` vouches for it."""

    owner: str = Field(max_length=300)
    name: str = Field(max_length=300)
    host: str = Field(max_length=300)
    devices: list = Field(max_length=64)
    joined_at: dt.datetime
    expires_at: dt.datetime
    addr: str | None = Field(None, max_length=255)
    port: int | None = Field(None, ge=1, le=65_535)


Nodes = Annotated[list[Member], Field(max_length=64)]  # a job's nodes (`training.limits` caps num_nodes below)


class ModelState(_Record):
    """The listener-owned fields of a `_models` document, as the daemon relies on them."""

    id: Any = Field(alias="_id")
    status: Status | None = Field(None, strict=False)
    run: int = Field(0, ge=0, le=2**31)
    attempts: int = Field(0, ge=0, le=2**31)
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    cancel: bool | None = None
    lease: Lease | None = None
    history: list[dict] = Field(default_factory=list, max_length=10_000)
    metrics: list = Field(default_factory=list)  # the training child appends to it: it must be an array
    nodes: Nodes | None = None  # the gang of a job of several nodes (`listener.gangs`)

    def interrupted(self) -> bool:
        """A run that started and never finished (its daemon stopped or died) is resumed, not restarted."""
        return self.run > 0 and self.started_at is not None and self.finished_at is None


class RequestState(_Record):
    id: Any = Field(alias="_id")
    status: Status | None = Field(None, strict=False)
    attempts: int = Field(0, ge=0, le=2**31)
    cancel: bool | None = None
    lease: Lease | None = None
    history: list[dict] = Field(default_factory=list, max_length=10_000)


class Progress(_Record):
    step: int = Field(ge=0)
    total_steps: int = Field(ge=0)
    loss: float | None = None
    eta_s: float | None = None


class Renewed(_Record):
    """What a lease renewal reads back while a child trains."""

    cancel: bool | None = None
    progress: Progress | None = None


class ChangeEvent(_Record):
    operation: str = Field(alias="operationType")
    full_document: dict | None = Field(None, alias="fullDocument")


class ResumeRecord(_Record):
    token: dict


class DaemonRecord(_Record):
    owner: str
    name: str
    host: str
    pid: int
    boot_id: str | None = None  # with pid_ns, uid and pid_started: its process, as `liveness.identity` tells it
    pid_ns: str | None = None
    uid: int | None = None
    pid_started: int | None = None
    heartbeat_at: dt.datetime
    alive_until: dt.datetime | None = None  # heartbeat_at plus a few of its own intervals (`leases.alive`)
    counters: dict[str, int] = Field(default_factory=dict)
    trainings: list[str] = Field(default_factory=list)
    gpus: list[int] = Field(default_factory=list)  # what the daemon may give its trainings (listener.gpus)
    gpus_free: list[int] = Field(default_factory=list)
    waiting: list[dict[str, str]] = Field(default_factory=list)  # [{model, why}]: pending models it would take
    versions: dict[str, str] = Field(default_factory=dict)  # Python's and the libraries' (`training.lineage`)


class NodeRecord(_Record):
    """What a daemon vouches for in `_listener` while it is one node of a job (`listener.gangs`): its rank, what it
    brings, node 0's rendezvous endpoint and, once it claimed the job, the run it claimed and that run's rendezvous
    id; once its node ended on its own, the exit code and the run."""

    owner: str
    model: str
    rank: int = Field(ge=0, lt=64)
    name: str
    host: str
    devices: list
    at: dt.datetime
    addr: str | None = None
    port: int | None = None
    exit: int | None = None
    run: int | None = None
    claimed: int | None = None
    rendezvous: str | None = None


def parse(kind: type[BaseModel], document: Any):
    """`kind` from a raw document, or BadRecord naming the first field that does not fit."""
    if not isinstance(document, dict):
        raise BadRecord("", f"expected a document, got {type(document).__name__}")
    try:
        return kind.model_validate(document)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "json-or-python")))
        raise BadRecord(field, err["msg"]) from None


CODEC = CodecOptions(**defaults.CODEC)
TOP_LEVEL = CODEC.with_options(document_class=_RawArrayBSONDocument)  # nested values stay raw (`raw_id`)


def raw(collection):
    """`collection`, its documents read as raw BSON: the driver decodes none of a batch, so one it cannot decode
    (nested deeper than Python's recursion limit, which the embedded server stores) stops no loop; see `decoded`."""
    return collection.with_options(codec_options=collection.codec_options.with_options(document_class=RawBSONDocument))


def decoded(document: RawBSONDocument) -> dict:
    """A raw document as every other read gives it, or SpecError (`training.config.too_deep`) naming the top-level
    field nested past `MAX_DEPTH` levels (whether the driver could decode it here or not: that depends on how
    deep its caller's stack already is)."""
    try:
        value = bson.decode(document.raw, CODEC)
    except (InvalidBSON, RecursionError):
        raise too_deep(_undecodable_field(document)) from None
    check_depth(value)
    return value


async def readable(cursor, skipped: "SkipLog", where: str):
    """The documents of a raw cursor (`raw`) decoded, those nested deeper than the listener reads skipped (logged
    once each): for reads that fail nothing, so one document never ends the loop reading them."""
    async for document in cursor:
        if (value := _decoded_or_skipped(document, skipped, where)) is not None:
            yield value


async def read_each(collection, query: dict, projection: dict, skipped: "SkipLog", where: str) -> list[dict]:
    """`readable` for a small set (expired leases, a daemon's trainings): read whole where the server cannot
    project one of them (the embedded one fails a projection that reaches ~900 levels deep)."""
    documents = raw(collection)
    try:
        found = await documents.find(query, projection).to_list()
    except OperationFailure:
        found = await documents.find(query).to_list()
    return [value for document in found if (value := _decoded_or_skipped(document, skipped, where)) is not None]


def _decoded_or_skipped(document: RawBSONDocument, skipped: "SkipLog", where: str) -> dict | None:
    try:
        return decoded(document)
    except SpecError as exc:
        skipped.skip(where, raw_id(document), exc)
        return None


def raw_id(document: RawBSONDocument):
    """A raw document's `_id`, decoding its top level only (documents and arrays there stay raw, so one nested too
    deep at the top level still gives its id); None where even that fails."""
    try:
        return _RawArrayBSONDocument(document.raw, TOP_LEVEL)["_id"]
    except (InvalidBSON, RecursionError, KeyError):
        return None


def only(document: RawBSONDocument, fields: dict) -> RawBSONDocument | None:
    """`document` with only its `_id` and the top-level `fields`, still raw: the projection done here, for a
    document the server itself cannot project (the embedded one fails on an `_id` ~975 levels deep). None where
    even its top level cannot be read, as for `raw_id`."""
    try:
        top = _RawArrayBSONDocument(document.raw, TOP_LEVEL)
        return RawBSONDocument(bson.encode({name: top[name] for name in ("_id", *fields) if name in top}))
    except (InvalidBSON, RecursionError):
        return None


def _undecodable_field(document: RawBSONDocument) -> str:
    """The first top-level field the driver cannot decode; "" where even the top level cannot be read."""
    try:
        fields = list(document.items())  # sub-documents stay raw here
    except (InvalidBSON, RecursionError):
        return ""
    for field, value in fields:
        try:
            bson.decode(bson.encode({field: value}), CODEC)
        except (InvalidBSON, RecursionError):
            return field
    return ""


class SkipLog:
    """Logs each skipped record once, by id, remembering a bounded number of them."""

    def __init__(self, capacity: int = 10_000):
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.capacity = capacity

    def first(self, where: str, doc_id) -> bool:
        """True the first time this document is seen here (within the last `capacity` ones)."""
        key = f"{where}:{ids.key(doc_id)[:300]}"
        if key in self._seen:
            return False
        self._seen[key] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return True

    def skip(self, where: str, doc_id, reason: Exception) -> None:
        if self.first(where, doc_id):
            log.warning("skipping %s %.200r: %.300s", where, doc_id, reason)

    async def warn(self, models, where: str, model_id, warning: str) -> None:
        """Tell a model's writer, once (per `where`), in its `warnings` and the log, what the daemon will not do for
        it."""
        if not self.first(where, model_id):
            return
        log.warning("%s: %.200r", warning, model_id)
        try:
            await models.update_one({"_id": ids.eq(model_id)}, {"$addToSet": {"warnings": warning}})
        except OperationFailure as exc:  # `warnings` is not an array, or the model is too large: the log says it
            log.warning("cannot add a warning to %.200r (%s)", model_id, exc)
