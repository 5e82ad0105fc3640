"""Two users on one database with two daemons (issue 21): nothing user A writes reaches user B.

The operator allows answers into both users' own collections (`MONGOTUNE_ANSWER_COLLECTIONS=a_*,b_*`), and
validators are off, so every document reaches the daemons. User B has a data collection, `b_notes`, a
model served from its base, `b_model`, one request over `b_notes` that answered every document into
`b_answer`, and then lone requests, one at a time. User A writes, all at once and while B's lone
requests come and go:

- the generated pool of `tests/test_robustness.py`: every field of a model, a request and a request
  over a collection (the classes the daemon parses with), each given a value of the BSON pool, left
  out, as invalid UTF-8, as a date out of range, and as `running` under a lease the reaper must read;
- every long-lived kind, on A's own collection `a_notes`: requests that watch it (the second reading
  what the first writes), a request over it that ends, a model retrained after new documents and one on
  a schedule, and models that retrain after new documents whose `retrain` and `data` fields hold
  every value of the pool (they are `succeeded`: only the retrain pass reads them);
- attempts at B's data: requests over `b_notes`, once and watching, whose `output_field` is every
  field path B's documents hold (B's own fields, B's request's answers, inside B's objects and arrays)
  or a new field inside one of B's objects (`meta.fresh`, `b_answer.fresh`, `tags.fresh`), with
  filters, some refused; a model that follows `b_notes` for new documents; a model whose training
  filter the parser refuses. A new top-level field is not tried: the operator let answers into `b_*`,
  so any writer of requests may add one there (that grant is per collection, not per user).

What it proves, class by class:

1. (no confused deputy) `b_notes`, B's model and B's requests are exactly as B left them: no answer
   of A's lands on any value B's documents hold, nor inside one (README: answers are written "never
   over what a document's owner, a person or another request wrote").
2. (a loop survives anything one document does) both daemons are alive at the end, their heartbeats
   (`alive_until`) kept moving, the retrain pass still started A's retrain after every bad document was
   in, the reaper ended the `running` documents, and no daemon log holds a traceback but the one each
   daemon logs once for a document nothing can be written to (an `_id` of NaN on SecantusDB, which
   `check_cases` bounds; the daemons log JSON so each line is read exactly). Each of A's documents ends as
   the daemon's own parsers say (`check_cases`): `failed` naming the field, `cancelled`, answered, or left
   alone; a `succeeded` model the retrain pass cannot use is skipped, logged once per daemon, naming
   its field.
3. (capacity apportioned) each of B's lone requests is answered `done` at its first claim, while A's
   watching requests still hold their places, and behind at most one batch of A's: just before it, A
   floods its own model with requests that take many batches, and of those claimed by the daemon that
   answers B's request, at most the batch generating when B's arrived and one more are answered before
   B's (the claims' owners are read from the change stream of `_requests`, since an answered request no
   longer names its daemon).
4. (no loops through the data) A's two watching requests, one reading the other's answers, end when
   cancelled.
"""

import copy
import json
import threading
from random import Random

from listener.processes import wait_until
from listener.records import RequestState
from listener.status import Status, status_filter
from tests import documents
from tests.conftest import settled, wait_for
from tests.test_robustness import (POOL, READ, SEED, TRAINER, Case, build_model_cases, build_request_cases, by_key,
                                   check_cases, expect_model, expect_request, field_cases, insert_cases, matches,
                                   probe_case, related, request_fields, sample_values, set_path, settle,
                                   spec_fields)
from tests.test_serving import served_model
from training import defaults, ids
from training.config import ModelSpec, SpecError, parse_model

MAX_BATCH = 2  # small batches, so a flood of A's takes many of them
ENV = {"MONGOTUNE_ANSWER_COLLECTIONS": "a_*,b_*", "MONGOTUNE_MAX_BATCH": str(MAX_BATCH), "MONGOTUNE_LEASE_S": "10",
       "MONGOTUNE_RETRAIN_CHECK_S": "2", "MONGOTUNE_LOG_FORMAT": "json"}  # JSON: each line read exactly
DAEMONS = ("d1", "d2")
ROUNDS = 3  # B's lone requests, one at a time
FLOOD = 6 * MAX_BATCH  # A's requests inserted just before each of B's
SETTLE_S = 240
QUIET = 1000  # `on_new_documents` no test insert reaches


def b_notes() -> list[dict]:
    return [{"_id": n, "title": f"note {n}", "text": f"the tide turns at dawn {n}", "meta": {"lang": "en", "n": n},
             "tags": [{"k": "sea"}, {"k": "tide"}], "answer": "B wrote this"} for n in range(4)]


