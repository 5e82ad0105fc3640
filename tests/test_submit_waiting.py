"""While `submit` waits, its line says whether a daemon is alive to take the model, and changes when that does."""

import datetime as dt
import os
import subprocess
import sys
import threading

from listener.cli.alive import waiting_note
from listener.demo import load_samples
from listener.leases import lease
from listener.processes import stop, wait_until
from tests.test_cli_lifecycle import definition, tiny_yaml
from training import defaults

NONE_ALIVE = "waiting for a daemon (none alive: start one with `listener start --db {db}`)"


def heartbeat(db, owner: str) -> None:
    db[defaults.LISTENER].insert_one({"_id": owner, "kind": "daemon", "owner": owner, "name": owner, "host": "h",
                                      "pid": 1, "heartbeat_at": defaults.now()})


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


def test_submit_says_no_daemon_is_alive_until_one_starts_then_follows_it_to_the_end(
        server_uri, db, start_daemon, tiny_model_path, tmp_path):
    load_samples(db)
    fast = {"MONGOTUNE_HEARTBEAT_S": "1"}
    command = [sys.executable, "-m", "listener", "submit", "--uri", server_uri, "--db", db.name,
               definition(tmp_path, tiny_yaml("waits", tiny_model_path))]
    environ = {k: v for k, v in os.environ.items() if k != defaults.ENV_URI}
    submit = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**environ, **fast})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip() for line in submit.stdout), daemon=True)
    reader.start()
    try:
        none_alive = NONE_ALIVE.format(db=db.name)
        wait_until(lambda: none_alive in lines or submit.poll() is not None, 60, "submit's first line")
        assert none_alive in lines, lines
        start_daemon(env=fast)
        assert submit.wait(300) == 0, lines
    finally:
        stop(submit)
    reader.join(10)
    after = lines[lines.index(none_alive) + 1:]
    assert {"waiting for a daemon to claim it (1 alive)", "loading model and data"} & set(after), lines
    assert none_alive not in after and after[-1] == "succeeded", lines
