"""Answers written into a collection (issue 21): only where the operator allows, only over fields the listener
wrote for the same request, never a trigger of another answer, and never a job that one document stops or
that loops on documents its writes cannot reach.

The daemon tests share one daemon whose operator allows answers in every data collection
(`MONGOTUNE_ANSWER_COLLECTIONS=*`). The in-process tests run the real `CollectionJob` and `Serving` against the
real server, with only generation stood in for (what they check is what is written, not what a model says).
"""

import asyncio
import logging
import re
import threading
import tracemalloc

import pytest
from pymongo import AsyncMongoClient, MongoClient
from pymongo.errors import PyMongoError

from listener.batch_predictions import CollectionJob, Prompt, predict_collection
from listener.embedded import EmbeddedServer, free_port
from listener.forks import Forks
from listener.processes import wait_until
from listener.serving import Serving
from listener.settings import Settings
from tests.conftest import settled, wait_for
from tests.documents import ANSWERS, collection_request, insert_nested, nested_document
from tests.test_serving import served_model
from training import defaults
from training.config import SpecError, parse_request

OWNER = "in-process"
TOKEN = "0123456789abcdef" * 2  # a request's answers token, as its first job would have drawn it


class Answering(Serving):
    """The real `Serving` around a real database, generation stood in for: each prompt's answer is the prompt;
    `meanwhile` runs first, as another user writing while the model generates."""

    def __init__(self, adb, meanwhile=None, **options):
        settings = Settings.load({"db": adb.name, "validators": False, **options}, environ=ANSWERS)
        super().__init__(adb, settings, OWNER, {"requests_done": 0, "requests_failed": 0}, Forks(gpus=False),
                         collection_job=None)
        self.meanwhile = meanwhile or (lambda: None)

    async def resolve(self, model_id, checkpoint):
        return {"_id": model_id}, None

    async def generate(self, model, entry, prompts, params):
        self.meanwhile()
        return [{"output": f"re: {prompt}"} for prompt in prompts]


# the operator allows answers into every data collection; short request leases retry a stopped collection job
# within seconds (conftest.module_daemon)
DAEMON_ENV = {**ANSWERS, "MONGOTUNE_REQUEST_LEASE_S": "3", "MONGOTUNE_MAX_NEW_TOKENS": "2000"}


def run_job(client, db, document: dict, meanwhile=None, **options) -> dict:
    """Run one collection request to its end in this process, as the daemon that claimed it; the request after."""
    db[defaults.REQUESTS].insert_one({**document, "status": "running", "lease": {"owner": OWNER}})
    spec = parse_request(document, Settings.load({}, environ=ANSWERS).limits)

    async def job():
        async_client = AsyncMongoClient(client.address[0], client.address[1], directConnection=True)
        try:
            serving = Answering(async_client[db.name], meanwhile, **options)
            await asyncio.wait_for(CollectionJob(serving, spec).answer_all(), 60)  # a bound, should it loop
        finally:
            await async_client.close()

    asyncio.run(job())
    return db[defaults.REQUESTS].find_one({"_id": document["_id"]})


# --- class 1: no confused deputy ---------------------------------------------------------------------------------

def test_class1_answers_are_refused_by_default_and_allowed_where_the_operator_lists(limits):
    """Reading a collection for training grants no writes: answers need `MONGOTUNE_ANSWER_COLLECTIONS`, which
    takes patterns like `MONGOTUNE_COLLECTIONS` and is empty by default; the refusal names it."""
    document = collection_request("r", "m", "notes_a")
    with pytest.raises(SpecError) as refused:
        parse_request(document, limits)
    assert refused.value.field == "collection" and "MONGOTUNE_ANSWER_COLLECTIONS" in refused.value.message
    listed = Settings.load({}, environ={"MONGOTUNE_ANSWER_COLLECTIONS": "notes_*, summaries"}).limits
    assert listed.answer_collections == ("notes_*", "summaries")
    assert parse_request(document, listed).collection == "notes_a"
    assert parse_request({**document, "collection": "summaries"}, listed).collection == "summaries"
    with pytest.raises(SpecError) as elsewhere:
        parse_request({**document, "collection": "notes"}, listed)
    assert elsewhere.value.field == "collection"


def test_class1_an_answer_never_goes_inside_what_someone_else_wrote(client, db):
    """An `output_field` below an existing object (the owner's `meta`, another request's answer) would add a key
    inside a value someone else wrote: such documents are skipped; where every parent is absent, the answer
    creates them."""
    theirs = {"text": "kept", "checkpoint": "base", "request": "other"}
    db.inside.insert_many([{"_id": 0, "text": "a", "meta": {"lang": "en"}, "b_answer": theirs},
                           {"_id": 1, "text": "b"}])
    for request_id, field in (("in-meta", "meta.fresh"), ("in-answer", "b_answer.fresh")):
        ended = run_job(client, db, collection_request(request_id, "m", "inside", output_field=field))
        assert ended["status"] == "done" and ended["progress"] == {"done": 1, "total": 2, "skipped": 1}, ended
    first = db.inside.find_one({"_id": 0})
    assert first["meta"] == {"lang": "en"} and first["b_answer"] == theirs, first
    second = db.inside.find_one({"_id": 1})
    assert second["meta"]["fresh"]["request"] == "in-meta" and second["b_answer"]["fresh"]["request"] == "in-answer"


