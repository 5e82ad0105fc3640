"""Robustness against a running daemon, and through restarts: every field it reads, every BSON type.

Nothing here is a list of cases. The fields come from the classes the daemon parses with
(`ModelSpec`, `RequestSpec` and every model nested in them where the document holds an object,
plus `LISTENER_FIELDS`, the `listener.records` classes for the reaper and `_listener`), and the
values from one pool of BSON values of every type. Each generated document is written to a probe
collection no daemon watches, read back with the daemon's own codec, and its expected end is
computed with the daemon's own parsers (`records.parse`, `parse_model`, `parse_request`):

- not matched by the daemon's pending query: left exactly as written;
- a listener-owned field of the wrong shape: `failed`, `error.field` naming it;
- a user field that does not parse: `failed`, `error.field` the SpecError's field;
- `cancel: true`: `cancelled`;
- otherwise: a model `succeeded` (or `failed` naming the same field, for data that only training
  can judge), a request `done`, or failed `model_unavailable` when no model has that exact id.

After each scenario: the daemon is alive, a normal model trained once (`run == 1`, `attempts == 1`)
and a normal request was answered, nothing trained twice or beside more than `max_jobs` others,
and no answer came from a model other than the one asked for. Then the daemon is SIGKILLed and a
daemon of the same name must start and serve.
"""

import copy
import dataclasses
import datetime as dt
import re
import signal
import threading
import time
import typing
import uuid
from collections.abc import Callable
from random import Random

import bson
import pytest
from bson import Code, DBRef, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson.binary import Binary, UuidRepresentation
from bson.codec_options import CodecOptions
from bson.datetime_ms import DatetimeMS
from bson.raw_bson import RawBSONDocument
from click.testing import CliRunner
from pydantic import BaseModel
from pymongo.errors import PyMongoError

from listener.cli.status import status as status_command
from listener.demo import load_samples
from listener.records import BadRecord, DaemonRecord, ModelState, RequestState, ResumeRecord, parse
from listener.processes import wait_until
from listener.status import Status, status_filter
from tests import documents
from tests.conftest import finished, wait_for
from training import defaults, ids
from training.config import LISTENER_FIELDS, GenerationParams, ModelSpec, RequestSpec, SpecError, parse_model, \
    parse_request

SEED = 20240611
TRAINER = {"max_steps": 1, "per_device_train_batch_size": 2, "max_seq_length": 32}
MAX_ATTEMPTS = 3  # the daemon's default `max_attempts`
LEASE_S = "10"  # short leases, so the reaper runs every 5 s
SETTLE_S = 240

# ---------------------------------------------------------------------------------------------
# The pool of values: every BSON type, and the awkward values of each
# ---------------------------------------------------------------------------------------------

OID = ObjectId("65f0a1b2c3d4e5f601234567")
UUID = uuid.UUID("12345678-1234-5678-1234-567812345678")


def _deep(n: int) -> dict:
    value: typing.Any = "bottom"
    for _ in range(n):
        value = {"x": value}
    return value


# label -> a factory (each use gets a fresh object). Labels end up in document ids.
POOL: dict[str, Callable[[], typing.Any]] = {
    "null": lambda: None,
    "true": lambda: True,
    "false": lambda: False,
    "int0": lambda: 0,
    "int-1": lambda: -1,
    "int7": lambda: 7,
    "int64": lambda: Int64(2**40),
    "int64max": lambda: Int64(2**63 - 1),
    "int64min": lambda: Int64(-(2**63)),
    "float": lambda: 0.5,
    "float1": lambda: 1.0,
    "nan": lambda: float("nan"),
    "inf": lambda: float("inf"),
    "-inf": lambda: float("-inf"),
    "huge-float": lambda: 1e300,
    "decimal": lambda: Decimal128("1.5"),
    "decimal-nan": lambda: Decimal128("NaN"),
    "str-empty": lambda: "",
    "str": lambda: "plain",
    "str-100k": lambda: "a" * 100_000,
    "str-where": lambda: "$where",
    "str-js": lambda: "function() { while (true) {} }",
    "str-format": lambda: "{__class__.__init__.__globals__}",
    "str-nul": lambda: "a\x00b",
    "str-unicode": lambda: "\u00fc\U0001f3f4\u200d\u2620\ufe0f",
    "str-path": lambda: "../../etc/passwd",
    "oid": lambda: OID,
    "oid-str": lambda: str(OID),
    "datetime": lambda: dt.datetime(2024, 1, 2, tzinfo=dt.timezone.utc),
    "datetime-far": lambda: DatetimeMS(2**62),
    "datetime-before": lambda: DatetimeMS(-(2**62)),
    "regex": lambda: Regex("^a.*", "i"),
    "code": lambda: Code("function() { return 1; }"),
    "code-scope": lambda: Code("function() { return x; }", {"x": 1}),
    "binary": lambda: Binary(b"\x00\xff\x10", 0),
    "binary-user": lambda: Binary(b"payload", 128),
    "uuid": lambda: Binary.from_uuid(UUID, UuidRepresentation.STANDARD),
    "minkey": lambda: MinKey(),
    "maxkey": lambda: MaxKey(),
    "timestamp": lambda: Timestamp(1_700_000_000, 1),
    "dbref": lambda: DBRef("_models", OID),
    "list-empty": lambda: [],
    "list-null": lambda: [None],
    "list-pending": lambda: ["pending"],
    "list-100k": lambda: list(range(100_000)),
    "list-pair": lambda: ["prompt", "response"],
    "list-messages": lambda: [{"role": "user", "content": "ahoy"}],
    "list-docs": lambda: [{}, {"a": 1}],
    "dict-empty": lambda: {},
    "dict": lambda: {"a": 1},
    "dict-ne": lambda: {"$ne": None},
    "dict-where": lambda: {"$where": "sleep(1000)"},
    "dict-regex": lambda: {"$regex": "^"},
    "dict-ref": lambda: {"run": 1, "step": 1},
    "deep-80": lambda: _deep(80),
}

