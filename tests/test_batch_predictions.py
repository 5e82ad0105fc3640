"""Predictions over a collection through a real daemon: every matching document answered, resumable, watchable."""

from listener.processes import wait_until
from tests.conftest import wait_for
from tests.test_serving import answer, served_model
from training import defaults

KEPT = {"text": "kept", "checkpoint": "base"}


def collection_request(doc_id, **fields) -> dict:
    return {"_id": doc_id, "model": "llm", "collection": "notes", "input": "note: {text}", "output_field": "answer",
            "checkpoint": "base", "params": {"max_new_tokens": 3}, **fields}


def test_matching_documents_are_answered_and_answers_of_this_checkpoint_are_kept(db, start_daemon, tiny_model_path):
    db[defaults.MODELS].insert_one(served_model("llm", tiny_model_path))
    db.notes.insert_many([{"_id": n, "text": f"ahoy {n}", "kind": "a"} for n in range(5)]
                         + [{"_id": 5, "text": "other", "kind": "b"}, {"_id": 6, "kind": "a"}])
    db.notes.update_one({"_id": 0}, {"$set": {"answer": KEPT}})  # answered before a crash: not again
    db.notes.update_one({"_id": 1}, {"$set": {"answer": {"text": "old", "checkpoint": {"run": 9, "step": 9}}}})
    start_daemon()
    db[defaults.REQUESTS].insert_one(collection_request("all-a", filter={"kind": "a"}))
    done = answer(db, "all-a")
    assert done["status"] == "done", done.get("error")
    assert done["progress"] == {"done": 6, "total": 6} and done["checkpoint_used"] == "base"
    notes = {d["_id"]: d for d in db.notes.find()}
    assert notes[0]["answer"] == KEPT
    for n in (1, 2, 3, 4):
        assert isinstance(notes[n]["answer"]["text"], str) and notes[n]["answer"]["checkpoint"] == "base"
    assert "text" in notes[6]["answer"]["error"] and notes[6]["answer"]["checkpoint"] == "base"
    assert "answer" not in notes[5]


def test_watch_answers_new_and_changed_documents_until_cancelled(db, start_daemon, tiny_model_path):
    db[defaults.MODELS].insert_one(served_model("llm", tiny_model_path))
    db.notes.insert_one({"_id": "old", "text": "ahoy"})
    daemon = start_daemon()
    db[defaults.REQUESTS].insert_one(collection_request("watching", watch=True))
    wait_for(db.notes, "old", lambda d: "answer" in d)
    wait_for(db[defaults.REQUESTS], "watching", lambda d: d.get("progress") == {"done": 1, "total": 1})
    wait_until(lambda: "watching notes for request" in daemon.log(), 60, "the watch on notes")
    db.notes.insert_one({"_id": "new", "text": "matey"})
    assert isinstance(wait_for(db.notes, "new", lambda d: "answer" in d)["answer"]["text"], str)
    db.notes.update_one({"_id": "old"}, {"$set": {"text": "changed", "answer": {"stale": True}}})
    changed = wait_for(db.notes, "old", lambda d: "text" in d["answer"])
    assert changed["answer"]["checkpoint"] == "base"
    db[defaults.REQUESTS].update_one({"_id": "watching"}, {"$set": {"cancel": True}})
    assert answer(db, "watching")["status"] == "cancelled"


def test_unsafe_collection_requests_are_refused(db, start_daemon):
    start_daemon()
    requests = db[defaults.REQUESTS]
    requests.insert_many([collection_request("js", filter={"$where": "sleep(1000)"}),
                          collection_request("system", collection="_models"),
                          collection_request("loop", input="{answer}")])
    refused = {doc_id: answer(db, doc_id)["error"] for doc_id in ("js", "system", "loop")}
    assert refused["js"]["field"] == "filter" and "$where" in refused["js"]["message"]
    assert refused["system"]["field"] == "collection"
    assert refused["loop"]["field"] == "output_field"