def test_class1_the_listener_writes_only_fields_it_wrote_for_the_same_request(client, db):
    """Each answer names its request (by `_id` and the token its first job drew); a field absent, or holding this
    request's answer, is the only one written. The owner's own value, another request's answer and a value a
    person writes while the model generates are left as they are and counted as skipped."""
    theirs = {"text": "another request's", "checkpoint": "base", "request": "another", "token": TOKEN}
    db.notes.insert_many([{"_id": 0, "text": "fresh"},
                          {"_id": 1, "text": "owned", "answer": "the owner's own"},
                          {"_id": 2, "text": "other request", "answer": theirs},
                          {"_id": 3, "text": "older", "answer": {"text": "old", "checkpoint": {"run": 9, "step": 9},
                                                                  "request": "mine", "token": TOKEN}},
                          {"_id": 4, "text": "raced"}])
    ended = run_job(client, db, {**collection_request("mine", "m", "notes"), "answers_token": TOKEN},  # a retry
                    meanwhile=lambda: db.notes.update_one({"_id": 4}, {"$set": {"answer": "a person's, meanwhile"}}))
    notes = {d["_id"]: d["answer"] for d in db.notes.find()}
    assert notes[0] == {"text": "re: fresh", "checkpoint": "base", "request": "mine", "token": TOKEN}
    assert notes[3] == {"text": "re: older", "checkpoint": "base", "request": "mine", "token": TOKEN}
    assert notes[1] == "the owner's own" and notes[2] == theirs and notes[4] == "a person's, meanwhile"
    assert ended["status"] == "done" and ended["progress"] == {"done": 2, "total": 5, "skipped": 3}, ended


@pytest.mark.parametrize("token", ["TOKEN", TOKEN + "\n", 12, None])
def test_class1_an_answers_token_the_listener_never_drew_is_replaced_and_no_answer_carries_it(client, db, token):
    """`answers_token` set by a writer to anything but a token's shape (32 lowercase hex digits; a trailing newline
    passes the server's `$` but is no token) was taken as read back: the job replaces it with a token it draws, as
    the daemon overwrites its other fields, and the answers carry the drawn one."""
    db.notes.insert_one({"_id": 0, "text": "a note"})
    ended = run_job(client, db, {**collection_request("odd", "m", "notes"), "answers_token": token})
    assert ended["status"] == "done", ended
    assert re.fullmatch("[0-9a-f]{32}", ended["answers_token"]) and ended["answers_token"] != token, ended
    assert db.notes.find_one({"_id": 0})["answer"]["token"] == ended["answers_token"]


def test_class2_a_filter_the_server_refuses_fails_the_request_once_naming_it(client, db):
    """A `$regex` the server cannot compile passes the parse (the server's regex dialect decides): the request fails
    at its first count naming `filter` with the server's words, not after every retry as too many attempts."""
    db.notes.insert_one({"_id": 0, "text": "ahoy"})
    ended = run_job(client, db, collection_request("refused", "m", "notes", filter={"text": {"$regex": "("}}))
    assert ended["status"] == "failed" and ended["error"]["field"] == "filter", ended
    assert "refuses" in ended["error"]["message"] and "answer" not in db.notes.find_one({"_id": 0})


def test_class2_a_document_gone_before_its_answer_lands_ends_the_job(client, db):
    """A write that matches nothing (the document deleted while the model generated; on MongoDB also `_id`s the
    driver cannot send back as read, or a view) is skipped and counted: the job never fetches it again."""
    db.notes.insert_many([{"_id": n, "text": f"ahoy {n}"} for n in range(3)])
    ended = run_job(client, db, collection_request("gone", "m", "notes"),
                    meanwhile=lambda: db.notes.delete_one({"_id": 1}))
    assert ended["status"] == "done" and ended["progress"] == {"done": 2, "total": 3, "skipped": 1}, ended
    assert sorted(d["_id"] for d in db.notes.find({"answer.request": "gone"})) == [0, 2]


def test_class3_documents_that_cannot_take_the_answer_are_skipped_once(client, db, caplog):
    """Whatever shape a person gives the answer's parent (a string, a number, an array, null), the others are
    answered; the odd documents are someone else's shape, counted as skipped from the first count and never
    written (so never listed in the job's later queries), and the request ends `done`."""
    caplog.set_level(logging.WARNING, logger="listener.batch_predictions")
    odd = {0: "a string", 7: 5, 13: [1, 2], 15: None, 16: [{"answer": "in an array"}]}
    db.odd.insert_many([{"_id": n, "text": f"ahoy {n}", **({"out": odd[n]} if n in odd else {})} for n in range(20)])
    ended = run_job(client, db, collection_request("past-odd", "m", "odd", output_field="out.answer"), max_batch=4)
    assert ended["status"] == "done" and ended["progress"] == {"done": 15, "total": 20, "skipped": 5}, ended
    assert db.odd.count_documents({"out.answer.request": "past-odd"}) == 15
    assert {d["_id"]: d["out"] for d in db.odd.find({"_id": {"$in": list(odd)}})} == odd
    assert not [r.getMessage() for r in caplog.records if "not answered for request" in r.getMessage()]