def a_notes(start: int, count: int) -> list[dict]:
    return [{"_id": f"a{n}", "text": f"ahoy {n}, the wind is up"} for n in range(start, start + count)]


def field_paths(document: dict, prefix: str = "") -> list[str]:
    """Every field path of `document`, into its objects and its arrays of objects."""
    found = []
    for name, value in document.items():
        path = prefix + name
        found.append(path)
        if isinstance(value, dict):
            found += field_paths(value, path + ".")
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            found += field_paths(value[0], path + ".")
    return found


def model_expect(limits):
    return lambda stored, probe: expect_model(stored, matches(probe, stored["_id"], status_filter(Status.PENDING)),
                                              limits)


def request_expect(limits):
    return lambda stored, probe: expect_request(stored, matches(probe, stored["_id"], status_filter(Status.PENDING)),
                                                limits)


def cases_of(db, collection: str, documents_by_label: dict[str, tuple[str, dict]], expect) -> list[Case]:
    """Cases for hand-made documents (label: the field they try, the document), their ends decided by the daemon's
    own parsers like the generated ones."""
    cases = []
    for label, (field, document) in documents_by_label.items():
        case = Case(collection, field, label, document)
        if probe_case(db, case, expect):
            cases.append(case)
    db[f"probe{collection}"].drop()
    return cases


def attacks_on_b(db, limits, tiny_model_path: str, snapshot: list[dict]) -> list[Case]:
    """Requests over `b_notes` answering into every field path B's documents hold, and a fresh one inside each of
    B's objects and arrays; once and watching; with a filter, and with filters the parser refuses."""
    paths = sorted({path for document in snapshot for path in field_paths(document)} - {"_id"})
    inside = sorted({path.rsplit(".", 1)[0] + ".fresh" for path in paths if "." in path})
    by_label = {}
    for n, path in enumerate(paths + inside):
        by_label[f"into:{path}"] = ("output_field", documents.collection_request(
            f"a-on-b{n}:{path}", "a_spy", "b_notes", input="{text}" if path == "title" else "{title}",
            output_field=path))
    for path in ("b_answer", "meta.fresh"):  # two: a model's places for watching requests are two a daemon
        by_label[f"watching:{path}"] = ("watch", documents.collection_request(
            f"a-watch-b:{path}", "a_spy", "b_notes", input="{title}", output_field=path, watch=True))
    for label, query in {"regex": {"meta.lang": {"$regex": "^e"}}, "where": {"$where": "true"},
                         "function": {"$expr": {"$function": {"body": "return 1", "args": [], "lang": "js"}}},
                         "ne": {"b_answer": {"$ne": None}}}.items():
        by_label[f"filter:{label}"] = ("filter", documents.collection_request(
            f"a-on-b-filter:{label}", "a_spy", "b_notes", input="{title}", output_field="b_answer", filter=query))
    cases = cases_of(db, defaults.REQUESTS, by_label, request_expect(limits))
    on_b = {"collection": "b_notes", "key": "text"}
    models = {
        "follows-b": ("data.collection", {**documents.model("a-follows-b", tiny_model_path, TRAINER, data=on_b,
                                                            retrain={"on_new_documents": QUIET}),
                                          "status": "succeeded", "run": 1}),
        "where-on-b": ("data.filter", documents.model("a-where-on-b", tiny_model_path, TRAINER,
                                                      data={**on_b, "filter": {"$where": "true"}})),
    }
    return cases + cases_of(db, defaults.MODELS, models, model_expect(limits))


def long_lived(db, limits, tiny_model_path: str) -> list[Case]:
    """A's long-lived work on its own collection."""
    on_a = {"collection": "a_notes", "key": "text"}
    requests = {
        "watch": ("watch", documents.collection_request("a-watch1", "a_watcher", "a_notes", output_field="reply",
                                                        watch=True)),
        "watch-the-watcher": ("watch", documents.collection_request("a-watch2", "a_watcher", "a_notes",
                                                                    input="{reply.text}", output_field="echo",
                                                                    watch=True)),
        "job": ("collection", documents.collection_request("a-job", "a_model", "a_notes", output_field="summary")),
    }
    models = {
        "on-new-documents": ("retrain", {**documents.model("a-retrain", tiny_model_path, TRAINER, data=on_a,
                                                           retrain={"on_new_documents": 2, "from": "base"}),
                                         "status": "succeeded", "run": 1}),
        "schedule": ("retrain", {**documents.model("a-schedule", tiny_model_path, TRAINER, data=on_a,
                                                   retrain={"schedule": "0 3 * * *"}),
                                 "status": "succeeded", "run": 1}),
    }
    return (cases_of(db, defaults.REQUESTS, requests, request_expect(limits))
            + cases_of(db, defaults.MODELS, models, model_expect(limits)))


