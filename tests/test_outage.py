"""The database goes away and comes back: daemons reconnect and resume their streams."""

import signal
import time

import pytest
from pymongo import MongoClient

from listener.demo import load_samples
from listener.embedded import EmbeddedServer, free_port
from listener.processes import registered
from tests.conftest import Daemon, finished, wait_for
from training import defaults

QUICK = {"max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1, "max_seq_length": 64}


@pytest.fixture
def restartable(tmp_path):
    server = EmbeddedServer(tmp_path / "server", port=free_port()).start()
    yield server
    server.stop()


def test_daemons_ride_out_a_server_restart(restartable, tmp_path, tiny_model_path, model_root):
    client = MongoClient(restartable.uri)
    db = client["outage"]
    load_samples(db)
    models, requests = db[defaults.MODELS], db[defaults.REQUESTS]

    def model(doc_id):
        return {"_id": doc_id, "model_name_or_path": tiny_model_path, "trainer": QUICK,
                "data": {"collection": "pirate_chat", "key": "messages"}}

    def ask(doc_id):
        return {"_id": doc_id, "model": "before", "input": "ahoy", "params": {"max_new_tokens": 2}}

    daemons = [Daemon(restartable.uri, "outage", tmp_path, f"outage{i}", model_root=model_root) for i in range(2)]
    try:
        models.insert_one(model("before"))
        assert wait_for(models, "before", finished, timeout=120)["status"] == "succeeded"
        requests.insert_one(ask("before"))
        assert wait_for(requests, "before", finished, timeout=60)["status"] == "done"

        restartable.stop()
        time.sleep(3)
        restartable.start()
        # Inserted at once, while the daemons are still backing off and reconnecting.
        models.insert_one(model("during"))
        requests.insert_one(ask("during"))
        time.sleep(5)
        models.insert_one(model("after"))
        requests.insert_one(ask("after"))

        for doc_id in ("during", "after"):
            assert wait_for(models, doc_id, finished, timeout=180)["status"] == "succeeded"
            assert wait_for(requests, doc_id, finished, timeout=60)["status"] == "done"
        assert all(d.process.poll() is None for d in daemons), "no daemon died of the outage"
        assert sum(d.log().count("training 'during' run 1 started") for d in daemons) == 1
    finally:
        for daemon in daemons:
            daemon.stop()
        client.close()


def test_sigterm_ends_a_daemon_within_seconds_even_with_the_database_gone(restartable, tmp_path):
    daemon = Daemon(restartable.uri, "outage", tmp_path, "orphaned")
    registered(MongoClient(restartable.uri)["outage"], daemon.process)
    restartable.stop()
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(90) == 0, "a stopping daemon exits, database or not"
    assert "could not give back leases" in daemon.log(), "it gave up on the absent database instead of waiting"