def test_class2_a_long_first_pass_stops_when_cancelled(client, db):
    """A request over a collection (watching or not) looks for `cancel: true` at each chunk of its first pass, so
    its writer can stop it before it has answered every document."""
    db.many.insert_many([{"_id": n, "text": f"ahoy {n}"} for n in range(10)])
    def cancel():
        db[defaults.REQUESTS].update_one({"_id": "stopped"}, {"$set": {"cancel": True}})

    ended = run_job(client, db, collection_request("stopped", "m", "many"), meanwhile=cancel, max_batch=2)
    assert ended["status"] == "cancelled" and db.many.count_documents({"answer.request": "stopped"}) == 2, ended


@pytest.mark.parametrize("bound", [("MAX_UNWRITABLE", 4), ("MAX_UNWRITABLE_BYTES", 100)])
def test_class3_a_job_past_the_documents_it_can_skip_fails_naming_the_field(client, db, monkeypatch, bound):
    """Each document whose write the server refuses (here: the collection's validator) stays in every later query
    of the job, so their number and the size of their ids are bounded: past either, the request fails saying what
    to change, and has written nothing over what it could not."""
    monkeypatch.setattr(f"listener.batch_predictions.{bound[0]}", bound[1])
    db.create_collection("odd", validator={"out": {"$exists": False}})
    db.odd.insert_many([{"_id": n, "text": f"ahoy {n}"} for n in range(10)])
    ended = run_job(client, db, collection_request("all-odd", "m", "odd", output_field="out.answer"), max_batch=2)
    assert ended["status"] == "failed" and "'out.answer'" in ended["error"]["message"], ended
    assert db.odd.count_documents({"out": {"$exists": True}}) == 0


def watch_in_thread(client, db, document: dict, errors: list) -> threading.Thread:
    """Run a watching collection request in a thread of its own; what it raises goes into `errors`."""
    def run():
        try:
            run_job(client, db, document)
        except Exception as exc:  # noqa: BLE001 (the test reports it)
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_class2_a_watched_collection_dropped_ends_its_request(client, db, caplog):
    """Dropping (or renaming) the collection ends the change stream with an `invalidate` event, which names no
    document: the request fails saying so, and the job ends."""
    caplog.set_level(logging.INFO, logger="listener.batch_predictions")
    db.dropped.insert_one({"_id": 1, "text": "ahoy"})
    errors: list = []
    thread = watch_in_thread(client, db, collection_request("watch-dropped", "m", "dropped", watch=True), errors)
    wait_until(lambda: "watching dropped" in caplog.text, 60, "the watch on dropped")
    db.dropped.drop()
    thread.join(60)
    assert not thread.is_alive() and errors == []
    ended = db[defaults.REQUESTS].find_one({"_id": "watch-dropped"})
    assert ended["status"] == "failed" and "dropped" in ended["error"]["message"], ended


def test_class2_a_lease_of_the_wrong_shape_ends_a_watch_as_not_this_daemons(client, db, caplog):
    """`lease` written as an array (any writer may): the watch reads it as not its own and stops, never raises."""
    caplog.set_level(logging.INFO, logger="listener.batch_predictions")
    db.leased.insert_one({"_id": 1, "text": "ahoy"})
    errors: list = []
    thread = watch_in_thread(client, db, collection_request("odd-lease", "m", "leased", watch=True), errors)
    wait_until(lambda: "watching leased" in caplog.text, 60, "the watch on leased")
    db[defaults.REQUESTS].update_one({"_id": "odd-lease"}, {"$set": {"lease": ["in-process"]}})
    thread.join(60)
    assert not thread.is_alive() and errors == []
    assert db.leased.find_one({"_id": 1})["answer"]["request"] == "odd-lease"


def test_class1_answers_are_written_into_a_collection_only_where_the_operator_allows(db, start_daemon,
                                                                                      tiny_model_path):
    """No allowlist of collections answers may be written into exists: a daemon with default settings lets anyone
    who may insert a request `$set` a field of their choosing on every document of any data collection it may
    read (a read grant for training became a write grant). With none allowed by default, the request must fail
    naming the setting and leave the collection as it was."""
    db[defaults.MODELS].insert_one(served_model("writer", tiny_model_path))
    db.shared_notes.insert_many([{"_id": n, "text": f"ahoy {n}"} for n in range(3)])
    start_daemon()
    db[defaults.REQUESTS].insert_one(collection_request("write-anywhere", "writer", "shared_notes"))
    ended = settled(db, "write-anywhere")
    written = [d["_id"] for d in db.shared_notes.find({"answer": {"$exists": True}})]
    assert written == [], f"answers were written into shared_notes on a document's say-so: {written}"
    assert ended["status"] == "failed", ended


