"""`listener server` and the home's embedded server: one server per home, owned by none of its daemons."""

import json
import os
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner
from pymongo import MongoClient

from listener import health
from listener.cli.main import cli
from listener.embedded import EmbeddedServer, home_port
from listener.processes import gone, registered, start_listener, stop, wait_until
from training import defaults, ids

pytestmark = pytest.mark.slow  # every test starts server processes


def server(home, *args):
    return CliRunner().invoke(cli, ["server", *args], env={defaults.ENV_HOME: str(home)})


def things(uri: str) -> int:
    client = MongoClient(uri, serverSelectionTimeoutMS=5000)
    try:
        return client.get_default_database().things.count_documents({})
    finally:
        client.close()


def test_each_home_has_its_own_server_and_keeps_its_port(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    try:
        started_a, started_b = server(a, "start"), server(b, "start")
        assert started_a.exit_code == 0 and started_b.exit_code == 0, started_a.output + started_b.output
        uri_a, pid_a = started_a.stdout.split()[:2]
        uri_b, pid_b = started_b.stdout.split()[:2]
        assert uri_a.endswith(f"/{defaults.DEFAULT_DB}?replicaSet={defaults.EMBEDDED_REPLICA_SET}")
        assert uri_a != uri_b and pid_a != pid_b
        MongoClient(uri_a).get_default_database().things.insert_one({"home": "a"})
        assert (things(uri_a), things(uri_b)) == (1, 0)
        assert "already running" in server(a, "start").stdout
        named = server(a, "status", "--uri-only", "--db", "mydb").stdout.strip()
        assert named == uri_a.replace(f"/{defaults.DEFAULT_DB}?", "/mydb?")

        assert server(a, "stop").exit_code == 0
        assert server(a, "status").exit_code == 1
        again = server(a, "start")
        assert again.stdout.split()[0] == uri_a, "a home's port is kept across restarts"
        assert things(uri_a) == 1
    finally:
        server(a, "stop"), server(b, "stop")
    assert server(a, "status").exit_code == 1 and server(b, "status").exit_code == 1


def test_a_server_of_another_folder_on_the_home_port_is_never_used(tmp_path):
    home = tmp_path / "home"
    taken = home_port(home / "embedded")
    with EmbeddedServer(tmp_path / "foreign", port=taken, memory=True) as foreign:
        MongoClient(foreign.uri).get_default_database(defaults.DEFAULT_DB).things.insert_one({"home": "foreign"})
        try:
            started = server(home, "start")
            assert started.exit_code == 0, started.output
            uri = started.stdout.split()[0]
            assert f":{taken}/" not in uri
            assert things(uri) == 0
            assert EmbeddedServer(home / "embedded").port == int(uri.split(":")[2].split("/")[0]), "the move is kept"
        finally:
            server(home, "stop")
        assert foreign.answering(), "stopping a home's server never stops another folder's"


def test_no_daemon_stops_the_server_another_one_uses(tmp_path):
    """The daemon that started the home's server stops; the other daemon keeps its database; `server stop` ends it."""
    home = tmp_path / "home"
    embedded = EmbeddedServer(home / "embedded")
    args = ("--set", "heartbeat_s=1")
    first = start_listener(None, "shared", "first", tmp_path / "first.log", home=home, args=args)
    second = None
    try:
        pid = wait_until(embedded.running_pid, 60, "the first daemon's embedded server")
        assert embedded.record()["started_by"].startswith("daemon first")
        second = start_listener(None, "shared", "second", tmp_path / "second.log", home=home, args=args)
        registered(MongoClient(embedded.uri).shared, second)
        assert stop(first) == 0
        assert embedded.running_pid() == pid
        beat = health.folder(home) / ids.file_name("second", ".json")
        stopped_at = json.loads(beat.read_text())["ok_at"]
        wait_until(lambda: json.loads(beat.read_text())["ok_at"] > stopped_at + 1, 30,
                   "the second daemon's next round trip to the database")
        assert stop(second) == 0
        assert embedded.running_pid() == pid
        stopped = server(home, "stop")
        assert stopped.exit_code == 0 and f"pid {pid}" in stopped.stdout
        assert embedded.running_pid() is None
    finally:
        for process in (first, second):
            if process is not None:
                stop(process)
        embedded.stop_running()


def test_python_m_listener_embedded_prints_a_uri_with_the_database(tmp_path):
    """.ci/run reads "URI PID" from it and kills PID at the end."""
    line = subprocess.run([sys.executable, "-m", "listener.embedded", "--folder", str(tmp_path), "--memory"],
                          capture_output=True, text=True, timeout=120, check=True).stdout
    uri, pid = line.split()
    try:
        assert f"/{defaults.DEFAULT_DB}?replicaSet=" in uri
        assert things(uri) == 0
    finally:
        os.kill(int(pid), signal.SIGTERM)
    # Watched by its pid, not by connecting: a server shutting down waits for its connections to close.
    wait_until(lambda: gone(int(pid)), 60, "the server's exit")
