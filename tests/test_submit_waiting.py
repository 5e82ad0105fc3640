"""`submit` inserts only while a daemon is alive; while it waits, its line says what the daemons mean for the model."""

import datetime as dt
import os
import subprocess
import sys

from listener.cli.alive import waiting_note
from listener.demo import load_samples
from listener.leases import lease
from listener.processes import registered
from tests.documents import heartbeat
from tests.test_cli_lifecycle import definition, tiny_yaml
from training import defaults

NONE_ALIVE = "waiting for a daemon (none alive: start one with `listener start --db {db}`)"


def test_the_note_follows_the_heartbeats_once_an_interval_and_the_lease(db):
    note = waiting_note(db, heartbeat_s=3600)
    pending = {"_id": "m"}
    assert note(pending) == NONE_ALIVE.format(db=db.name)
    heartbeat(db, "d0:1")
    assert note(pending) == NONE_ALIVE.format(db=db.name), "heartbeats are read again only after an interval"

    note = waiting_note(db, heartbeat_s=3600)
    assert note(pending) == "waiting for a daemon to claim it (1 alive)"
    assert note({"_id": "m", "status": "running", "lease": lease("d0:1", 60)}) is None
    expired = {"_id": "m", "status": "running", "lease": {"owner": "gone", "expires_at": defaults.now() -
                                                          dt.timedelta(seconds=1)}}
    assert note(expired) == "the daemon running it stopped; one of the 1 alive will resume it"
    assert waiting_note(db.client[f"e{db.name}"], 3600)(expired) == (
        "the daemon running it stopped; another will resume it when one starts")
    assert note({"_id": "m", "status": "succeeded"}) is None


def test_submit_without_a_daemon_inserts_nothing_and_the_same_command_succeeds_once_one_runs(
        server_uri, db, start_daemon, tiny_model_path, tmp_path):
    load_samples(db)
    fast = {"MONGOTUNE_HEARTBEAT_S": "1"}
    command = [sys.executable, "-m", "listener", "submit", "--uri", server_uri, "--db", db.name,
               definition(tmp_path, tiny_yaml("waits", tiny_model_path))]
    environ = {**{k: v for k, v in os.environ.items() if k != defaults.ENV_URI}, **fast}
    refused = subprocess.run(command, capture_output=True, text=True, env=environ, timeout=120)
    assert refused.returncode == 1 and refused.stdout == "", refused
    assert refused.stderr.splitlines()[0].startswith(f"Error: no daemon is alive on database {db.name!r}"), refused
    assert db[defaults.MODELS].count_documents({}) == 0

    registered(db, start_daemon(env=fast).process)
    followed = subprocess.run(command, capture_output=True, text=True, env=environ, timeout=300)
    assert followed.returncode == 0, followed
    lines = followed.stdout.splitlines()
    assert NONE_ALIVE.format(db=db.name) not in lines and lines[-1] == "succeeded", lines