def test_class1_an_answer_never_replaces_a_field_the_listener_did_not_write(module_db, module_daemon,
                                                                             tiny_model_path):
    """`output_field` may name any field that is not an input: `"text"`, which every document's owner wrote, or
    `"answer"` where a person (or another request) wrote one. The answer `$set`s over it on every matching
    document (`todo` selects whatever lacks `output_field.checkpoint`)."""
    db = module_db
    db[defaults.MODELS].insert_one(served_model("clobber", tiny_model_path))
    db.clobbered.insert_many([{"_id": n, "title": f"ahoy {n}", "text": f"the owner's own text {n}",
                               "answer": f"the owner's own answer {n}"} for n in range(3)])
    db[defaults.REQUESTS].insert_many([
        collection_request("over-text", "clobber", "clobbered", input="{title}", output_field="text"),
        collection_request("over-answer", "clobber", "clobbered", input="{title}", output_field="answer"),
    ])
    ended = [settled(db, "over-text"), settled(db, "over-answer")]
    assert all(e.get("status") in ("done", "failed") for e in ended), ended
    notes = {d["_id"]: d for d in db.clobbered.find()}
    replaced = [(n, field, notes[n][field]) for n in range(3) for field in ("text", "answer")
                if notes[n][field] != f"the owner's own {field} {n}"]
    assert replaced == [], f"answers replaced fields the listener never wrote: {replaced}"


def test_class4_an_answer_the_listener_writes_never_triggers_another_answer(module_db, module_daemon,
                                                                            tiny_model_path):
    """A watching request refuses only its own output as input (roots compared per request). Another request's
    answer is an update like any other: request B (`watch`, input `{y.text}`) answers again every time request
    A writes `y`; two such requests feeding each other (A: x -> y, B: y -> x) answer each other for ever."""
    db = module_db
    db[defaults.MODELS].insert_one(served_model("chain", tiny_model_path))
    db.chained.insert_one({"_id": "d", "x": "ahoy matey"})
    requests = db[defaults.REQUESTS]
    requests.insert_one(collection_request("b-watches-y", "chain", "chained", input="{y.text}", output_field="z",
                                           filter={"y.text": {"$exists": True}}, watch=True))
    wait_until(lambda: "watching chained for request" in module_daemon.log(), 120, "request B's watch")
    requests.insert_one(collection_request("a-writes-y", "chain", "chained", input="{x}", output_field="y",
                                           filter={"_id": "d"}))
    assert settled(db, "a-writes-y")["status"] == "done"
    assert "text" in db.chained.find_one({"_id": "d"})["y"]
    # A person's insert after A's answer: once B has answered it, B has seen every event before it.
    db.chained.insert_one({"_id": "marker", "y": {"text": "a person wrote this"}})
    wait_for(db.chained, "marker", lambda d: "z" in d, timeout_s=120)
    requests.update_one({"_id": "b-watches-y"}, {"$set": {"cancel": True}})
    assert "z" not in db.chained.find_one({"_id": "d"}), "request A's answer triggered an answer of request B"


def test_class3_one_odd_document_never_stops_a_collections_answers_for_the_others(module_db, module_daemon,
                                                                                  tiny_model_path):
    """A document whose `out` is a string cannot take `out.answer`: its `UpdateOne` fails inside the chunk's
    unordered `bulk_write`, which raises `BulkWriteError` after the others landed; `predict_collection` logs
    "stopped" and leaves the request to the reaper. Every retry starts with the same document (in `_id` order, it
    still lacks an answer), answers one more chunk and stops again, until `too_many_attempts`: documents past
    the third chunk are never answered, and the request fails for everyone because of one document anyone may
    insert into a shared collection."""
    db = module_db
    db[defaults.MODELS].insert_one(served_model("odd", tiny_model_path))
    db.with_odd.insert_one({"_id": 0, "text": "ahoy", "out": "a person's string where the answer's parent goes"})
    db.with_odd.insert_many([{"_id": n, "text": f"ahoy {n}"} for n in range(1, 61)])
    db[defaults.REQUESTS].insert_one(collection_request("past-odd", "odd", "with_odd", output_field="out.answer"))
    ended = settled(db, "past-odd", timeout=240)
    unanswered = [d["_id"] for d in db.with_odd.find({"_id": {"$ne": 0}, "out.answer.text": {"$exists": False}})]
    assert unanswered == [], f"{len(unanswered)} documents were never answered; the request ended {ended}"
    assert ended["status"] == "done", ended


def test_class2_a_collection_job_whose_answers_cannot_land_still_ends(module_db, module_daemon, tiny_model_path):
    """`CollectionJob._answer` never looks at what its `bulk_write` matched: a document the answer's write cannot
    address keeps matching `todo`, and `answer_all` fetches it, generates for it and writes again, for ever, taking
    the shared worker's turn each time. Here the documents are read through a view (the embedded server takes the
    write and matches nothing); on MongoDB a string `_id` that is not UTF-8 (read back with replacement
    characters by the daemon's codec) or a DBPointer `_id` (read back as a DBRef) does the same. The job must end,
    each such document reported, never loop."""
    db = module_db
    db[defaults.MODELS].insert_one(served_model("endless", tiny_model_path))
    db.plain_notes.insert_one({"_id": 1, "text": "ahoy"})
    db.create_collection("notes_view", viewOn="plain_notes", pipeline=[])
    db[defaults.REQUESTS].insert_one(collection_request("never-lands", "endless", "notes_view"))
    ended = settled(db, "never-lands", timeout=90)
    db[defaults.REQUESTS].update_one({"_id": "never-lands"}, {"$set": {"cancel": True}})
    assert ended.get("status") in ("done", "failed"), f"the job still runs after 90 s: {ended}"


# --- re-attack on issue 21: answers into collections --------------------------------------------------------