# ---------------------------------------------------------------------------------------------
# The fields: generated from the classes the daemon parses with
# ---------------------------------------------------------------------------------------------


def _nested_models(annotation) -> list[type[BaseModel]]:
    found = []
    for inner in typing.get_args(annotation) or (annotation,):
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            found.append(inner)
        elif typing.get_args(inner):
            found += _nested_models(inner)
    return found


def get_path(document: dict, path: str):
    current: typing.Any = document
    for part in path.split("."):
        if not isinstance(current, dict) or part not in current:
            return None
        current = current[part]
    return current


def spec_fields(model: type[BaseModel], base: dict, prefix: str = "") -> list[tuple[str, bool]]:
    """(dotted path, required) for every field of `model`, into every nested model the base document holds."""
    fields = []
    for name, info in model.model_fields.items():
        path = prefix + (info.alias or name)
        fields.append((path, info.is_required()))
        nested = _nested_models(info.annotation)
        if nested and isinstance(get_path(base, path), dict):
            fields += spec_fields(nested[0], base, path + ".")
    return fields


def set_path(document: dict, path: str, value, delete: bool = False) -> None:
    *parents, last = path.split(".")
    target = document
    for part in parents:
        target = target.setdefault(part, {})
    if delete:
        target.pop(last, None)
    else:
        target[last] = value


def model_fields(base: dict) -> list[tuple[str, bool]]:
    fields = spec_fields(ModelSpec, base)
    return fields + [(name, False) for name in sorted(LISTENER_FIELDS) if name not in dict(fields)]


def request_fields(base: dict) -> list[tuple[str, bool]]:
    fields = spec_fields(RequestSpec, base)
    return fields + [(name, False) for name in sorted(LISTENER_FIELDS) if name not in dict(fields)]


def test_the_fields_are_generated_from_the_classes():
    """A field added to a spec (or to LISTENER_FIELDS) is covered without anyone writing a case."""
    base_model = {"data": {}, "trainer": {}}
    paths = {path for path, _ in model_fields(base_model)}
    assert {"_id", "model_name_or_path", "data", "data.collection", "data.filter", "trainer", "trainer.lora_r",
            "status", "lease", "run", "attempts", "started_at"} <= paths
    assert {f"data.{name}" for name in ModelSpec.model_fields["data"].annotation.model_fields} <= paths
    request_paths = {path for path, _ in request_fields({"params": {}})}
    assert {f"params.{name}" for name in GenerationParams.model_fields} <= request_paths
    assert {"_id", "model", "input", "checkpoint", "cancel"} <= request_paths
    assert ("data.collection", True) in model_fields(base_model) and ("input", True) in request_fields({})


# ---------------------------------------------------------------------------------------------
# Cases, their expected ends, and the checks
# ---------------------------------------------------------------------------------------------

READ = CodecOptions(**defaults.CODEC)


@dataclasses.dataclass(eq=False)
class Case:
    collection: str
    field: str
    label: str
    document: typing.Any  # a dict, or RawBSONDocument for bytes no dict can hold
    doc_id: typing.Any = None  # as the daemon decodes it
    expect: str = ""  # untouched | failed | cancelled | trained | answered | too_many_attempts
    error_field: str | None = None
    status_written: typing.Any = None
    error_written: typing.Any = None
    reaped: bool = False
    unwritable: bool = False
    models_before: frozenset = frozenset()  # model keys inserted before this request

    def describe(self) -> str:
        return f"{self.collection} {self.field}={self.label} ({ids.key(self.doc_id)[:80]})"


