"""What the CLI prints from documents anyone may write is inert and small (issue 21, class 5): every line is
bounded whatever a document holds, and no control character reaches the terminal."""

import datetime as dt
import threading

import bson
from bson import Code
from bson.raw_bson import RawBSONDocument
from click.testing import CliRunner

from listener.cli.main import cli
from listener.cli.status import SHOWN
from listener.records import only
from tests.documents import heartbeat, insert_nested, nested, nested_document
from training import defaults
from training.inert import MAX_LINE_CHARS


def test_class5_an_event_line_of_listener_logs_is_bounded(db, server_uri):
    """`event_line` cuts each key and value at 1,000 characters but joins every key of the event: anyone who may
    update a model document writes one event with as many keys as 16 MB holds, and `listener logs -n 1` prints
    megabytes for it (here 60 keys: 54 kB for one event, where a line is bounded at 4,000 characters)."""
    event = {"kind": "claimed", "at": dt.datetime(2026, 1, 1), **{f"k{n:04}": "v" * 900 for n in range(60)}}
    db[defaults.MODELS].insert_one({"_id": "noisy", "model_name_or_path": "org/m", "data": {"collection": "c"},
                                    "status": "succeeded", "events": [event]})
    shown = CliRunner().invoke(cli, ["logs", "noisy", "--uri", server_uri, "--db", db.name, "-n", "1"])
    assert shown.exit_code == 0, shown.output
    printed = len(shown.output.replace("\n", ""))  # rich wraps a long line at the console's width
    assert printed <= 2 * MAX_LINE_CHARS, f"one event and the summary took {printed:,} characters"


def test_class5_predict_prints_no_raw_control_characters_from_the_answer(db, server_uri):
    """`listener predict` prints `usage.completion_tokens` as the request document holds it, unescaped, when
    `finish_reason` is `"length"`: anyone who may update `_requests` (every user may) writes that answer, and
    the asker's terminal gets the escape sequence (here: retitle the terminal, clear the screen)."""
    heartbeat(db)
    db[defaults.MODELS].insert_one({"_id": "m", "model_name_or_path": "org/m", "data": {"collection": "c"}})
    hostile = "\x1b]0;owned\x07\x1b[2J"
    stop = threading.Event()

    def answer_as_someone_else():
        while not stop.is_set():
            found = db[defaults.REQUESTS].find_one({"model": "m", "status": {"$ne": "done"}})
            if found:
                db[defaults.REQUESTS].update_one({"_id": found["_id"]}, {"$set": {
                    "status": "done", "output": "arr", "finish_reason": "length", "latency_ms": 1,
                    "checkpoint_used": "base", "usage": {"prompt_tokens": 1, "completion_tokens": hostile}}})
                return
            stop.wait(0.05)

    writer = threading.Thread(target=answer_as_someone_else, daemon=True)
    writer.start()
    try:
        shown = CliRunner().invoke(cli, ["predict", "m", "ahoy", "--uri", server_uri, "--db", db.name,
                                         "--timeout", "60"])
    finally:
        stop.set()
        writer.join(5)
    printed = shown.output  # stdout and stderr, as a terminal shows them
    assert "cut at the token limit" in printed, printed
    assert "\x1b" not in printed and "\x07" not in printed, repr(printed)


def test_class5_listener_status_prints_a_bounded_requests_line(db, server_uri):
    """`listener status` joins one `status=count` per distinct `status` of `_requests` into one line: each value is
    cut at 1,000 characters, the line never. Any user may write any status on their own requests; 300 of them
    give a line of 60 kB (as many as 16 MB documents hold give megabytes)."""
    db[defaults.REQUESTS].insert_many([{"_id": n, "model": "m", "input": "hi", "status": f"s{n:03}" + "x" * 200}
                                       for n in range(300)])
    shown = CliRunner().invoke(cli, ["status", "--uri", server_uri, "--db", db.name])
    assert shown.exit_code == 0, shown.output
    requests_line = shown.output[shown.output.index("requests:"):].replace("\n", "")  # rich wraps it at the width
    assert len(requests_line) <= MAX_LINE_CHARS, f"one line of {len(requests_line):,} characters"


def test_class5_listener_status_counts_statuses_of_any_bson_type_as_other(db, server_uri):
    """A status of a str subclass the driver cannot hash (bson `Code`, with and without scope) made `listener status`
    exit 1 with a TypeError; it is a status users made up, counted as `other`."""
    db[defaults.REQUESTS].insert_many([{"_id": 1, "model": "m", "input": "hi", "status": Code("done")},
                                       {"_id": 2, "model": "m", "input": "hi", "status": Code("x", {"a": 1})},
                                       {"_id": 3, "model": "m", "input": "hi", "status": "done"}])
    shown = CliRunner().invoke(cli, ["status", "--uri", server_uri, "--db", db.name])
    assert shown.exit_code == 0, (repr(shown.exception), shown.output[-300:])
    assert {"done=1", "other=2"} <= set(shown.output[shown.output.index("requests: ") + 10:].strip().split(", "))