def test_class2_a_request_whose_id_is_null_never_overwrites_a_field_it_did_not_write(client, db):
    """`_id: null` is a valid request id (any small BSON value is), and `{"answer.request": {"$eq": null}}` also
    matches every document whose `answer` holds no `request`: the owner's string, number or object. The job
    must treat those as someone else's, as it does for any other id."""
    db.notes.insert_many([{"_id": 0, "text": "fresh"},
                          {"_id": 1, "text": "owned", "answer": "the owner's own"},
                          {"_id": 2, "text": "owned too", "answer": {"score": 5}}])
    try:
        parse_request(collection_request(None, "m", "notes"), Settings.load({}, environ=ANSWERS).limits)
    except SpecError:
        return  # refused as the request's id: fine too
    ended = run_job(client, db, collection_request(None, "m", "notes"))
    notes = {d["_id"]: d.get("answer") for d in db.notes.find()}
    assert notes[1] == "the owner's own" and notes[2] == {"score": 5}, (notes, ended)


def test_class2_an_answer_that_creates_its_parent_field_never_triggers_another_answer(client, db, caplog):
    """An answer written at a dotted `output_field` whose parent is absent creates that parent: the change stream
    reports `updatedFields: {"x": {"y": <answer>}}`, which `_touched` does not see as an answer (the answer is one
    level down), so a request watching an input under `x` answers again: an answer triggers an answer."""
    caplog.set_level(logging.INFO, logger="listener.batch_predictions")
    db.chain.insert_one({"_id": 1, "text": "hi", "x": None})
    db.chain.delete_one({"_id": 1})  # the collection exists; the document is inserted once B watches
    errors: list = []
    watching = collection_request("B", "m", "chain", input="{x.y.text}", output_field="b_out", watch=True)
    thread = watch_in_thread(client, db, watching, errors)
    wait_until(lambda: "watching chain" in caplog.text, 60, "the watch on chain")
    db.chain.insert_one({"_id": 1, "text": "hi"})  # B answers it once: its input is missing (an error answer)
    wait_until(lambda: (db.chain.find_one({"_id": 1}) or {}).get("b_out"), 60, "B's first answer")
    run_job(client, db, collection_request("A", "m", "chain", output_field="x.y"))  # A's answer creates `x`
    assert db.chain.find_one({"_id": 1})["x"]["y"]["request"] == "A"
    db.chain.insert_one({"_id": 2, "x": {"y": {"text": "sentinel"}}})  # after A's write in the stream
    wait_until(lambda: "b_out" in db.chain.find_one({"_id": 2}), 60, "B's answer to the sentinel")
    db[defaults.REQUESTS].update_one({"_id": "B"}, {"$set": {"cancel": True}})
    thread.join(60)
    assert errors == []
    b_out = db.chain.find_one({"_id": 1})["b_out"]
    assert "error" in b_out and "text" not in b_out, f"A's answer triggered B's: {b_out}"


def test_class2_two_odd_documents_with_large_ids_never_stop_the_others(client, db, caplog):
    """Each document the job cannot write is listed by `_id` in every later query (`$nin`), bounded by count
    (`MAX_UNWRITABLE`) but not by size: a collection's `_id`s are any size. Two documents with 9 MB ids whose
    `out` is a string (so `out.answer` cannot be written) make the next query over 16 MB: the driver raises
    DocumentTooLarge, a BSONError that `predict_collection` does not catch (it catches PyMongoError), the task
    dies, the request is requeued at each lease expiry and ends `too_many_attempts` with the others unanswered."""
    caplog.set_level(logging.ERROR, logger="listener.batch_predictions")  # its warnings quote the 9 MB ids
    big = "x" * (9 * 2**20)
    db.notes.insert_many([{"_id": f"a{big}", "text": "odd", "out": "taken"},
                          {"_id": f"b{big}", "text": "odd", "out": "taken"}])
    db.notes.insert_many([{"_id": f"c{n}", "text": f"ahoy {n}"} for n in range(3)])
    try:
        ended = run_job(client, db, collection_request("big-ids", "m", "notes", output_field="out.answer"),
                        max_batch=2)
    except Exception as exc:  # noqa: BLE001 (the finding)
        pytest.fail(f"the job died on two odd documents: {type(exc).__name__}: {str(exc)[:200]}")
    assert db.notes.count_documents({"out.answer.request": "big-ids"}) == 3
    assert ended["status"] == "done" and ended["progress"]["skipped"] == 2, {k: ended[k] for k in ("status",)}