def matches(probe, doc_id, query: dict) -> bool:
    return probe.count_documents({"_id": ids.eq(doc_id), **query}) == 1


def expect_intake(stored: dict, pending: bool, kind, parse_spec, limits) -> tuple[str, str | None] | None:
    """What the daemon must do with a document it reads at intake, by its own parsers; `None` where it goes on."""
    if not pending:
        return "untouched", None
    try:
        state = parse(kind, stored)
    except BadRecord as exc:
        return "failed", exc.field
    if state.cancel:
        return "cancelled", None
    try:
        parse_spec(stored, limits)
    except SpecError as exc:
        return "failed", exc.field
    return None


def expect_model(stored: dict, pending: bool, limits) -> tuple[str, str | None]:
    return expect_intake(stored, pending, ModelState, parse_model, limits) or ("trained", None)


def expect_request(stored: dict, pending: bool, limits) -> tuple[str, str | None]:
    decided = expect_intake(stored, pending, RequestState, parse_request, limits)
    if decided is None and parse(RequestState, stored).attempts >= MAX_ATTEMPTS:
        return "too_many_attempts", None
    return decided or ("answered", None)


def expect_reaped(stored: dict, kind, expired: bool, limits) -> tuple[str, str | None]:
    """A `running` document whose lease ran out: the reaper parses what it reads, then requeues or fails it."""
    if not expired:
        return "untouched", None
    try:
        state = parse(kind, {k: stored[k] for k in ("_id", "attempts", "lease", "history") if k in stored})
    except BadRecord as exc:
        return "failed", exc.field
    if state.lease is None:
        return "failed", "lease"
    past = [e for e in state.history if e.get("event") == "lease expired"]
    if len(past) + 1 >= MAX_ATTEMPTS:
        return "too_many_attempts", None
    requeued = {k: v for k, v in stored.items() if k not in ("status", "lease")}
    if kind is ModelState:
        return expect_model(requeued, True, limits)
    return expect_request(requeued, True, limits)


def related(path: str, field: str | None) -> bool:
    """The error names the field that was changed, or a part of it."""
    field = field or ""
    return field == path or field.startswith(path + ".") or path.startswith(field + ".") and field != ""


def probe_case(db, case: Case, expect: Callable[[dict, typing.Any], tuple[str, str | None]]) -> bool:
    """Write the document where no daemon looks; read it back as the daemon would and decide its end.

    False when the server or the driver refuses the document (refused at intake: nothing to check).
    """
    probe = db[f"probe{case.collection}"]
    probe.delete_many({})
    try:
        probe.insert_one(case.document)
    except (PyMongoError, bson.errors.BSONError, OverflowError, ValueError, TypeError):
        return False
    stored = probe.with_options(codec_options=READ).find_one({})  # the only one, whatever its _id reads as
    case.doc_id = stored["_id"]
    case.status_written = ids.key(stored.get("status", "<missing>"))
    case.error_written = ids.key(stored.get("error"))
    case.expect, case.error_field = expect(stored, probe)
    try:  # some servers cannot update some ids (NaN on SecantusDB): then nothing can be written to it
        probe.update_one({"_id": ids.eq(case.doc_id)}, {"$set": {"probed": True}})
    except PyMongoError:
        case.unwritable = True
        case.expect, case.error_field = "untouched", None
    return True


class Watcher(threading.Thread):
    """Samples how many models this daemon name holds `running` at once."""

    def __init__(self, db, name: str):
        super().__init__(daemon=True)
        self.models, self.name = db[defaults.MODELS], name
        self.most = 0
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            try:
                held = self.models.count_documents({"status": "running",
                                                    "lease.owner": {"$regex": f"^{re.escape(self.name)}:"}})
                self.most = max(self.most, held)
            except PyMongoError:
                pass
            time.sleep(0.2)


def model_doc(doc_id, path: str, trainer: dict = TRAINER) -> dict:
    return documents.model(doc_id, path, trainer)


def request_doc(doc_id, model_id, checkpoint="base") -> dict:
    return documents.request(doc_id, model_id, checkpoint=checkpoint)


def by_key(collection) -> dict[str, dict]:
    return {ids.key(d["_id"]): d for d in collection.with_options(codec_options=READ).find({})}


def settle(db, cases: list[Case], timeout: float) -> dict[str, dict[str, dict]]:
    """Wait until every case that must end has ended; the documents as the daemon reads them."""
    now: dict[str, dict[str, dict]] = {}

    def ended() -> bool:
        now.update({name: by_key(db[name]) for name in (defaults.MODELS, defaults.REQUESTS)})
        return all(c.expect == "untouched" or finished(now[c.collection].get(ids.key(c.doc_id), {})) for c in cases)

    try:
        wait_until(ended, timeout, "every case ending", poll_s=1.0)
    except TimeoutError:
        pass  # check_cases names each case that did not end
    return now


