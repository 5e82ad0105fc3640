"""`listener.embedded`: the SecantusDB child process, its persistence, and reuse of a running one."""

import pytest
from pymongo import MongoClient

from listener.embedded import EmbeddedServer, free_port
from training import defaults

pytestmark = pytest.mark.slow  # every test starts a server process


def count(uri: str, marker: str) -> int:
    client = MongoClient(uri, serverSelectionTimeoutMS=5000)
    try:
        return client.persist_check.things.count_documents({"marker": marker})
    finally:
        client.close()


def test_free_port_is_bindable():
    port = free_port()
    assert 1024 < port < 65536


def test_data_survives_stop_and_start(tmp_path):
    port = free_port()
    server = EmbeddedServer(tmp_path, port=port).start()
    try:
        assert server.process is not None and server.process.poll() is None
        assert server.answering()
        assert (tmp_path / "data").exists()
        client = MongoClient(server.uri, serverSelectionTimeoutMS=5000)
        try:
            assert client.admin.command("hello")["setName"] == defaults.EMBEDDED_REPLICA_SET
            client.persist_check.things.insert_many([{"marker": "kept", "i": i} for i in range(3)])
        finally:
            client.close()
    finally:
        server.stop()
    assert server.process is None
    assert not server.answering()

    again = EmbeddedServer(tmp_path, port=port).start()
    try:
        assert again.process is not None
        assert count(again.uri, "kept") == 3
    finally:
        again.stop()


def test_second_server_on_the_same_port_reuses_the_first(tmp_path):
    port = free_port()
    with EmbeddedServer(tmp_path / "first", port=port) as first:
        process = first.process
        assert process is not None
        second = EmbeddedServer(tmp_path / "second", port=port).start()
        assert second.process is None
        assert second.uri == first.uri
        second.stop()
        assert process.poll() is None
        assert first.answering()
        assert not (tmp_path / "second" / "data").exists()
    assert process.poll() is not None
    assert not EmbeddedServer(tmp_path / "first", port=port).answering()