@pytest.mark.parametrize("key, request_id", [("title", "GET /x"), ("text", "W")])
def test_class2_a_real_change_to_an_input_object_is_never_taken_for_an_answer(client, db, caplog, key, request_id):
    """`is_answer` takes any object with `checkpoint` and `request` keys for an answer the listener wrote. An
    input under an object that has such keys (a log line's `{title, request, checkpoint}`, or a writer who adds
    them) is then never answered again when that object is set anew: the watch skips the real change. Even an
    object with exactly an answer's fields, naming a request that exists, is a change where that request does
    not write (W writes `summary`, not `meta`)."""
    caplog.set_level(logging.INFO, logger="listener.batch_predictions")
    db.logs.insert_one({"_id": 1, "meta": {key: "first", "request": "GET /", "checkpoint": "v1"}})
    errors: list = []
    watching = collection_request("W", "m", "logs", input=f"{{meta.{key}}}", output_field="summary", watch=True)
    thread = watch_in_thread(client, db, watching, errors)
    wait_until(lambda: "watching logs" in caplog.text, 60, "the watch on logs")
    assert db.logs.find_one({"_id": 1})["summary"]["text"] == "re: first"
    db.logs.update_one({"_id": 1}, {"$set": {"meta": {key: "second", "request": request_id, "checkpoint": "base"}}})
    db.logs.insert_one({"_id": 2, "meta": {key: "sentinel"}})  # after the change in the stream
    wait_until(lambda: "summary" in db.logs.find_one({"_id": 2}), 60, "the answer to the sentinel")
    db[defaults.REQUESTS].update_one({"_id": "W"}, {"$set": {"cancel": True}})
    thread.join(60)
    assert errors == []
    assert db.logs.find_one({"_id": 1})["summary"]["text"] == "re: second", "the change to meta was ignored"


def test_class2_one_document_nested_deeper_than_the_driver_decodes_never_stops_the_others(client, db):
    """A document of the collection nested ~975 deep (the embedded server stores it) makes every find of a chunk
    holding it fail as InvalidBSON, a BSONError that `predict_collection` does not catch: the job dies at each
    retry and the other documents are never answered."""
    import sys

    deep = "x"
    for _ in range(975):
        deep = [deep]
    db.notes.insert_many([{"_id": n, "text": f"ahoy {n}"} for n in range(3)])
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)
    try:
        db.notes.insert_one({"_id": 1.5, "text": "odd", "extra": deep})
    finally:
        sys.setrecursionlimit(limit)
    try:
        ended = run_job(client, db, collection_request("deep-doc", "m", "notes"), max_batch=8)
    except Exception as exc:  # noqa: BLE001 (the finding)
        pytest.fail(f"the job died on one odd document: {type(exc).__name__}: {str(exc)[:120]}")
    assert db.notes.count_documents({"answer.request": "deep-doc"}) == 3
    assert ended["status"] == "done", ended["status"]


def test_class2_one_document_with_a_deep_id_never_stops_anothers_collection_request(client, db):
    """A request over a shared collection ends `done`, every other document answered, whatever `_id` one has."""
    # the document whose `_id` nests 400 deep is read (raw) but cannot be decoded; left out of later queries by
    # `_id: {$nin: [...]}`, it made a query the server fails (code 1): the job died at each retry
    db.notes.insert_many([{"_id": n, "text": f"ahoy {n}"} for n in range(3)])
    insert_nested(db.notes, {"_id": nested_document(400), "text": "odd"})
    try:
        ended = run_job(client, db, collection_request("deep-id", "m", "notes"), max_batch=8)
    except PyMongoError as exc:
        pytest.fail(f"the job died on one document's _id: {type(exc).__name__}: {str(exc)[:120]}")
    assert ended["status"] == "done", ended["status"]
    assert db.notes.count_documents({"answer.request": "deep-id"}) == 3


def test_class2_a_dropped_cursor_is_read_again_passing_over_what_could_not_be_answered(tmp_path, caplog):
    """A pass reads one cursor; one the server drops while the model generates (idle past its timeout) is opened
    again from the start: what was answered is behind the query, and what could not be (here a deep `_id`, which
    no query may name) is passed over by the job, so each document is answered, or skipped, once."""
    caplog.set_level(logging.INFO, logger="listener.batch_predictions")
    with EmbeddedServer(tmp_path / "server", port=free_port(), memory=True, failpoints=True) as server, \
            MongoClient(server.uri) as client:
        db = client["dropped"]
        insert_nested(db.notes, {"_id": nested_document(400), "text": "odd"})  # {k: ...} sorts before {n: ...}
        db.notes.insert_many([{"_id": {"n": n}, "text": f"ahoy {n}"} for n in range(5)])
        client.admin.command({"configureFailPoint": "failCommand", "mode": {"skip": 1, "times": 1},
                              "data": {"failCommands": ["getMore"], "errorCode": 43}})  # CursorNotFound
        ended = run_job(client, db, collection_request("again", "m", "notes"), max_batch=2)
        assert "read again from the start" in caplog.text
        assert ended["status"] == "done" and ended["progress"] == {"done": 5, "total": 6, "skipped": 1}, ended
        assert db.notes.count_documents({"answer.request": "again"}) == 5


