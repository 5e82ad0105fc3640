"""Predictions over a collection through a real daemon: every matching document answered, resumable, watchable.

The module's tests share one daemon and database, each with its own model, request ids and collection.
"""

from listener.processes import wait_until
from tests.conftest import wait_for
from tests.documents import ANSWERS
from tests.test_serving import answer, served_model
from training import defaults

DAEMON_ENV = ANSWERS  # the operator lets answers be written into any data collection
TOKEN = "0123456789abcdef" * 2  # the request's answers token, as its first job, before a crash, drew it
KEPT = {"text": "kept", "checkpoint": "base", "request": "all-a", "token": TOKEN}


def collection_request(doc_id, model_id, collection, **fields) -> dict:
    return {"_id": doc_id, "model": model_id, "collection": collection, "input": "note: {text}",
            "output_field": "answer", "checkpoint": "base", "params": {"max_new_tokens": 3}, **fields}


def test_matching_documents_are_answered_and_answers_of_this_checkpoint_are_kept(module_db, module_daemon,
                                                                                 tiny_model_path):
    db = module_db
    db[defaults.MODELS].insert_one(served_model("resumed", tiny_model_path))
    db.notes.insert_many([{"_id": n, "text": f"ahoy {n}", "kind": "a"} for n in range(5)]
                         + [{"_id": 5, "text": "other", "kind": "b"}, {"_id": 6, "kind": "a"}])
    db.notes.update_one({"_id": 0}, {"$set": {"answer": KEPT}})  # answered before a crash: not again
    db.notes.update_one({"_id": 1}, {"$set": {"answer": {"text": "old", "checkpoint": {"run": 9, "step": 9},
                                                         "request": "all-a", "token": TOKEN}}})
    db[defaults.REQUESTS].insert_one({**collection_request("all-a", "resumed", "notes", filter={"kind": "a"}),
                                      "answers_token": TOKEN})
    done = answer(db, "all-a")
    assert done["status"] == "done", done.get("error")
    assert done["progress"] == {"done": 6, "total": 6, "skipped": 0} and done["checkpoint_used"] == "base"
    notes = {d["_id"]: d for d in db.notes.find()}
    assert notes[0]["answer"] == KEPT
    for n in (1, 2, 3, 4):
        assert isinstance(notes[n]["answer"]["text"], str) and notes[n]["answer"]["checkpoint"] == "base"
    assert "text" in notes[6]["answer"]["error"] and notes[6]["answer"]["checkpoint"] == "base"
    assert "answer" not in notes[5]


def test_watch_answers_new_and_changed_documents_until_cancelled(module_db, module_daemon, tiny_model_path):
    db = module_db
    db[defaults.MODELS].insert_one(served_model("watcher", tiny_model_path))
    db.watched.insert_one({"_id": "old", "text": "ahoy"})
    db[defaults.REQUESTS].insert_one(collection_request("watching", "watcher", "watched", watch=True))
    wait_for(db.watched, "old", lambda d: "answer" in d)
    wait_for(db[defaults.REQUESTS], "watching", lambda d: d.get("progress") == {"done": 1, "total": 1, "skipped": 0})
    wait_until(lambda: "watching watched for request" in module_daemon.log(), 60, "the watch on watched")
    db.watched.insert_one({"_id": "new", "text": "matey"})
    assert isinstance(wait_for(db.watched, "new", lambda d: "answer" in d)["answer"]["text"], str)
    db.watched.update_one({"_id": "old"}, {"$set": {"text": "changed"}})
    wait_for(db[defaults.REQUESTS], "watching", lambda d: d["progress"] == {"done": 3, "total": 3, "skipped": 0})
    assert db.watched.find_one({"_id": "old"})["answer"]["checkpoint"] == "base"
    db[defaults.REQUESTS].update_one({"_id": "watching"}, {"$set": {"cancel": True}})
    assert answer(db, "watching")["status"] == "cancelled"


def test_unsafe_collection_requests_are_refused(module_db, module_daemon):
    requests = module_db[defaults.REQUESTS]
    requests.insert_many([collection_request("js", "llm", "unsafe", filter={"$where": "sleep(1000)"}),
                          collection_request("system", "llm", "_models"),
                          collection_request("loop", "llm", "unsafe", input="{answer}")])
    refused = {doc_id: answer(module_db, doc_id)["error"] for doc_id in ("js", "system", "loop")}
    assert refused["js"]["field"] == "filter" and "$where" in refused["js"]["message"]
    assert refused["system"]["field"] == "collection"
    assert refused["loop"]["field"] == "output_field"
