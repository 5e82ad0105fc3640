"""A newcomer's loose ends (issue 23 §6): Ctrl-C while following, an ended run's bar, a refused login, an export's
files and card. Each is a person's session: real commands against the real server, exit code and first line."""

import os
import re
import signal
import subprocess
import sys
from urllib.parse import quote

import pytest
import yaml
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from listener.cli.errors import one_line
from tests.documents import heartbeat
from tests.test_cli_lifecycle import definition, on, tiny_yaml
from training import defaults
from training.export import model_card

STOPPED = "stopped following 'm'; its training goes on in the daemon (`listener cancel m` cancels it"


def interrupted(command: list[str]) -> subprocess.CompletedProcess:
    """Run a `listener` command as a person would, press Ctrl-C once its first line is out, and collect the rest."""
    environ = {k: v for k, v in os.environ.items() if k != defaults.ENV_URI}
    process = subprocess.Popen([sys.executable, "-m", "listener", *command], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=environ, preexec_fn=as_from_a_terminal)
    first = process.stdout.readline()
    process.send_signal(signal.SIGINT)
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        status = open(f"/proc/{process.pid}/status").read()
        process.kill()
        pytest.fail(f"Ctrl-C did not stop {command[0]}: " + " ".join(line for line in status.splitlines()
                                                                    if line.startswith(("SigBlk", "SigIgn"))))
    return subprocess.CompletedProcess(command, process.returncode, first + out, err)