def test_class2_whatever_one_collection_job_raises_ends_that_job_alone(client, db, caplog):
    """The job's task is its boundary: an error of a type nobody listed (here a KeyError from generation) is
    logged once, with its traceback (a programming error), and leaves the request to the lease reaper, never an
    exception out of `predict_collection`."""
    caplog.set_level(logging.WARNING, logger="listener.batch_predictions")
    db.notes.insert_one({"_id": 0, "text": "ahoy"})
    document = collection_request("raises", "m", "notes")
    db[defaults.REQUESTS].insert_one({**document, "status": "running", "lease": {"owner": OWNER}})
    spec = parse_request(document, Settings.load({}, environ=ANSWERS).limits)

    class Raising(Answering):
        async def generate(self, model, entry, prompts, params):
            raise KeyError("an unexpected one")

    async def job():
        async_client = AsyncMongoClient(client.address[0], client.address[1], directConnection=True)
        try:
            await asyncio.wait_for(predict_collection(Raising(async_client[db.name]), spec), 60)
        finally:
            await async_client.close()

    asyncio.run(job())  # returns: nothing escapes the job
    logged = [r for r in caplog.records if "KeyError" in r.getMessage() and "raises" in r.getMessage()]
    # With its traceback, as exc_info or as the inert exc_text a test before this one in the worker may have made
    # the root handlers write (`training.inert`).
    assert logged and all(r.exc_info or "Traceback" in (r.exc_text or "") for r in logged), logged
    assert db[defaults.REQUESTS].find_one({"_id": "raises"})["status"] == "running"  # the reaper's to retry


# --- attack on issue 21 (b): answers by shape and identity, the watch's boundary, apportioned places ----------



@pytest.mark.parametrize("owners", [{"request": "GET /", "status": 200, "bytes": 5120},
                                    [{"request": "GET /", "status": 200}, {"request": "POST /x", "status": 201}]],
                         ids=["object", "array"])
def test_class1_an_owners_value_with_a_request_key_is_replaced_by_a_request_of_that_id(client, db, owners):
    """A log collection's documents hold `meta: {request: "GET /", ...}` (or an array of such), the owner's own
    value. Another writer inserts a request whose `_id` is "GET /" and whose `output_field` is `meta`: the answer
    rule takes any `meta.request` equal to the request's id for "this request's answer", so the owner's value is
    replaced. A value that is not an answer's shape is no answer of the listener's: it must be left as it is."""
    db.access_log.insert_one({"_id": 1, "text": "a line", "meta": owners})
    ended = run_job(client, db, collection_request("GET /", "m", "access_log", output_field="meta"))
    assert db.access_log.find_one({"_id": 1})["meta"] == owners, ended["progress"]


def test_class1_a_request_deleted_by_the_ttl_lends_its_id_to_another_writer_over_its_answers(client, db):
    """With `MONGOTUNE_REQUESTS_TTL_S` the server deletes answered requests; their answers stay, naming the
    request only by `_id`. Another writer then inserts a request with that `_id` (free again) and a template of
    their own: the answer rule takes B's answers for its own and replaces them with whatever A's request says.
    An answer another request wrote must be left as it is, whatever that request's id."""
    b_answers = {n: {"text": f"B's summary {n}", "checkpoint": {"run": 1, "step": 2}, "request": "summaries"}
                 for n in range(2)}  # what B's request wrote from B's model, before the TTL deleted the request
    db.notes.insert_many([{"_id": n, "text": f"note {n}", "title": "A's words", "answer": b_answers[n]}
                          for n in range(2)])
    run_job(client, db, collection_request("summaries", "m", "notes", input="{title}"))
    assert {d["_id"]: d["answer"] for d in db.notes.find()} == b_answers


def test_class1_answers_a_deleted_request_wrote_are_never_a_later_requests_of_the_same_id(client, db):
    """The class of the above, with answers the listener itself wrote: B's request answers, is deleted (as the
    TTL does), and A's request of the same `_id` finds B's answers someone else's (another token): left as they
    are and counted as skipped, even an error answer, and even where A's output shape is B's exactly."""
    db.notes.insert_many([{"_id": n, "text": f"note {n}", "title": "A's words"} for n in range(2)])
    db.notes.update_one({"_id": 1}, {"$unset": {"text": ""}})  # B answers it with an error
    run_job(client, db, collection_request("summaries", "m", "notes"))
    b_answers = {d["_id"]: d["answer"] for d in db.notes.find()}
    assert b_answers[0]["text"] == "re: note 0" and "error" in b_answers[1]
    db[defaults.REQUESTS].delete_one({"_id": "summaries"})
    ended = run_job(client, db, collection_request("summaries", "m", "notes", input="{title}"))
    assert {d["_id"]: d["answer"] for d in db.notes.find()} == b_answers
    assert ended["status"] == "done" and ended["progress"] == {"done": 0, "total": 2, "skipped": 2}, ended


def test_class1_a_document_that_leaves_the_filter_while_generating_gets_no_answer(client, db):
    """The answer's write is fenced on `output_field` alone, not on the request's `filter`: a document whose owner
    marks it private (out of the request's filter) while the model generates still gets the answer written into
    it, computed from what it held before. Nothing may be written into a document that no longer matches."""
    db.notes.insert_many([{"_id": 0, "text": "public note", "private": False},
                          {"_id": 1, "text": "soon private", "private": False}])
    ended = run_job(client, db, collection_request("public-only", "m", "notes", filter={"private": False}),
                    meanwhile=lambda: db.notes.update_one({"_id": 1}, {"$set": {"private": True}}))
    assert "answer" not in db.notes.find_one({"_id": 1}), ended["progress"]


