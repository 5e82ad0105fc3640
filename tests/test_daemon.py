"""The daemon's life: refusing what cannot work, heartbeats, catching up, cancel, retrain, many daemons.

Tests that neither stop the daemon, queue work before it starts nor need settings of their own share the module's
daemon and database (each its own model and request ids).
"""

import subprocess
import sys
import time
from importlib import metadata

import pytest
from click.testing import CliRunner

from listener.cli.status import status
from listener.demo import load_samples
from listener.processes import wait_until
from tests.conftest import ROOT, finished, wait_for
from tests.documents import LONG, QUICK, model
from training import defaults



def test_a_standalone_server_is_refused_with_a_clear_error(standalone_uri):
    result = subprocess.run([sys.executable, "-m", "listener", "start", "--uri", standalone_uri],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode != 0
    assert "replica set" in result.stderr and "change streams" in result.stderr


def test_heartbeat_status_check_and_a_bounded_graceful_exit(db, server_uri, start_daemon, tmp_path):
    daemon = start_daemon("beating")
    record = wait_for(db[defaults.LISTENER], {"$regex": "^daemon:beating:"}, lambda d: True, timeout_s=60)
    assert record["pid"] == daemon.process.pid and "counters" in record
    runner = CliRunner(env={defaults.ENV_HOME: str(tmp_path)})
    checked = runner.invoke(status, ["--check"])
    assert checked.exit_code == 0 and "'beating'" in checked.output
    shown = runner.invoke(status, ["--uri", server_uri, "--db", db.name])
    assert shown.exit_code == 0 and record["owner"] in shown.output
    words = " ".join(shown.output.split())  # however the terminal wrapped it
    for library in ("mongotune", "torch", "transformers", "trl", "peft"):
        assert f"{library} {metadata.version(library)}" in words, "status shows what the daemon runs with"
    assert daemon.stop(timeout=30) == 0  # 0: it stopped on SIGTERM, never killed
    assert db[defaults.LISTENER].count_documents({"kind": "daemon"}) == 0
    assert runner.invoke(status, ["--check"]).exit_code == 1


def test_status_check_trusts_no_record_in_the_database(db, server_uri, tmp_path):
    """A forged heartbeat in `_listener` does not make a dead deployment look healthy."""
    import datetime as dt

    db[defaults.LISTENER].insert_one({"_id": "daemon:forged", "kind": "daemon", "name": "forged", "owner": "forged",
                                      "host": "h", "pid": 1, "heartbeat_at": dt.datetime.now(dt.timezone.utc)})
    runner = CliRunner(env={defaults.ENV_HOME: str(tmp_path), defaults.ENV_URI: server_uri})
    result = runner.invoke(status, ["--check", "--db", db.name])
    assert result.exit_code == 1 and "no daemon has run" in result.output


def test_documents_inserted_while_no_daemon_ran_are_served_at_start(db, start_daemon, tiny_model_path):
    load_samples(db)
    db[defaults.MODELS].insert_one(model("early", tiny_model_path))
    db[defaults.REQUESTS].insert_one({"_id": "early-question", "model": "early", "input": "ahoy",
                                      "checkpoint": "base", "params": {"max_new_tokens": 3}})
    start_daemon()
    assert wait_for(db[defaults.MODELS], "early", finished, timeout_s=120)["status"] == "succeeded"
    assert wait_for(db[defaults.REQUESTS], "early-question", finished, timeout_s=60)["status"] == "done"


def test_cancel_stops_training_keeps_a_checkpoint_and_retrain_starts_a_new_run(module_samples, module_daemon,
                                                                              tiny_model_path):
    models = module_samples[defaults.MODELS]
    models.insert_one(model("long", tiny_model_path, LONG))
    wait_for(models, "long", lambda d: (d.get("progress") or {}).get("step", 0) >= 3, timeout_s=120)
    models.update_one({"_id": "long"}, {"$set": {"cancel": True}})
    cancelled = wait_for(models, "long", finished, timeout_s=60)
    assert cancelled["status"] == "cancelled" and "cancel" not in cancelled
    assert cancelled["checkpoints"] and cancelled["checkpoints"][-1]["step"] < LONG["max_steps"]

    models.update_one({"_id": "long"}, {"$set": {"status": "pending", "trainer": QUICK}})
    retrained = wait_for(models, "long", lambda d: d.get("run") == 2 and finished(d), timeout_s=120)
    assert retrained["status"] == "succeeded" and retrained["attempts"] == 1
    runs = [c["run"] for c in retrained["checkpoints"]]
    assert 1 in runs and 2 in runs, "earlier runs' checkpoints are kept"
    assert retrained["best_checkpoint"]["run"] in (1, 2)


def test_a_cancelled_pending_request_is_never_answered(db, start_daemon, tiny_model_path):
    db[defaults.MODELS].insert_one(model("m", tiny_model_path))
    db[defaults.REQUESTS].insert_one({"_id": "r", "model": "m", "input": "x", "checkpoint": "base", "cancel": True})
    start_daemon()
    answer = wait_for(db[defaults.REQUESTS], "r", finished, timeout_s=60)
    assert answer["status"] == "cancelled" and "output" not in answer


def test_many_daemons_handle_each_document_exactly_once(db, start_daemon, tiny_model_path):
    load_samples(db)
    daemons = [start_daemon(f"many{i}") for i in range(3)]
    n_models, n_requests = 4, 24
    db[defaults.MODELS].insert_many([model(f"m{i}", tiny_model_path) for i in range(n_models)])
    db[defaults.REQUESTS].insert_many([{"_id": f"r{i}", "model": f"m{i % n_models}", "input": f"ahoy {i}",
                                        "checkpoint": "base", "params": {"max_new_tokens": 3}}
                                       for i in range(n_requests)])
    trained = [wait_for(db[defaults.MODELS], f"m{i}", finished, timeout_s=300) for i in range(n_models)]
    answered = [wait_for(db[defaults.REQUESTS], f"r{i}", finished, timeout_s=120) for i in range(n_requests)]
    assert all(m["status"] == "succeeded" and m["run"] == 1 and m["attempts"] == 1 for m in trained)
    assert all(r["status"] == "done" and r["attempts"] == 1 for r in answered)
    time.sleep(3)  # one heartbeat (2 s by default) after the last answer
    records = list(db[defaults.LISTENER].find({"kind": "daemon"}))
    assert len(records) == 3
    assert sum(r["counters"]["trainings_started"] for r in records) == n_models
    assert sum(r["counters"]["requests_done"] for r in records) == n_requests
    logs = "".join(d.log() for d in daemons)
    for i in range(n_models):
        assert logs.count(f"training 'm{i}' run 1 started") == 1


def test_resume_tokens_are_saved_and_an_unusable_one_falls_back_to_a_scan(db, start_daemon, tiny_model_path):
    load_samples(db)
    listener = db[defaults.LISTENER]
    first = start_daemon("keeper")
    db[defaults.MODELS].insert_one(model("m", tiny_model_path))
    assert wait_for(db[defaults.MODELS], "m", finished, timeout_s=120)["status"] == "succeeded"
    saved = wait_for(listener, "resume:keeper:_models", lambda d: "token" in d, timeout_s=30)
    assert saved["token"]["_data"]
    first.stop()

    listener.update_one({"_id": "resume:keeper:_requests"}, {"$set": {"token": {"_data": "00DEADBEEF"}}},
                        upsert=True)
    db[defaults.REQUESTS].insert_one({"_id": "while-down", "model": "m", "input": "ahoy",
                                      "params": {"max_new_tokens": 2}})
    second = start_daemon("keeper")
    assert wait_for(db[defaults.REQUESTS], "while-down", finished, timeout_s=60)["status"] == "done"
    assert "can no longer be used" in second.log()
    # The daemons' own writes (claims, answers) pass no event to the requests stream: the next insert saves a token.
    db[defaults.REQUESTS].insert_one({"_id": "after", "model": "m", "input": "ahoy", "params": {"max_new_tokens": 2}})
    assert wait_for(db[defaults.REQUESTS], "after", finished, timeout_s=60)["status"] == "done"
    token = wait_for(listener, "resume:keeper:_requests", lambda d: d["token"]["_data"] != "00DEADBEEF", timeout_s=30)
    assert token["token"]["_data"]


def test_documents_that_break_the_listeners_own_fields_fail_alone(module_samples, module_daemon, tiny_model_path):
    models, requests = module_samples[defaults.MODELS], module_samples[defaults.REQUESTS]
    models.insert_one({**model("x", tiny_model_path), "_id": {"team": "a", "name": "dict-id"}})
    models.insert_one({**model("string-run", tiny_model_path), "run": "1"})
    models.insert_one(model("good", tiny_model_path))
    requests.insert_one({"_id": "string-attempts", "model": "good", "input": "hi", "attempts": "x"})
    requests.insert_one({"_id": "pattern", "model": {"$regex": "^g"}, "input": "hi", "checkpoint": "base"})
    requests.insert_one({"_id": "after", "model": "good", "input": "hi", "checkpoint": "base",
                         "params": {"max_new_tokens": 2}})

    for collection, doc_id, field in ((models, {"team": "a", "name": "dict-id"}, "_id"), (models, "string-run", "run"),
                                      (requests, "string-attempts", "attempts"), (requests, "pattern", "model")):
        broken = wait_for(collection, doc_id, finished, timeout_s=60)
        assert broken["status"] == "failed" and broken["error"]["type"] == "invalid_document", broken
        assert broken["error"]["field"] == field
    assert wait_for(models, "good", finished, timeout_s=120)["status"] == "succeeded"
    assert wait_for(requests, "after", finished, timeout_s=60)["status"] == "done"
    assert module_daemon.process.poll() is None


def test_max_jobs_holds_when_many_models_arrive_at_once(db, start_daemon, tiny_model_path):
    load_samples(db)
    start_daemon(max_jobs=1)
    db[defaults.MODELS].insert_many([model(f"m{i}", tiny_model_path, LONG) for i in range(3)])
    with pytest.raises(TimeoutError):  # for 8 s (a claim takes milliseconds), never two trainings at once
        wait_until(lambda: db[defaults.MODELS].count_documents({"status": "running"}) > 1, 8, "a second training")