def as_from_a_terminal() -> None:
    """A shell starts a command with SIGINT neither ignored nor blocked, whatever this test process inherited or
    a library it ran left behind (a pytest-xdist worker once passed it on blocked)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_on_logs_follow_says_the_training_goes_on_and_how_to_cancel_it(server_uri, db):
    db[defaults.MODELS].insert_one({"_id": "m", "model_name_or_path": "x", "data": {"collection": "c"}})
    stopped = interrupted(["logs", "m", "--follow", "--uri", server_uri, "--db", db.name])
    assert stopped.returncode == 130, stopped
    assert stopped.stdout.splitlines()[0].startswith("waiting for a daemon"), stopped
    assert stopped.stderr.splitlines() == [STOPPED + ", `listener logs m --follow` follows it again)"], stopped
    assert db[defaults.MODELS].find_one({"_id": "m"}).get("status") is None, "following stopped, the model did not"


def test_ctrl_c_on_submit_follow_says_the_same_once_the_model_is_in(server_uri, db, tiny_model_path, tmp_path):
    heartbeat(db)  # a daemon's record: submit inserts only while one is alive
    stopped = interrupted(["submit", definition(tmp_path, tiny_yaml("m", tiny_model_path)),
                           "--uri", server_uri, "--db", db.name])
    assert stopped.returncode == 130, stopped
    assert stopped.stdout.splitlines()[0] == f"inserted model 'm' into {db.name}.{defaults.MODELS}", stopped
    assert stopped.stderr.splitlines()[0].startswith(STOPPED), stopped
    assert db[defaults.MODELS].count_documents({"_id": "m"}) == 1


def test_a_cancelled_or_failed_runs_bar_stops_and_says_how_it_ended_without_an_eta(server_uri, db):
    progress = {"step": 3, "total_steps": 10, "loss": 1.5, "eta_s": 40.0}
    db[defaults.MODELS].insert_many([
        {"_id": "c", "status": "cancelled", "run": 1, "progress": progress},
        {"_id": "f", "status": "failed", "run": 1, "progress": progress,
         "error": {"type": "RuntimeError", "message": "out of memory"}},
    ])
    for model_id, status in (("c", "cancelled"), ("f", "failed")):
        for terminal in ({}, {"FORCE_COLOR": "1", "COLUMNS": "200"}):
            followed = on(server_uri, db, "logs", model_id, "--follow", env=terminal)
            assert followed.exit_code == 1, followed.output
            lines = [line for line in re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", followed.output).splitlines() if line.strip()]
            assert lines[0].strip().startswith(f"{status} at step 3/10"), followed.output
            assert not re.search("[\u2800-\u28ff]", followed.output), "no spinner frame: the run has ended"
            assert "ETA" not in followed.output, followed.output
            assert lines[-1].startswith(f"status {status}, run 1, step 3/10, loss 1.5"), followed.output


def test_output_that_is_not_a_terminal_gets_the_bars_figures_as_lines_while_training_moves(monkeypatch):
    """A piped `make demo` or `submit` log shows training move: a line when the step moved and a while has passed."""
    import io

    from rich.console import Console

    from listener import follow

    clock = iter(range(0, 1000, 4))  # each document arrives 4 s after the one before
    monkeypatch.setattr(follow.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    follower = follow.Follower(Console(file=out, width=200))
    assert follower.plain
    for step in range(1, 11):
        follower.show({"_id": "m", "status": "running", "run": 1,
                       "progress": {"step": step, "total_steps": 10, "loss": 2.0 - step / 10, "eta_s": 10 - step}})
    lines = [line for line in out.getvalue().splitlines() if line.startswith("step ")]
    assert lines[0] == "step 1/10  loss 1.9  eval -  ETA 9s"
    assert [line.split()[1] for line in lines] == ["1/10", "4/10", "7/10", "10/10"]  # every 10 s, and the last


def test_the_follow_view_shows_the_newest_rewards_and_nothing_for_an_sft_run():
    import io

    from rich.console import Console

    from listener import follow

    metrics = [{"run": 1, "step": 3, "loss": 0.5, "rewards/chosen": 0.25, "rewards/rejected": -0.5,
                "rewards/accuracies": 1.0, "rewards/margins": 0.75}, {"run": 1, "step": 3, "eval_loss": 0.4}]
    assert follow.preference({"metrics": metrics}) == \
        "rewards: chosen 0.25 rejected -0.5 accuracy 1 margin 0.75 (step 3)"
    assert follow.preference({"metrics": [{"step": 1, "loss": 2.0}]}) == ""
    assert follow.preference({"metrics": [{"rewards/margins": "[red]x", "step": "y"}]}) == "rewards: margin - (step -)"
    out = io.StringIO()
    follow.Follower(Console(file=out, width=200)).show(
        {"_id": "m", "status": "running", "run": 1, "metrics": metrics,
         "progress": {"step": 3, "total_steps": 10, "loss": 0.5, "eta_s": 7}})
    assert "step 3/10  loss 0.5  eval 0.4  ETA 7s  rewards: chosen 0.25" in out.getvalue()


def test_a_wrong_password_is_one_line_naming_the_user_never_the_password(server_uri, db):
    admin = MongoClient(server_uri)
    admin[db.name].command("createUser", "alice", pwd="right-password", roles=["readWrite"])
    host = server_uri.split("://", 1)[1].split("/")[0].split("?")[0]
    wrong = f"mongodb://alice:{quote('wrong-pässword')}@{host}/{db.name}?authSource={db.name}"
    refused = on(wrong, db, "status")
    assert refused.exit_code == 1, refused.output
    lines = refused.output.splitlines()
    assert len(lines) == 1, refused.output
    assert lines[0].startswith("Error: MongoDB at mongodb://alice:***@"), lines[0]
    assert "authentication failed for user 'alice'" in lines[0] and "MONGOTUNE_URI" in lines[0], lines[0]
    assert "wrong" not in lines[0] and "b'" not in lines[0] and "full error" not in lines[0], lines[0]

    try:  # what the daemon's side sees: the server's own refusal, as pymongo raises it
        MongoClient(wrong, serverSelectionTimeoutMS=5000)[db.name].command("ping")
    except OperationFailure as exc:
        assert exc.code == 18 and "full error" in str(exc)
        assert one_line(exc, wrong) == lines[0].removeprefix("Error: ")
    else:
        raise AssertionError("the server took a wrong password")


def test_a_model_card_carries_the_hubs_metadata_and_no_document_can_add_keys_or_markup():
    hostile = {"_id": "m<img src=x onerror=alert(1)>", "runs": [{"number": 1, "data": {"collection": "a|b\n# x"}}],
               "model_name_or_path": "org/x\nlicense: mit\n---\n# [click](http://evil)"}
    entry = {"run": 1, "step": 2, "metrics": {}}
    for adapter_only, library in ((True, "peft"), (False, "transformers")):
        card = model_card(hostile, entry, adapter_only)
        _, header, body = card.split("---\n", 2)
        assert yaml.safe_load(header) == {"library_name": library, "pipeline_tag": "text-generation",
                                          "tags": ["mongotune", "lora", *([] if adapter_only else ["merged"])]}
        assert "# m\\<img src=x onerror=alert\\(1\\)\\>\n" in body, body
        assert "from org/x license: mit --- \\# \\[click\\]\\(http://evil\\) (" in body, body
        assert "| 1 |  |  |  | a\\|b \\# x |" in body, body
    hub = model_card({**hostile, "model_name_or_path": "Qwen/Qwen2.5-0.5B"}, entry, True)
    assert yaml.safe_load(hub.split("---\n")[1])["base_model"] == "Qwen/Qwen2.5-0.5B"


# converts the offline model in a real `listener demo`: seconds
@pytest.mark.slow
def test_the_demos_first_model_conversion_draws_no_tqdm_bars(tmp_path):
    """The first `listener demo` converts the offline model; transformers' bars came out crushed beside its line."""
    environ = {**{k: v for k, v in os.environ.items() if k != defaults.ENV_URI}, "XDG_CACHE_HOME": str(tmp_path)}
    unreachable = "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=300&connectTimeoutMS=300"
    demo = subprocess.run([sys.executable, "-m", "listener", "demo", "--uri", unreachable], capture_output=True,
                          text=True, env=environ, timeout=300)
    assert demo.returncode == 1, demo
    assert demo.stdout.startswith("Converting ") and "(once, about 20 s)" in " ".join(demo.stdout.split()), demo
    assert "it/s" not in demo.stderr and "%|" not in demo.stderr, demo.stderr
    assert demo.stderr.splitlines()[-1].startswith(f"Error: cannot reach MongoDB at {unreachable}: "), demo.stderr