def test_class2_one_odd_insert_never_ends_another_writers_watching_request(client, db, caplog):
    """B watches a collection others may write into. A inserts one document whose `_id` the server cannot put in
    a change event (nested ~975 deep, which the embedded server stores): the stream's getMore fails with an
    OperationFailure that `_watch` does not contain, the job ends, and in a daemon the reaper reclaims it until
    B's request fails `too_many_attempts`. The watch must go past that event and answer the next insert."""
    caplog.set_level(logging.INFO, logger="listener.batch_predictions")
    db.shared.insert_one({"_id": 0, "text": "first"})
    errors: list = []
    thread = watch_in_thread(client, db, collection_request("B", "m", "shared", watch=True), errors)
    wait_until(lambda: "watching shared" in caplog.text, 60, "B's watch")
    insert_nested(db.shared, {"_id": nested_document(975), "text": "A's odd document"})
    db.shared.insert_one({"_id": 2, "text": "sentinel"})
    try:
        wait_until(lambda: errors or "answer" in db.shared.find_one({"_id": 2}), 60, "B's answer or its end")
    finally:
        db[defaults.REQUESTS].update_one({"_id": "B"}, {"$set": {"cancel": True}})
        thread.join(60)
    assert errors == [], f"B's watch ended on A's insert: {str(errors[0])[:100]}"


def test_class2_a_change_stream_the_server_fails_is_opened_again_and_the_watch_goes_on(tmp_path, caplog):
    """The class of the above at the stream itself: a getMore the server fails (history it no longer holds, an
    event it cannot build) opens the stream again from then, and a pass answers what lacks an answer, so an
    insert whichever side of the failure it falls is answered, and counted, and the request still watches."""
    caplog.set_level(logging.INFO, logger="listener.batch_predictions")
    with EmbeddedServer(tmp_path / "server", port=free_port(), memory=True, failpoints=True) as server, \
            MongoClient(server.uri) as client:
        db = client["flaky"]
        db.shared.insert_one({"_id": 0, "text": "first"})
        errors: list = []
        thread = watch_in_thread(client, db, collection_request("B", "m", "shared", watch=True), errors)
        wait_until(lambda: "watching shared" in caplog.text, 60, "B's watch")
        client.admin.command({"configureFailPoint": "failCommand", "mode": {"times": 1},
                              "data": {"failCommands": ["getMore"], "errorCode": 1}})
        db.shared.insert_one({"_id": 1, "text": "about the failure"})
        wait_until(lambda: "opened again" in caplog.text, 60, "the failed stream")
        db.shared.insert_one({"_id": 2, "text": "after it"})
        try:
            wait_until(lambda: errors or db.shared.count_documents({"answer.request": "B"}) == 3, 60, "B's answers")
        finally:
            db[defaults.REQUESTS].update_one({"_id": "B"}, {"$set": {"cancel": True}})
            thread.join(60)
        ended = db[defaults.REQUESTS].find_one({"_id": "B"})
        assert errors == [] and ended["status"] == "cancelled"
        progress = ended["progress"]  # the catch-up pass adds what it answers, as the watch does
        assert progress["done"] >= 3 and progress["skipped"] == 0 and progress["total"] == progress["done"], progress


def test_class2_a_template_never_builds_more_than_the_input_cap(limits):
    """`Prompt.render` substitutes every placeholder before it compares the prompt's length with `max_input_chars`: a
    template of 32,000 characters ("{a}" 10,666 times) over a document whose `a` is a 15 MB string builds a
    160 GB string in the daemon's own process (MemoryError, or the OOM killer ends the daemon where it fits in
    memory). Here 6,400 placeholders over 50 kB: the refusal must come without building 320 MB."""
    spec = parse_request(collection_request("big", "m", "notes", input="{a}" * 6_400),
                         Settings.load({}, environ=ANSWERS).limits)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="over the operator's limit"):
            Prompt.of(spec.input).render({"_id": 1, "a": "x" * 50_000}, 32_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"rendering one over-long prompt took {peak / 2**20:.0f} MiB"


def test_class3_another_writers_requests_never_take_a_models_places(module_db, module_daemon, tiny_model_path):
    """Requests over a collection are bounded per model (`max_collection_jobs_per_model`, 2), but any writer may
    name any model: A's two watching requests over A's own collection, naming B's model, take both of its places
    on the daemon for as long as A likes, and B's own request over B's collection on B's model is never claimed.
    B's request must be answered."""
    db = module_db
    db[defaults.MODELS].insert_one(served_model("b-model", tiny_model_path))
    db.a_feed.insert_one({"_id": 1, "text": "ahoy"})
    db.b_notes.insert_one({"_id": 1, "text": "ahoy"})
    requests = db[defaults.REQUESTS]
    requests.insert_many([collection_request(f"a-watch-{n}", "b-model", "a_feed", output_field=f"out{n}",
                                             watch=True) for n in range(2)])
    wait_until(lambda: requests.count_documents({"_id": {"$regex": "^a-watch"}, "status": "running"}) == 2, 120,
               "A's two watches running")
    requests.insert_one(collection_request("b-once", "b-model", "b_notes"))
    try:
        ended = settled(db, "b-once", timeout=60)
    finally:
        requests.update_many({"_id": {"$regex": "^a-watch"}}, {"$set": {"cancel": True}})
    if ended.get("status") != "done":  # what freed B: A's cancel, so A's watches held it back
        after = settled(db, "b-once", timeout=60).get("status")
        pytest.fail(f"B's request was {ended.get('status', 'pending')} after 60 s, {after} once A cancelled")
