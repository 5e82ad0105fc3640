"""Document text reaches terminals and logs inert: control characters and rich markup escaped, length bounded.

Whoever writes documents is untrusted; what they write is shown by `listener status`, `logs`,
`checkpoints`, `predict`, `submit` and written to the daemon's log. Each test feeds escape sequences,
carriage returns, NUL, rich markup and megabyte strings through the real commands or a real daemon.
"""

import datetime as dt
import json
import logging
import re

from click.testing import CliRunner
from rich.text import Text

from listener.cli.main import cli
from listener.cli.options import setup_logging
from listener.demo import load_samples
from listener.processes import registered
from tests.conftest import finished, wait_for
from tests.documents import model
from training import defaults
from training.inert import MAX_LINE_CHARS, inert

HOSTILE = "\x1b]0;pwned\x07\x1b[2J\r\0\x7f\x9b[/red][bold]"
BIG = "x" * 2**20
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # every control character but the newline between lines
LONGEST_LINE = MAX_LINE_CHARS + 200


def assert_inert(text: str, markup: bool = True) -> None:
    """No control character, no line past the bound, and (where a line holds the text whole) markup as written."""
    assert not RAW.search(text), repr(RAW.search(text).group())
    assert not markup or "[/red]" in text, "markup shown as written, not interpreted"
    assert max(len(line) for line in text.splitlines()) <= LONGEST_LINE


def invoke(server_uri, db, *args):
    return CliRunner().invoke(cli, [args[0], "--uri", server_uri, "--db", db.name, *args[1:]])


def test_inert_escapes_every_control_character_and_markup_and_cuts_long_values():
    shown = inert(HOSTILE + "\ud800\u202e\u2028" + BIG)
    assert shown.isprintable() and len(shown) < 2000
    assert shown.endswith(f"…(+{len(HOSTILE) + 3 + len(BIG) - 1000} chars)")
    assert "\\x1b]0;pwned\\x07" in shown and "\\ud800" in shown
    assert Text.from_markup(shown).plain.startswith(inert(HOSTILE).replace("\\[", "["))
    assert inert("plain text [1, 2]") == "plain text [1, 2]"


def test_inert_status_logs_and_checkpoints_show_hostile_documents(db, server_uri):
    db[defaults.MODELS].insert_one({
        "_id": HOSTILE, "status": HOSTILE, "run": HOSTILE, "error": {"type": HOSTILE, "message": HOSTILE + BIG},
        "events": [{"at": dt.datetime.now(dt.timezone.utc), "kind": HOSTILE, "detail": HOSTILE + BIG}],
    })
    db[defaults.REQUESTS].insert_one({"model": HOSTILE, "status": HOSTILE})
    status = invoke(server_uri, db, "status")
    assert status.exit_code == 0, status.output
    assert_inert(status.output, markup=False)  # the table wraps the hostile id and status inside their cells
    assert "requests: other=1" in status.output, "a status users made up is counted, never shown"
    shown = invoke(server_uri, db, "logs", HOSTILE)
    assert shown.exit_code == 0, shown.output
    assert_inert(shown.output)
    missing = invoke(server_uri, db, "checkpoints", HOSTILE)
    assert missing.exit_code == 1
    assert_inert(missing.output)


def test_inert_a_refusal_before_submit_is_one_bounded_line(db, server_uri, tmp_path):
    definition = tmp_path / "model.json"
    definition.write_text(json.dumps(model("m", "org/name", trainer={HOSTILE + BIG: 1})))
    refused = invoke(server_uri, db, "submit", str(definition))
    assert refused.exit_code == 1 and len(refused.output.splitlines()) == 1
    assert_inert(refused.output)


def test_inert_the_daemons_log_the_follow_view_and_predict(db, server_uri, start_daemon, tmp_path):
    load_samples(db)
    daemon = start_daemon(args=("--no-validators",))
    registered(db, daemon.process)  # submit refuses while no daemon is alive
    db[defaults.MODELS].insert_one(model("bad", "org/name", trainer={HOSTILE.replace("\0", "") + BIG: 1}))
    definition = tmp_path / "model.json"
    definition.write_text(json.dumps(model(HOSTILE, "/no/such/model[/red]")))
    followed = invoke(server_uri, db, "submit", str(definition))
    assert followed.exit_code == 1 and "failed" in followed.output
    assert_inert(followed.output)
    asked = invoke(server_uri, db, "predict", HOSTILE + "?", "ahoy", "--timeout", "60")
    assert asked.exit_code == 1
    assert_inert(asked.output)
    assert wait_for(db[defaults.MODELS], "bad", finished)["status"] == "failed"
    assert_inert(daemon.log())
    assert len(daemon.log()) < 100_000