def check_cases(cases: list[Case], now: dict, limits, logs: str) -> list[str]:
    """Every way a case did not end as the daemon's own parsers say it must."""
    problems = []
    models = now[defaults.MODELS]
    for case in cases:
        document = now[case.collection].get(ids.key(case.doc_id))
        if document is None:
            problems.append(f"{case.describe()}: the document is gone")
            continue
        got, error = document.get("status", "<missing>"), document.get("error")
        if case.unwritable:
            said = logs.count(f"listener error on {case.collection} {repr(case.doc_id)[:200]}")
            if said > 2:  # once per daemon process: the killed one and the restarted one
                problems.append(f"{case.describe()}: a document nothing can be written to is logged {said} times "
                                "with a traceback, not skipped and logged once")
        error = error if isinstance(error, dict) else {}
        if error.get("type") == "listener_error" or "Traceback" in str(error.get("message", "")):
            problems.append(f"{case.describe()}: the listener failed on it: {error}")
            continue
        expect = case.expect
        if expect == "untouched":
            if ids.key(got) != case.status_written or ids.key(document.get("error")) != case.error_written:
                problems.append(f"{case.describe()}: expected untouched, got {got} {error}")
        elif expect == "failed":
            if got != "failed" or error.get("field") != case.error_field:
                problems.append(f"{case.describe()}: expected failed naming {case.error_field!r}, got {got} {error}")
            elif (not related(case.field, case.error_field) and f"`{case.field}`" not in error.get("message", "")
                  and case.label != "invalid-utf8"):  # or the message says how the changed field asks for it
                problems.append(f"{case.describe()}: failed naming {case.error_field!r}, not the field changed")
        elif expect == "cancelled":
            if got != "cancelled":
                problems.append(f"{case.describe()}: expected cancelled, got {got} {error}")
        elif expect == "too_many_attempts":
            if got != "failed" or error.get("type") != "too_many_attempts":
                problems.append(f"{case.describe()}: expected failed (too many attempts), got {got} {error}")
        elif expect == "trained":
            if got == "failed" and related(case.field, error.get("field")) and error.get("field"):
                continue  # data only a training can judge (a key no document has, a filter matching nothing)
            if got != "succeeded":
                problems.append(f"{case.describe()}: a model that parses must train, got {got} {error}")
        elif expect == "answered":
            asked = document.get("model")
            target = models.get(ids.key(asked))
            usable = target is not None and _parses(target, limits)
            if not usable or ids.key(asked) not in case.models_before:
                if got == "done" and usable:
                    pass  # a model inserted after the request, there by the time it was answered
                elif got != "failed" or error.get("type") != "model_unavailable":
                    problems.append(f"{case.describe()}: asked for a model that is not there or not usable, "
                                    f"got {got} {error}")
                    continue
                leaked = [str(d["_id"]) for k, d in models.items()
                          if k != ids.key(asked) and len(str(d["_id"])) > 3 and str(d["_id"]) in str(error.get("message", ""))]
                if leaked:
                    problems.append(f"{case.describe()}: the error names other models: {leaked[:3]}")
                if got != "done":
                    continue
            if got != "done":
                problems.append(f"{case.describe()}: a request that parses must be answered, got {got} {error}")
                continue
            used = document.get("checkpoint_used")
            listed = [{"run": c.get("run"), "step": c.get("step")} for c in target.get("checkpoints") or []]
            if used != "base" and used not in listed:
                problems.append(f"{case.describe()}: answered from {used}, not a checkpoint of {asked!r}")
    return problems


def _parses(document: dict, limits) -> bool:
    try:
        parse_model(document, limits)
    except SpecError:
        return False
    return True


def training_starts(logs: str, model_id) -> int:
    return logs.count(f"training {model_id!r} run ")


# ---------------------------------------------------------------------------------------------
# Building the cases
# ---------------------------------------------------------------------------------------------


def sample_values(rng: Random, per_field: int | None) -> list[str]:
    labels = sorted(POOL)
    return labels if per_field is None else rng.sample(labels, per_field)


def invalid_utf8(document: dict, path: str) -> RawBSONDocument:
    """`document` as raw BSON whose string at `path` (or, for `path` "<key>", a field's name) is not UTF-8."""
    marker, broken = b"QQQQQQQQ", b"Q\xff\xfeQ\xc3(QQ"
    document = copy.deepcopy(document)
    if path == "<key>":
        document["QQQQQQQQ"] = 1
    else:
        set_path(document, path, marker.decode())
    raw = bson.encode(document)
    assert raw.count(marker) == 1
    return RawBSONDocument(raw.replace(marker, broken))