def test_class5_listener_status_counts_a_status_nested_deeper_than_the_server_groups_as_other(db, server_uri):
    """A request whose `status` nests ~975 levels deep (objects or arrays, as the embedded server stores them) made
    the server fail the `$group` of every status (`InternalError`), and `listener status` exited 1 for everyone.
    Each is a status users made up, counted as `other`; a request without a status is pending."""
    for doc_id, status in ((1, nested_document(975)), (2, nested(975))):
        insert_nested(db[defaults.REQUESTS], {"_id": doc_id, "model": "m", "input": "hi", "status": status})
    db[defaults.REQUESTS].insert_many([{"_id": 3, "model": "m", "input": "hi", "status": "done"},
                                       {"_id": 4, "model": "m", "input": "hi"}])
    shown = CliRunner().invoke(cli, ["status", "--uri", server_uri, "--db", db.name])
    assert shown.exit_code == 0, (repr(shown.exception)[:200], shown.output[-300:])
    counts = set(shown.output[shown.output.index("requests: ") + 10:].strip().split(", "))
    assert counts == {"done=1", "other=2", "pending=1"}, shown.output[-300:]


def test_class5_listener_status_survives_one_model_nested_deeper_than_the_driver_decodes(db, server_uri):
    """Re-attack 21, finding 10. `listener status` reads every model's `progress`: one model whose `progress` nests
    ~975 deep (the embedded server stores it) made the whole command fail for everyone: the server's own
    projection of it fails (`InternalError`, code 1; read without a projection the driver fails instead,
    InvalidBSON), and the command exited 1 after the daemons table. It shows the others, and that one as
    unreadable, on one line."""
    db[defaults.MODELS].insert_one({"_id": "fine", "status": "succeeded"})
    insert_nested(db[defaults.MODELS], {"_id": "deep", "status": "running", "progress": {"step": nested(975)}})
    db[defaults.MODELS].insert_one({"_id": "after", "status": "pending"})
    shown = CliRunner().invoke(cli, ["status", "--uri", server_uri, "--db", db.name])
    assert shown.exit_code == 0 and "fine" in shown.output, (shown.exit_code, repr(shown.exception)[:200],
                                                            shown.output[-300:])
    rows = {line.split("│")[1].strip(): line for line in shown.output.splitlines() if line.count("│") > 2}
    assert {"fine", "deep", "after"} <= set(rows), shown.output
    assert "unreadable" in rows["deep"], rows["deep"]


def test_class5_a_model_projected_here_whose_top_level_cannot_be_read_gives_none_not_an_exception():
    """`records.only` projects a model the server could not project; bytes it cannot read even at the top level
    (an unknown BSON type) raised InvalidBSON out of `listener status`, where `raw_id` gives None for them."""
    bad = bytearray(bson.encode({"_id": 1, "status": "running"}))
    bad[4] = 0x7F  # the `_id` element's type
    assert only(RawBSONDocument(bytes(bad)), SHOWN) is None
    kept = only(RawBSONDocument(bson.encode({"_id": 1, "status": "running", "other": 2})), SHOWN)
    assert bson.decode(kept.raw) == {"_id": 1, "status": "running"}


def test_class5_listener_status_survives_ids_nested_deeper_than_the_server_projects(db, server_uri):
    """The class of finding 10 on `_id` itself: models and requests whose `_id` nests 150 and ~975 levels deep.
    The server fails to project the deepest (`InternalError`) and `listener status` exited 1; it shows every model,
    a deep id named as such, on one line each."""
    db[defaults.MODELS].insert_one({"_id": "fine", "status": "succeeded"})
    for levels in (150, 975):
        deep = nested_document(levels)
        insert_nested(db[defaults.MODELS], {"_id": deep, "status": "running"})
        insert_nested(db[defaults.REQUESTS], {"_id": deep, "status": "pending", "model": "fine", "input": "x"})
    shown = CliRunner().invoke(cli, ["status", "--uri", server_uri, "--db", db.name])
    assert shown.exit_code == 0, (repr(shown.exception)[:200], shown.output[-300:])
    rows = [line for line in shown.output.splitlines() if line.count("│") > 2]
    assert any("fine" in row for row in rows) and sum("(id too deep)" in row for row in rows) == 2, shown.output
    assert all(len(row) <= MAX_LINE_CHARS for row in rows)
    assert "requests: pending=2" in shown.output
