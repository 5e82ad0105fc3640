"""Streamed answers, per-request time limits, timing and the TTL index, through a real daemon.

Tests that need no setting of their own share the module's daemon and database, each with its own model
and request ids.
"""

from click.testing import CliRunner

from listener.cli.main import cli
from listener.processes import registered, wait_until
from listener.indexes import TTL as TTL_INDEX
from tests.test_serving import answer, looping_model, served_model
from training import defaults


def states_until_done(db, tiny_model_path, doc_id: str, **fields) -> list[dict]:
    """Every state of a request for 48 tokens (to a model of its own, of the same id) that a change stream
    shows, until it is done."""
    db[defaults.MODELS].insert_one(served_model(doc_id, tiny_model_path))
    requests = db[defaults.REQUESTS]
    states = []
    with requests.watch([{"$match": {"documentKey._id": doc_id}}], full_document="updateLookup") as stream:
        requests.insert_one({"_id": doc_id, "model": doc_id, "input": "ahoy", "checkpoint": "base",
                             "params": {"max_new_tokens": 48}, **fields})
        for change in stream:
            states.append(change.get("fullDocument") or {})
            if states[-1].get("status") == "done":
                return states


def test_a_streamed_answer_grows_in_the_document_before_done(module_db, module_daemon, tiny_model_path):
    *partial, done = states_until_done(module_db, tiny_model_path, "streamed", stream=True)
    seen = []
    for document in partial:
        if document.get("output") and document["output"] not in seen:
            assert "usage" not in document
            seen.append(document["output"])
    assert len(seen) >= 2, f"partial outputs seen before done: {seen}"
    assert done["usage"]["completion_tokens"] > 8
    assert done["output"] and isinstance(done["output"], str)
    assert done["timing"]["queued_s"] >= 0 and done["timing"]["generation_s"] > 0


def test_a_request_without_stream_is_written_once(module_db, module_daemon, tiny_model_path):
    states = states_until_done(module_db, tiny_model_path, "unstreamed")
    assert [d["status"] for d in states if "output" in d] == ["done"]


def test_timeout_s_fails_the_request_and_the_worker_goes_on(db, start_daemon, tiny_model_path):
    db[defaults.MODELS].insert_many([served_model("loops", looping_model(tiny_model_path)),
                                     served_model("plain", tiny_model_path)])
    start_daemon(env={"MONGOTUNE_REQUEST_TIMEOUT_S": "30"})
    requests = db[defaults.REQUESTS]
    requests.insert_one({"_id": "own", "model": "loops", "input": [{"role": "user", "content": "hi"}],
                         "checkpoint": "base", "timeout_s": 2})
    own = answer(db, "own")
    assert own["status"] == "failed" and own["error"]["type"] == "timeout"
    assert "timeout_s of 2 s" in own["error"]["message"]
    requests.insert_one({"_id": "after", "model": "plain", "input": "ahoy", "checkpoint": "base", "timeout_s": 120,
                         "params": {"max_new_tokens": 4}})
    assert answer(db, "after")["status"] == "done"


def test_timeout_s_is_capped_by_the_operator(db, start_daemon, tiny_model_path):
    db[defaults.MODELS].insert_one(served_model("loops", looping_model(tiny_model_path)))
    start_daemon(env={"MONGOTUNE_REQUEST_TIMEOUT_S": "3"})
    db[defaults.REQUESTS].insert_one({"_id": "long", "model": "loops", "input": [{"role": "user", "content": "hi"}],
                                      "checkpoint": "base", "timeout_s": 3600})
    failed = answer(db, "long")
    assert failed["status"] == "failed" and failed["error"]["type"] == "request_timeout"
    assert "MONGOTUNE_REQUEST_TIMEOUT_S" in failed["error"]["message"]


def test_the_ttl_index_follows_the_operator_setting(db, start_daemon):
    requests = db[defaults.REQUESTS]
    daemon = start_daemon(env={"MONGOTUNE_REQUESTS_TTL_S": "3600"})
    index = wait_until(lambda: requests.index_information().get(TTL_INDEX), 60, "the TTL index")
    assert index["expireAfterSeconds"] == 3600 and index["key"] == [("completed_at", 1)]
    daemon.stop()
    start_daemon()  # the setting is off again: the index goes
    wait_until(lambda: TTL_INDEX not in requests.index_information(), 60, "the TTL index dropped")


def test_predict_stream_prints_the_answer_as_it_grows(module_db, server_uri, module_daemon, tiny_model_path):
    db = module_db
    db[defaults.MODELS].insert_one(served_model("predicted", tiny_model_path))
    registered(db, module_daemon.process)  # predict refuses to ask when no daemon is alive
    result = CliRunner().invoke(cli, ["predict", "--uri", server_uri, "--db", db.name, "predicted", "ahoy",
                                      "--stream", "--checkpoint", "base", "--max-new-tokens", "32"])
    assert result.exit_code == 0, result.output
    done = db[defaults.REQUESTS].find_one({"model": "predicted", "stream": True})
    assert done["status"] == "done" and done["output"] in result.output