def string_paths(document: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in document.items():
        if isinstance(value, str):
            paths.append(prefix + key)
        elif isinstance(value, dict):
            paths += string_paths(value, prefix + key + ".")
    return paths


def field_cases(db, collection: str, base: dict, prefix: str, fields, dates: tuple, expect, kind, limits,
                rng: Random, per_field: int | None) -> tuple[list[Case], int]:
    """`base` with each field given each sampled value, then left out; each string as invalid UTF-8; each date out
    of Python's range (in a pending document and under a lease the reaper reads); and reaped documents."""
    cases, refused = [], 0

    def add(field, label, document):
        nonlocal refused
        case = Case(collection, field, label, document)
        if probe_case(db, case, expect):
            cases.append(case)
        else:
            refused += 1

    for n, (path, required) in enumerate(fields):
        for label in sample_values(rng, per_field):
            document = copy.deepcopy(base)
            document["_id"] = f"{prefix}{n}:{path}={label}"
            set_path(document, path, POOL[label]())
            add(path, label, document)
        if required and path != "_id":  # the server gives every document an _id
            document = copy.deepcopy(base)
            document["_id"] = f"{prefix}{n}:{path}=<missing>"
            set_path(document, path, None, delete=True)
            add(path, "<missing>", document)
    for path in [*string_paths({"_id": "", **base}), "<key>"]:
        document = {"_id": f"{prefix}-utf8:{path}", **copy.deepcopy(base)}
        add(path, "invalid-utf8", invalid_utf8(document, path))
    for path in dates:
        document = {"_id": f"{prefix}-date:{path}", **copy.deepcopy(base), "lease": {"owner": "ghost:1:x"}}
        set_path(document, path, DatetimeMS(2**62))
        add(path, "datetime-far", document)
    cases += build_reaped(db, limits, base, prefix, kind, rng, per_field)
    db[f"probe{collection}"].drop()
    return cases, refused


def build_model_cases(db, limits, tiny_model_path: str, rng: Random, per_field: int | None, max_trained: int,
                      train_nested_fields: bool) -> tuple[list[Case], int]:
    base = {**model_doc(None, tiny_model_path), "description": "a model"}
    base.pop("_id")

    def expect(stored, probe):
        return expect_model(stored, matches(probe, stored["_id"], status_filter(Status.PENDING)), limits)

    cases, refused = field_cases(db, defaults.MODELS, base, "m", model_fields(base),
                                 ("started_at", "finished_at", "created_at", "lease.expires_at"), expect, ModelState,
                                 limits, rng, per_field)
    # Documents that parse will train: keep a bounded, seeded sample of them.
    targeted = [c for c in cases if c.expect == "trained" and c.label in ("invalid-utf8", "datetime-far")]
    trained = [c for c in cases if c.expect == "trained" and c not in targeted and (
        train_nested_fields or c.field.count(".") == 0 or c.field.startswith("data."))]
    rng.shuffle(trained)
    keep = {id(c) for c in targeted + trained[:max_trained]}
    dropped = [c for c in cases if c.expect == "trained" and id(c) not in keep]
    return [c for c in cases if not (c.expect == "trained" and id(c) not in keep)], refused, len(dropped)


def build_reaped(db, limits, base: dict, prefix: str, kind, rng: Random, per_field: int | None) -> list[Case]:
    """`running` documents whose lease has run out: the reaper's fields of every type."""
    collection = defaults.MODELS if kind is ModelState else defaults.REQUESTS
    past = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    running = {**copy.deepcopy(base), "status": "running", "attempts": 1,
               "lease": {"owner": "ghost:1:abcdef", "expires_at": past}}
    lease_fields = [f"lease.{name}" for name in kind.model_fields["lease"].annotation.__args__[0].model_fields]
    cases = []

    def expect(stored, probe):
        if matches(probe, stored["_id"], {"status": "running", "lease.expires_at": {"$not": {"$type": "date"}}}):
            return "failed", "lease"  # running without a dated lease: only a user writes that
        expired = matches(probe, stored["_id"], {"status": "running", "lease.expires_at": {"$lt": dt.datetime.now(
            dt.timezone.utc)}})
        return expect_reaped(stored, kind, expired, limits)

    for path in ["attempts", "lease", "history", *lease_fields]:
        for label in sample_values(rng, per_field):
            document = {"_id": f"{prefix}-reap:{path}={label}", **copy.deepcopy(running)}
            set_path(document, path, POOL[label]())
            case = Case(collection, path, label, document, reaped=True)
            if probe_case(db, case, expect):
                cases.append(case)
    return cases


def build_request_cases(db, limits, model_id, rng: Random, per_field: int | None) -> tuple[list[Case], int]:
    base = request_doc(None, model_id)
    base.pop("_id")

    def expect(stored, probe):
        return expect_request(stored, matches(probe, stored["_id"], status_filter(Status.PENDING)), limits)

    return field_cases(db, defaults.REQUESTS, base, "r", request_fields(base), ("started_at", "completed_at",
                       "lease.expires_at"), expect, RequestState, limits, rng, per_field)


def insert_cases(db, cases: list[Case]) -> list[Case]:
    """Models first, then requests, each request knowing which models were there before it."""
    inserted, before = [], None
    for case in sorted(cases, key=lambda c: c.collection != defaults.MODELS):
        if case.collection == defaults.REQUESTS:
            before = frozenset(by_key(db[defaults.MODELS])) if before is None else before
            case.models_before = before
        try:
            db[case.collection].insert_one(case.document)
        except PyMongoError:
            continue
        inserted.append(case)
    return inserted


def status_prints(server_uri: str, db_name: str, home) -> None:
    shown = CliRunner(env={defaults.ENV_HOME: str(home)}).invoke(status_command, ["--uri", server_uri, "--db", db_name])
    assert shown.exit_code == 0, f"`listener status` failed:\n{shown.output}\n{shown.exception!r}"
    assert "Traceback" not in shown.output


def normal_work(db, daemon, tiny_model_path: str, tag: str, anchor, queued: int = 0) -> None:
    """A normal model trains exactly once and a normal request is answered, beside whatever else is there.

    `queued`: trainings that may be ahead of it (two at a time, about 15 s each on a small machine).
    """
    models, requests = db[defaults.MODELS], db[defaults.REQUESTS]
    models.insert_one(model_doc(f"normal-{tag}", tiny_model_path))
    requests.insert_one(request_doc(f"normal-{tag}", anchor))
    trained = wait_for(models, f"normal-{tag}", finished, timeout_s=SETTLE_S + 15 * queued)
    assert trained["status"] == "succeeded" and trained["run"] == 1 and trained["attempts"] == 1, trained
    answered = wait_for(requests, f"normal-{tag}", finished, timeout_s=120)
    assert answered["status"] == "done" and answered["checkpoint_used"] == "base", answered
    assert daemon.process.poll() is None, "the daemon is alive"


def run_scenario(db, server_uri, start_daemon, tiny_model_path, limits, tmp_path, *, per_field: int | None,
                 max_trained: int, train_nested_fields: bool) -> None:
    rng = Random(SEED)
    load_samples(db)
    env = {"MONGOTUNE_LEASE_S": LEASE_S}
    name = "robust"
    daemon = start_daemon(name, max_jobs=2, env=env, args=("--no-validators",))
    watcher = Watcher(db, name)
    watcher.start()
    anchor = "anchor"
    db[defaults.MODELS].insert_one(model_doc(anchor, tiny_model_path))
    assert wait_for(db[defaults.MODELS], anchor, finished, timeout_s=SETTLE_S)["status"] == "succeeded"

    model_cases, models_refused, not_trained = build_model_cases(db, limits, tiny_model_path, rng, per_field,
                                                                 max_trained, train_nested_fields)
    request_cases, requests_refused = build_request_cases(db, limits, anchor, rng, per_field)
    # Half the bad documents arrive while the daemon runs, the rest while no daemon runs (after a SIGKILL).
    half = len(model_cases) // 2, len(request_cases) // 2
    live = insert_cases(db, model_cases[:half[0]] + request_cases[:half[1]])
    trainings = sum(c.expect == "trained" for c in model_cases)
    normal_work(db, daemon, tiny_model_path, "during", anchor, trainings)
    daemon.stop(signal.SIGKILL)
    down = insert_cases(db, model_cases[half[0]:] + request_cases[half[1]:])
    restarted = start_daemon(name, max_jobs=2, env=env, args=("--no-validators",))
    normal_work(db, restarted, tiny_model_path, "after-restart", anchor, trainings)

    cases = live + down
    now = settle(db, cases, SETTLE_S + 15 * trainings)
    watcher.stopping.set()
    logs = restarted.log()  # one file: the killed daemon's lines, then the restarted one's
    problems = check_cases(cases, now, limits, logs)
    plain = {ids.key(c.doc_id) for c in cases if c.field not in LISTENER_FIELDS and not c.reaped}
    for key, document in now[defaults.MODELS].items():
        starts = training_starts(logs, document["_id"])
        once = document.get("status") != "succeeded" or key not in plain or (
            document.get("run"), document.get("attempts")) == (1, 1)
        if starts > 1 or not once:
            problems.append(f"model {key[:80]} trained {starts} times (run {document.get('run')}, "
                            f"attempts {document.get('attempts')})")
    if watcher.most > 2:
        problems.append(f"{watcher.most} trainings ran at once under --max-jobs 2")
    assert restarted.process.poll() is None, "the restarted daemon is alive"
    status_prints(server_uri, db.name, tmp_path)
    normal_work(db, restarted, tiny_model_path, "at-end", anchor)
    counts: dict[str, int] = {}
    for case in cases:
        counts[case.expect] = counts.get(case.expect, 0) + 1
    print(f"robustness: {len(cases)} documents ({counts}); refused at intake: {models_refused + requests_refused}; "
          f"models that parse left out to bound the run time: {not_trained}")
    assert not problems, f"{len(problems)} of {len(cases)} documents did not end as the daemon's own parsers say:\n" \
        + "\n".join(problems)


def test_every_field_of_every_type_through_a_restart(db, server_uri, start_daemon, tiny_model_path, limits, tmp_path):
    run_scenario(db, server_uri, start_daemon, tiny_model_path, limits, tmp_path, per_field=2, max_trained=2,
                 train_nested_fields=False)


@pytest.mark.soak
def test_every_field_with_the_whole_pool(db, server_uri, start_daemon, tiny_model_path, limits, tmp_path):
    run_scenario(db, server_uri, start_daemon, tiny_model_path, limits, tmp_path, per_field=8, max_trained=12,
                 train_nested_fields=True)


# ---------------------------------------------------------------------------------------------
# Identity: an ObjectId and its hex string are two models; a pattern is never an id
# ---------------------------------------------------------------------------------------------


# The tests that neither stop their daemon nor start it after inserting share the module's, with no validators on its
# database, so that what the server would refuse reaches the daemon (`--no-validators`).
DAEMON_ENV = {"MONGOTUNE_VALIDATORS": "0"}


def test_an_objectid_and_its_string_are_two_models_and_patterns_match_none(module_samples, module_daemon,
                                                                          tiny_model_path):
    daemon, models, requests = module_daemon, module_samples[defaults.MODELS], module_samples[defaults.REQUESTS]
    as_oid, as_str, only_str = ObjectId(), None, ObjectId()
    as_str = str(as_oid)
    # Told apart by their checkpoints: the ObjectId's run stops at step 1, the string's at step 2.
    models.insert_many([model_doc(as_oid, tiny_model_path, {**TRAINER, "max_steps": 1}),
                        model_doc(as_str, tiny_model_path, {**TRAINER, "max_steps": 2}),
                        {**model_doc(str(only_str), tiny_model_path), "cancel": True}])
    for model_id, step in ((as_oid, 1), (as_str, 2)):
        trained = wait_for(models, model_id, finished, timeout_s=SETTLE_S)
        assert trained["status"] == "succeeded" and [c["step"] for c in trained["checkpoints"]] == [step], trained

    asks = {"oid": (as_oid, {"run": 1, "step": 1}), "str": (as_str, {"run": 1, "step": 2}),
            "missing-oid": (only_str, None)}
    patterns = {"regex": Regex("."), "ne": {"$ne": None}, "gt": {"$gt": ""}, "exists": {"$exists": True},
                "in": {"$in": [as_str]}, "list": [as_oid, as_str], "where": {"$where": "true"}, "doc": {"_id": as_oid},
                "dollar": "$" + as_str}
    for name, (model_id, _) in asks.items():
        requests.insert_one({**request_doc(f"ask-{name}", model_id, "latest")})
    for name, pattern in patterns.items():
        requests.insert_one(request_doc(f"pattern-{name}", pattern))
    requests.insert_one(request_doc("normal", as_str))

    for name, (model_id, used) in asks.items():
        answer = wait_for(requests, f"ask-{name}", finished, timeout_s=120)
        if used is None:
            assert answer["status"] == "failed" and answer["error"]["type"] == "model_unavailable", answer
        else:
            assert answer["status"] == "done" and answer["checkpoint_used"] == used, answer
    for name in patterns:
        answer = wait_for(requests, f"pattern-{name}", finished, timeout_s=60)
        assert answer["status"] == "failed" and answer["error"]["field"] == "model", answer
        message = answer["error"]["message"]
        if name not in ("in", "list", "doc", "dollar"):  # these hold the id themselves
            assert as_str not in message and str(only_str) not in message, message
        assert "output" not in answer
    assert wait_for(requests, "normal", finished, timeout_s=60)["status"] == "done"
    assert daemon.process.poll() is None


# ---------------------------------------------------------------------------------------------
# `_listener`: resume records and daemon records of every shape
# ---------------------------------------------------------------------------------------------


def listener_record_variants(rng: Random, per_field: int | None) -> list[tuple[str, dict]]:
    """Resume records: `token` of every type, a token document of every inner type, no token at all."""
    variants = [("<missing>", {"saved": "no token"})]
    for field in ResumeRecord.model_fields:
        variants += [(f"{field}={label}", {field: POOL[label]()}) for label in sample_values(rng, per_field)]
        variants += [(f"{field}._data={label}", {field: {"_data": POOL[label]()}})
                     for label in sample_values(rng, per_field)]
    return variants


def daemon_record_variants(rng: Random, per_field: int | None) -> list[dict]:
    base = {"kind": "daemon", "owner": "ghost:1:abcdef", "name": "ghost", "host": "h", "pid": 1,
            "heartbeat_at": dt.datetime.now(dt.timezone.utc), "counters": {"requests_done": 1}, "trainings": []}
    records = [{**base, "heartbeat_at": DatetimeMS(2**62)}]
    for field, info in DaemonRecord.model_fields.items():
        for label in sample_values(rng, per_field):
            records.append({**copy.deepcopy(base), field: POOL[label]()})
        if info.is_required():
            records.append({k: v for k, v in base.items() if k != field})
    return records


def run_listener_records(db, server_uri, start_daemon, tmp_path, tiny_model_path, per_field: int | None) -> None:
    rng = Random(SEED)
    listener, requests = db[defaults.LISTENER], db[defaults.REQUESTS]
    records = daemon_record_variants(rng, per_field)
    for n, record in enumerate(records):
        try:
            listener.insert_one({"_id": f"daemon:bad{n}", **record})
        except PyMongoError:
            pass
    # A model that exists without training (cancelled), so "base" answers prove the daemon serves; until the
    # last start the requests name no model, which the daemon answers (fails) without starting a serving worker.
    db[defaults.MODELS].insert_one({**model_doc("served", tiny_model_path), "cancel": True})
    variants = listener_record_variants(rng, per_field)
    name, daemon = "records", None
    pairs = list(zip(variants[::2], variants[1::2] + [variants[0]]))
    for i, ((label_m, bad_m), (label_r, bad_r)) in enumerate(pairs):
        model_id, ending = ("served", ("done", None)) if i == len(pairs) - 1 else ("nobody", ("failed", "model_unavailable"))
        if daemon is not None:
            daemon.stop()
        for collection, bad in ((defaults.MODELS, bad_m), (defaults.REQUESTS, bad_r)):
            try:
                listener.replace_one({"_id": f"resume:{name}:{collection}"}, bad, upsert=True)
            except PyMongoError:  # refused by the server (a date it cannot store): nothing for the daemon to read
                listener.delete_one({"_id": f"resume:{name}:{collection}"})
        requests.insert_one(request_doc(f"down-{i}", model_id))  # found by the start's scan
        daemon = start_daemon(name, max_jobs=1, args=("--no-validators",))
        what = f"resume records {label_m} / {label_r}"
        for request_id in (f"down-{i}", f"up-{i}"):
            if request_id.startswith("up"):
                requests.insert_one(request_doc(request_id, model_id))  # seen on the stream
            answered = wait_for(requests, request_id, finished, timeout_s=120)
            assert (answered["status"], (answered.get("error") or {}).get("type")) == ending, (what, answered)
        assert daemon.process.poll() is None, what
        status_prints(server_uri, db.name, tmp_path)
    assert "Traceback" not in daemon.log()


def test_bad_listener_records_never_stop_a_start(db, server_uri, start_daemon, tmp_path, tiny_model_path):
    run_listener_records(db, server_uri, start_daemon, tmp_path, tiny_model_path, per_field=2)


@pytest.mark.soak
def test_every_listener_record_of_every_type(db, server_uri, start_daemon, tmp_path, tiny_model_path):
    run_listener_records(db, server_uri, start_daemon, tmp_path, tiny_model_path, per_field=None)


def test_listener_owned_fields_a_user_wrote_never_break_a_training(module_samples, module_daemon, tiny_model_path):
    """Every listener-owned field the daemon does not parse at intake, written by a user as a string, at once:
    the listener resets or replaces them, so the model still trains (or fails naming one of them)."""
    unread = sorted(LISTENER_FIELDS - {f.alias or n for n, f in ModelState.model_fields.items()} - {"status"})
    daemon, models = module_daemon, module_samples[defaults.MODELS]
    models.insert_one({**model_doc("owned", tiny_model_path), **{name: "" for name in unread}})
    models.insert_one(model_doc("normal", tiny_model_path))
    trained = wait_for(models, "owned", finished, timeout_s=SETTLE_S)
    error = trained.get("error") or {}
    assert trained["status"] == "succeeded" or error.get("field") in unread, \
        f"fields {unread} written as strings: {trained['status']} {error}"
    assert wait_for(models, "normal", finished, timeout_s=SETTLE_S)["status"] == "succeeded"
    assert daemon.process.poll() is None