def retrain_cases(db, limits, tiny_model_path: str, rng: Random) -> list[Case]:
    """`succeeded` models following `a_notes`, each `retrain` or `data` field given values of the pool: only the
    retrain pass reads them. Those that parse stay only if no test insert can start their run."""
    base = {**documents.model(None, tiny_model_path, TRAINER, data={"collection": "a_notes", "key": "text"},
                              retrain={"on_new_documents": QUIET, "from": "base"}), "status": "succeeded", "run": 1}
    base.pop("_id")
    by_label = {}
    for n, (path, _) in enumerate(spec_fields(ModelSpec, base)):
        if not path.startswith(("retrain", "data")):
            continue
        for label in sample_values(rng, 2):
            document = {"_id": f"k{n}:{path}={label}", **copy.deepcopy(base)}
            set_path(document, path, POOL[label]())
            try:
                spec = parse_model(document, limits)
            except SpecError:
                pass
            else:
                if spec.retrain is None or (spec.retrain.on_new_documents or QUIET) < 20 or spec.retrain.schedule:
                    continue  # it parses and could start a run here: not a bad document
            by_label[f"{path}={label}"] = (path, document)
    return cases_of(db, defaults.MODELS, by_label, model_expect(limits))


class Claims(threading.Thread):
    """The daemon that claimed each request (the owner in each claim's lease), from the change stream of
    `_requests`: an answered request no longer names it."""

    def __init__(self, db):
        super().__init__(daemon=True)
        self.stream = db[defaults.REQUESTS].with_options(codec_options=READ).watch(
            [{"$match": {"operationType": "update"}}], max_await_time_ms=200)
        self.owners: dict[str, list[str]] = {}
        self.error: Exception | None = None
        self.stopping = threading.Event()

    def run(self):
        try:
            while not self.stopping.is_set():
                change = self.stream.try_next()
                if change is None:
                    continue
                lease = ((change.get("updateDescription") or {}).get("updatedFields") or {}).get("lease")
                if isinstance(lease, dict) and isinstance(lease.get("owner"), str):
                    self.owners.setdefault(ids.key(change["documentKey"]["_id"]), []).append(lease["owner"])
        except Exception as exc:  # noqa: BLE001  (said by the assertion that reads the owners)
            self.error = exc
        finally:
            self.stream.close()

    def owner(self, doc_id) -> str | None:
        found = self.owners.get(ids.key(doc_id))
        return found[-1] if found else None


def log_lines(text: str) -> tuple[list[dict], list[str]]:
    """A daemon's log: its own records (JSON), and the lines others wrote to it (the serving worker's, ...)."""
    records, others = [], []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("message"), str):
            records.append(record)
        else:
            others.append(line)
    return records, others


def heartbeats(db) -> dict[str, object]:
    return {record["name"]: record.get("alive_until")
            for record in db[defaults.LISTENER].find({"kind": "daemon", "name": {"$in": list(DAEMONS)}})}


def lone_request(db, claims: Claims, round_: int) -> tuple[dict, int]:
    """A floods its own model, then B asks once: B's answer comes at its first claim, behind at most the batch
    of A's generating on that daemon and one more."""
    requests = db[defaults.REQUESTS]
    flood = [documents.request(f"a-flood{round_}-{n}", "a_model", f"ahoy {n}", max_new_tokens=8, checkpoint="base")
             for n in range(FLOOD)]
    requests.insert_many(flood)
    requests.insert_one(documents.request(f"b-lone{round_}", "b_model", "ahoy from B", checkpoint="base"))
    lone = settled(db, f"b-lone{round_}")
    assert lone.get("status") == "done", f"B's lone request {round_} was not answered: {lone}"
    assert lone.get("attempts") == 1 and not lone.get("history"), \
        f"B's lone request {round_} was claimed more than once: {lone}"
    watching = {d["_id"]: d.get("status") for d in requests.find({"_id": {"$in": ["a-watch1", "a-watch2"]}})}
    assert watching == {"a-watch1": "running", "a-watch2": "running"}, \
        f"A's watching requests were not in flight when B's request {round_} was answered: {watching}"
    answered = [settled(db, f"a-flood{round_}-{n}") for n in range(FLOOD)]
    assert all(a.get("status") == "done" for a in answered), [a for a in answered if a.get("status") != "done"]
    owner = claims.owner(lone["_id"])
    assert owner, f"no claim of B's request {round_} seen on the stream ({claims.error!r})"
    ahead = [a["_id"] for a in answered if claims.owner(a["_id"]) == owner
             and a["completed_at"] <= lone["completed_at"]]
    assert len(ahead) <= 2 * MAX_BATCH, (
        f"B's lone request {round_} waited for {len(ahead)} of A's requests on {owner}, more than the "
        f"batch generating when it came and one more ({2 * MAX_BATCH}): {ahead}")
    return lone, len(ahead)


