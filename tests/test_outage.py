"""The database goes away and comes back: daemons reconnect and resume their streams."""

import signal
import time

import pytest
from pymongo import MongoClient

from listener.demo import load_samples
from listener.embedded import EmbeddedServer, free_port
from listener.processes import registered
from tests.conftest import DaemonProcess, finished, wait_for
from tests.documents import model, request
from training import defaults

pytestmark = pytest.mark.slow  # every test starts server and daemon processes


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

    daemons = [DaemonProcess(restartable.uri, "outage", tmp_path, f"outage{i}", model_root=model_root) for i in range(2)]
    try:
        models.insert_one(model("before", tiny_model_path))
        assert wait_for(models, "before", finished, timeout_s=120)["status"] == "succeeded"
        requests.insert_one(request("before", "before"))
        assert wait_for(requests, "before", finished, timeout_s=60)["status"] == "done"

        restartable.stop()
        time.sleep(3)
        restartable.start()
        # Inserted at once, while the daemons are still backing off and reconnecting.
        models.insert_one(model("during", tiny_model_path))
        requests.insert_one(request("during", "before"))
        time.sleep(5)
        models.insert_one(model("after", tiny_model_path))
        requests.insert_one(request("after", "before"))

        for doc_id in ("during", "after"):
            assert wait_for(models, doc_id, finished, timeout_s=180)["status"] == "succeeded"
            assert wait_for(requests, doc_id, finished, timeout_s=60)["status"] == "done"
        assert all(d.process.poll() is None for d in daemons), "no daemon died of the outage"
        assert sum(d.log().count("training 'during' run 1 started") for d in daemons) == 1
    finally:
        for daemon in daemons:
            daemon.stop()
        client.close()


def test_sigterm_ends_a_daemon_within_seconds_even_with_the_database_gone(restartable, tmp_path):
    daemon = DaemonProcess(restartable.uri, "outage", tmp_path, "orphaned")
    registered(MongoClient(restartable.uri)["outage"], daemon.process)
    restartable.stop()
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(90) == 0, "a stopping daemon exits, database or not"
    assert "could not give back leases" in daemon.log(), "it gave up on the absent database instead of waiting"
