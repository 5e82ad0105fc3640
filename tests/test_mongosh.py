"""deploy/mongosh/ run by the real mongosh against the test server and a real daemon training the tiny model.

`.ci/run` installs mongosh into .mongosh/ (`npm install --prefix .mongosh mongosh@2.12.0`); a mongosh on
PATH does too. Without either, these tests skip and say how to install it.
"""

import os
import shutil
import subprocess

import pytest

from tests.conftest import ROOT, finished, wait_for
from training import defaults

SCRIPTS = ROOT / "deploy" / "mongosh"
MONGOSH = ROOT / ".mongosh" / "node_modules" / ".bin" / "mongosh"
MODEL = "pirate-test"


def mongosh_binary() -> str | None:
    return str(MONGOSH) if MONGOSH.exists() else shutil.which("mongosh")


pytestmark = pytest.mark.skipif(
    mongosh_binary() is None, reason="mongosh is not installed: npm install --prefix .mongosh mongosh@2.12.0 (.ci/run does)")


def with_database(uri: str, name: str) -> str:
    """The test server's URI with `name` as its path, as a user would type it for mongosh."""
    scheme, _, rest = uri.partition("://")
    hosts_and_path, _, query = rest.partition("?")
    return f"{scheme}://{hosts_and_path.split('/')[0]}/{name}" + (f"?{query}" if query else "")


@pytest.fixture
def mongosh(server_uri, db, tmp_path):
    """Run one script; its environment holds only what a user would set, plus a throwaway HOME for mongosh."""
    uri = with_database(server_uri, db.name)

    def run(script: str, expect: int = 0, **variables) -> str:
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **variables}
        done = subprocess.run([mongosh_binary(), "--quiet", "--norc", uri, str(SCRIPTS / script)],
                              capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == expect, f"{script} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    return run


def test_the_mongosh_scripts_drive_the_whole_lifecycle(db, mongosh, start_daemon, tiny_model_path):
    user = {"MONGOTUNE_MODEL_ID": MODEL, "MONGOTUNE_BASE_MODEL": tiny_model_path, "MONGOTUNE_COLLECTION": "chat"}
    assert "chat: 64 conversations" in mongosh("seed-pirate-chat.js", **user)
    assert db.chat.count_documents({"_fold": "valid"}) > 0
    start_daemon()

    assert "submitted" in mongosh("submit-model.js", **user)
    watched = mongosh("watch-models.js", **user)
    assert "status=succeeded" in watched and "step=" in watched
    assert "already exists" in mongosh("submit-model.js", **user)

    answer = mongosh("predict.js", **user, MONGOTUNE_PROMPT="Which planet is red?")
    request = db[defaults.REQUESTS].find_one({"model": MODEL})
    assert request["status"] == "done" and request["input"][0]["content"] == "Which planet is red?"
    assert request["output"] in answer

    models = db[defaults.MODELS]
    models.update_one({"_id": MODEL}, {"$set": {"trainer.max_steps": 100_000}})  # a run long enough to cancel
    assert "queued for a new run" in mongosh("retrain.js", **user)
    running = wait_for(models, MODEL, lambda d: d.get("run") == 2 and d.get("status") == "running")
    assert "cancel it or let it finish first" in mongosh("retrain.js", expect=1, **user)
    assert "cancel requested" in mongosh("cancel.js", **user)
    cancelled = wait_for(models, MODEL, finished)
    assert cancelled["status"] == "cancelled" and cancelled["run"] == running["run"]
    assert [run["trigger"] for run in cancelled["runs"]] == ["insert", "user"]
    assert "nothing to cancel" in mongosh("cancel.js", expect=1, **user)
    assert "no model" in mongosh("cancel.js", expect=1, **{**user, "MONGOTUNE_MODEL_ID": "nobody"})