def test_inert_json_log_lines_are_bounded(capsys):
    setup_logging(log_format="json")
    try:
        logging.getLogger("listener.test").warning("model %r is invalid: %s", HOSTILE, HOSTILE + BIG)
    finally:
        setup_logging()
    line = capsys.readouterr().err.strip()
    assert len(line) <= LONGEST_LINE and "\n" not in line
    message = json.loads(line)["message"]
    assert message.isprintable() and "[/red]" in message


def test_inert_logs_and_its_follow_bar_show_hostile_progress(db, server_uri):
    """`progress` is the listener's, but a user can $set it: `logs` printed its step as rich markup (a '[/red]'
    failed the command, an escape sequence reached the terminal) and a step that is not a count stopped the
    follow view's bar."""
    db[defaults.MODELS].insert_one({"_id": "p", "status": "failed", "run": 1, "progress": {
        "step": HOSTILE, "total_steps": 5, "loss": HOSTILE, "eta_s": HOSTILE}, "metrics": [{"eval_loss": 1.5, "step": HOSTILE}]})
    shown = invoke(server_uri, db, "logs", "p")
    assert shown.exit_code == 0, shown.output
    assert shown.output == "status failed, run 1, step 0/5, loss -, eval loss 1.5 (step -)\n"
    for step, total in ((HOSTILE, 5), ([1], 5), (float("nan"), 5), (2**63 - 1, 1), (-1, -5)):
        db[defaults.MODELS].update_one({"_id": "p"}, {"$set": {"progress.step": step, "progress.total_steps": total}})
        followed = invoke(server_uri, db, "logs", "p", "--follow")
        assert followed.exit_code == 1 and "status failed, run 1" in followed.output, (step, followed.output)
        assert not RAW.search(followed.output.replace("\r", ""))


def test_inert_retrain_says_what_the_next_run_starts_from_whatever_the_document_holds(db, server_uri):
    """`listener retrain` printed init_from's checkpoint as written (escape sequences reached the terminal), and a
    `run` that is not a count failed the command after the model was already set back to pending."""
    db[defaults.MODELS].insert_many([
        {"_id": "a", "status": "failed", "run": 1, "init_from": {"model": HOSTILE + BIG, "checkpoint": HOSTILE + BIG}},
        {"_id": "b", "status": "failed", "run": HOSTILE, "best_checkpoint": {"run": HOSTILE}, "checkpoints": HOSTILE},
    ])
    shown = invoke(server_uri, db, "retrain", "a")
    assert shown.exit_code == 0, shown.output
    assert_inert(shown.output)
    assert len(shown.output) <= LONGEST_LINE
    shown = invoke(server_uri, db, "retrain", "b")
    assert shown.exit_code == 0, shown.output
    assert "pending again: run 1 starts from the base model" in shown.output


def test_inert_a_logged_exception_is_inert_and_bounded(capsys):
    """The filter made a record's message inert but not its traceback: an exception quoting a document (a
    KeyError naming a field, a value pyarrow could not convert) reached the log raw and whole, in both formats."""
    for log_format in ("text", "json"):
        setup_logging(log_format=log_format)
        try:
            try:
                raise ValueError(HOSTILE + "x" * 2**17)  # rich took minutes for this, hours for a megabyte
            except ValueError:
                logging.getLogger("listener.test").exception("listener error on %s", "m")
        finally:
            setup_logging()
        written = capsys.readouterr()
        shown = written.out + written.err  # rich logs to stdout, JSON lines to stderr
        assert len(shown) < 3 * LONGEST_LINE, (log_format, len(shown))
        if log_format == "json":
            shown = json.loads(shown)["exception"]
        assert "ValueError" in shown and "pwned" in shown
        assert_inert(re.sub("\x1b\\[[0-9;]*m", "", shown))  # rich's own colours only