def test_two_users_one_database_two_daemons(db, start_daemon, tiny_model_path, limits):
    rng = Random(SEED)
    limits = limits.model_copy(update={"answer_collections": ("a_*", "b_*")})
    models, requests = db[defaults.MODELS], db[defaults.REQUESTS]
    daemons = [start_daemon(name, max_jobs=1, env=ENV, args=("--no-validators",)) for name in DAEMONS]

    # --- user B: data, a model served from its base, a request over the data that answered all of it ---
    db.b_notes.insert_many(b_notes())
    models.insert_one(served_model("b_model", tiny_model_path))
    requests.insert_one(documents.collection_request("b-col", "b_model", "b_notes", output_field="b_answer"))
    b_col = settled(db, "b-col")
    assert b_col.get("status") == "done" and b_col["progress"]["done"] == len(b_notes()), b_col
    snapshot = list(db.b_notes.find().sort("_id", 1))
    assert all((d.get("b_answer") or {}).get("request") == "b-col" for d in snapshot), snapshot
    b_model = models.find_one({"_id": "b_model"})

    beats = wait_until(lambda: len(heartbeats(db)) == len(DAEMONS) and heartbeats(db), 60, "both daemons beating")

    # --- user A: its own model and data, the generated pool, its long-lived work, its attempts at B's data ---
    models.insert_many([served_model(name, tiny_model_path) for name in ("a_model", "a_watcher", "a_spy")])
    db.a_notes.insert_many(a_notes(0, 3))
    model_cases, _, _ = build_model_cases(db, limits, tiny_model_path, rng, 1, 0, False)
    model_cases = [c for c in model_cases if c.expect != "trained"]  # a model that parses is not a bad document
    request_cases, _ = build_request_cases(db, limits, "a_model", rng, 1)
    over = documents.collection_request(None, "a_model", "a_notes", output_field="pool")
    over.pop("_id")
    collection_cases, _ = field_cases(db, defaults.REQUESTS, over, "c", request_fields(over),
                                      ("started_at", "completed_at", "lease.expires_at"), request_expect(limits),
                                      RequestState, limits, rng, 1)
    retraining = retrain_cases(db, limits, tiny_model_path, rng)
    mine = long_lived(db, limits, tiny_model_path)
    at_b = attacks_on_b(db, limits, tiny_model_path, snapshot)
    assert all(c.expect == "untouched" for c in retraining), [c.describe() for c in retraining
                                                              if c.expect != "untouched"]

    claims = Claims(db)
    claims.start()
    cases = insert_cases(db, mine + at_b + retraining + model_cases + request_cases + collection_cases)
    for watcher in ("a-watch1", "a-watch2"):
        claimed = wait_for(requests, watcher, lambda d: d.get("status") not in (None, "pending"), timeout_s=120)
        assert claimed["status"] == "running", claimed

    # --- while A's documents are handled: B asks, one request at a time ---
    rounds = [lone_request(db, claims, 0)]
    for name in DAEMONS:  # both daemons count a_notes' inserts for a-retrain; then A adds two
        wait_for(db[defaults.LISTENER], f"retrain:{name}:a_notes", lambda d: True, timeout_s=120)
    db.a_notes.insert_many(a_notes(3, 2))
    rounds += [lone_request(db, claims, n) for n in range(1, ROUNDS)]
    lones = [lone for lone, _ in rounds]
    claims.stopping.set()
    claims.join(5)

    # --- A's retrain started after all of it; its watchers answered the new documents, then A cancels them ---
    retrained = wait_for(models, "a-retrain", lambda d: d.get("run") == 2 and d.get("status") in ("succeeded", "failed"),
                         timeout_s=SETTLE_S)
    trigger = (retrained.get("runs") or [{}])[-1].get("trigger")
    assert retrained["status"] == "succeeded" and trigger == "new_documents", \
        f"the retrain pass never started A's retrain after A's documents: {retrained}"
    for watcher, done in (("a-watch1", 5), ("a-watch2", 5)):
        wait_for(requests, watcher, lambda d, done=done: (d.get("progress") or {}).get("done", 0) >= done,
                 timeout_s=120)
    now_requests = by_key(requests)
    for case in cases:
        stored = now_requests.get(ids.key(case.doc_id)) if case.collection == defaults.REQUESTS else None
        if case.expect == "answered" and stored is not None and stored.get("watch") is True:
            requests.update_one({"_id": ids.eq(case.doc_id)}, {"$set": {"cancel": True}})
            case.expect = "cancelled"

    now = settle(db, cases, SETTLE_S)
    logs = {daemon.log_path.name: log_lines(daemon.log()) for daemon in daemons}
    messages = {name: [record["message"] for record in records] for name, (records, _) in logs.items()}
    problems = check_cases(cases, now, limits, "\n".join(m for each in messages.values() for m in each))

    # --- B's data, model and requests are as B left them ---
    after = list(db.b_notes.find().sort("_id", 1))
    if after != snapshot:
        changed = [f"{b} -> {a}" for b, a in zip(snapshot, after) if b != a] + [str(a) for a in after[len(snapshot):]]
        isolation = ["A's documents changed B's data (b_notes):", *changed]
    else:
        isolation = []
    if models.find_one({"_id": "b_model"}) != b_model:
        isolation.append(f"A's documents changed B's model: {b_model} -> {models.find_one({'_id': 'b_model'})}")
    for doc_id, before in [("b-col", b_col), *((f"b-lone{n}", lone) for n, lone in enumerate(lones))]:
        if requests.find_one({"_id": doc_id}) != before:
            isolation.append(f"A's documents changed B's request {doc_id}: {before} -> "
                             f"{requests.find_one({'_id': doc_id})}")

    # --- the daemons, their heartbeats and passes went on ---
    for daemon in daemons:
        if daemon.process.poll() is not None:
            isolation.append(f"{daemon.log_path.name} stopped:\n{daemon.log()[-3000:]}")
    later = heartbeats(db)
    for name in DAEMONS:
        if not (later.get(name) and later[name] > beats[name]):
            isolation.append(f"{name}'s heartbeat stopped: {beats} -> {later}")
    # One traceback per daemon is the product's own, bounded by check_cases: a document the server will not let
    # anything be written to (an _id of NaN on SecantusDB) is logged once by each daemon, as a listener error.
    unwritable = {f"listener error on {c.collection} {repr(c.doc_id)[:200]}" for c in cases if c.unwritable}
    for name, (records, others) in logs.items():
        for record in records:
            if "Traceback" in record.get("exception", "") + record["message"] and record["message"] not in unwritable:
                isolation.append(f"{name} logged a traceback: {record['message'][:500]}\n"
                                 f"{record.get('exception', '')[:4000]}")
        if any("Traceback" in line for line in others):
            start = next(n for n, line in enumerate(others) if "Traceback" in line)
            isolation.append(f"{name} holds a traceback:\n" + "\n".join(others[max(start - 5, 0):start + 40]))

    # --- every one of A's bad documents the retrain pass reads is skipped, once per daemon, naming its field ---
    for case in retraining:
        stored = now[defaults.MODELS].get(ids.key(case.doc_id))
        if stored is None:
            continue  # check_cases says it is gone
        try:
            parse_model(stored, limits)
            continue
        except SpecError as exc:
            field = exc.field
        if not related(case.field, field):
            problems.append(f"{case.describe()}: refused naming {field!r}, not the field changed")
        line = f"skipping retrain {repr(case.doc_id)[:200]}: "
        for name, said in messages.items():
            said = [message[len(line):] for message in said if message.startswith(line)]
            found = isinstance(stored.get("retrain"), dict)  # what the retrain pass reads; the rest it never sees
            if len(said) != found:
                problems.append(f"{case.describe()}: skipped {len(said)} times by {name}, not {int(found)}")
            elif said and not said[0].startswith(field):
                problems.append(f"{case.describe()}: skipped by {name} without naming {field!r}: {said[0][:200]}")
    counts: dict[str, int] = {}
    for case in cases:
        counts[case.expect] = counts.get(case.expect, 0) + 1
    print(f"two users: {len(cases)} documents of A's ({counts}); B's lone requests: "
          f"{[(lone.get('timing'), f'{ahead} of A flood ahead') for lone, ahead in rounds]}")
    assert not isolation + problems, "\n".join(isolation) + (
        f"\n{len(problems)} of A's {len(cases)} documents did not end as the daemon's parsers say:\n"
        + "\n".join(problems) if problems else "")
