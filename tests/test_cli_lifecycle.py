"""The job lifecycle from the CLI, and every way a user can make a command fail: one line, never a traceback."""

from pathlib import Path

import pytest
from click.testing import CliRunner
from gridfs import GridFSBucket
from pymongo.errors import ServerSelectionTimeoutError

from listener.cli.main import cli
from listener.connection import timeouts
from listener.demo import load_samples
from listener.processes import registered
from listener.schema import validators
from tests.conftest import finished, wait_for
from tests import documents
from tests.documents import heartbeat
from training import checkpoints, defaults, tiny_model
from training.limits import Limits

UNREACHABLE = "mongodb://nobody:secret@127.0.0.1:9/mydb?serverSelectionTimeoutMS=300&connectTimeoutMS=300"
ENV_FREE = {defaults.ENV_URI: None, "MONGOTUNE_MAX_JOBS": None}


def run(*args, env: dict | None = None, input: str | None = None):
    return CliRunner().invoke(cli, list(args), env={**ENV_FREE, **(env or {})}, input=input)


def on(server_uri, db, command: str, *args, **kwargs):
    return run(command, "--uri", server_uri, "--db", db.name, *args, **kwargs)


def assert_one_line(result, *wanted: str) -> str:
    """A failure a user caused: exit non-zero, one line that says what to do, no traceback."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code != 0, result.output
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for text in wanted:
        assert text in lines[0], lines[0]
    return lines[0]


def definition(tmp_path: Path, text: str, name: str = "model.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def tiny_yaml(model_id: str, path: str, trainer: str = "{max_steps: 2, per_device_train_batch_size: 2}") -> str:
    return (f"_id: {model_id}\nmodel_name_or_path: {path}\ndata: {{collection: pirate_chat, key: messages}}\n"
            f"trainer: {trainer}\n")


COMMANDS = [("status",), ("submit", "{definition}"), ("predict", "m", "hi"), ("logs", "m"), ("cancel", "m"),
            ("retrain", "m"), ("delete", "m", "--yes")]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_an_unreachable_server_is_one_line_within_the_uris_own_timeout(command, tmp_path, tiny_model_path):
    args = [a.replace("{definition}", definition(tmp_path, tiny_yaml("m", tiny_model_path))) for a in command]
    line = assert_one_line(run(*args, "--uri", UNREACHABLE), "cannot reach MongoDB at", "Connection refused")
    assert "nobody:***@127.0.0.1:9/mydb?serverSelectionTimeoutMS=300&connectTimeoutMS=300" in line
    assert "secret" not in line and "Topology" not in line


def test_verbose_shows_the_traceback_instead():
    result = run("--verbose", "status", "--uri", UNREACHABLE)
    assert result.exit_code != 0 and isinstance(result.exception, ServerSelectionTimeoutError)


@pytest.mark.parametrize("uri, shown", [
    ("mongodb//127.0.0.1:27017/mydb", "cannot use the URI mongodb//127.0.0.1:27017/mydb: Invalid URI scheme"),
    ("mongodb://u:pw@127.0.0.1:99999/mydb", "cannot use the URI mongodb://u:***@127.0.0.1:99999/mydb: Port"),
])
def test_a_mistyped_uri_is_shown_as_typed_less_its_password(uri, shown):
    assert_one_line(run("status", "--uri", uri), shown)


def test_a_bad_setting_in_the_environment_is_one_line_and_help_still_works(server_uri, db):
    bad = {"MONGOTUNE_HEARTBEAT_S": "often"}
    assert run("--help", env=bad).exit_code == 0
    for command in cli.commands:
        assert run(command, "--help", env=bad).exit_code == 0, command
    for command in ("status", "logs", "predict"):
        args = {"logs": ("m",), "predict": ("m", "hi")}.get(command, ())
        assert_one_line(on(server_uri, db, command, *args, env=bad), "MONGOTUNE_HEARTBEAT_S")


def test_submit_checks_with_the_daemons_parser_then_for_a_daemon_then_the_id(server_uri, db, tmp_path,
                                                                             tiny_model_path):
    """Each mistake is one line, exit 1, and nothing inserted; the README's list of them."""
    misspelt = definition(tmp_path, tiny_yaml("m", tiny_model_path, "{max_step: 2}"))
    assert_one_line(on(server_uri, db, "submit", misspelt), "trainer.max_step", "did you mean 'max_steps'")
    good = definition(tmp_path, tiny_yaml("m", tiny_model_path))
    for follow in ("--no-follow", "--follow"):  # --follow first would wait without end where submit inserts
        refused = on(server_uri, db, "submit", good, follow)
        assert refused.exit_code == 1
        assert assert_one_line(refused) == (
            f"Error: no daemon is alive on database {db.name!r} (no recent heartbeat in _listener): start one "
            f"with `listener start --db {db.name}`, then submit again; nothing was inserted")
    assert db[defaults.MODELS].count_documents({}) == 0

    heartbeat(db)
    submitted = on(server_uri, db, "submit", good, "--no-follow")
    assert submitted.exit_code == 0 and "no daemon" not in submitted.output, submitted.output
    stored = db[defaults.MODELS].find_one({"_id": "m"})
    assert stored["trainer"] == {"max_steps": 2, "per_device_train_batch_size": 2}

    again = on(server_uri, db, "submit", good, "--no-follow")
    assert again.exit_code == 1
    assert assert_one_line(again) == (
        f"Error: refused before anything was written: _id: a model with _id 'm' is already in {db.name}._models: "
        "submit it with --replace (replace=True in Python) to make this definition its next run, choose another _id, "
        "or remove it first (`listener delete m`)")


def test_a_document_the_servers_validator_refuses_is_one_line(server_uri, db, tmp_path, tiny_model_path, client):
    """The daemon's operator capped max_steps lower than this host's default: the server refuses."""
    for name, schema in validators(Limits(max_steps=10)).items():
        db.create_collection(name, validator=schema)
    heartbeat(db)
    too_long = definition(tmp_path, tiny_yaml("m", tiny_model_path, "{max_steps: 50}"))
    assert_one_line(on(server_uri, db, "submit", too_long, "--no-follow"),
                    "$jsonSchema validator refused the document at trainer.max_steps", "got 50")


def test_predict_refuses_a_bad_checkpoint_and_a_database_no_daemon_serves(server_uri, db):
    assert_one_line(on(server_uri, db, "predict", "m", "hi", "--checkpoint", "bestt"), "checkpoint", "'best'")
    assert_one_line(on(server_uri, db, "predict", "m", "hi"), "no daemon is alive", "listener start")
    assert db[defaults.REQUESTS].count_documents({}) == 0


def test_unknown_models_and_bad_ids_are_one_line(server_uri, db):
    for command in ("logs", "cancel", "retrain", "delete"):
        assert_one_line(on(server_uri, db, command, "ghost"), "no model with _id 'ghost'")
    assert_one_line(on(server_uri, db, "logs", '{"$oid": "12"}'), "is not a model id")


def test_cancel_retrain_and_delete_act_on_the_document(server_uri, db, client):
    models = db[defaults.MODELS]
    models.insert_many([{"_id": "waiting"}, {"_id": "busy", "status": "running", "run": 1},
                        {"_id": "done", "status": "succeeded", "run": 2, "cancel": True}])

    assert on(server_uri, db, "cancel", "waiting").exit_code == 0
    assert models.find_one({"_id": "waiting"})["cancel"] is True
    assert_one_line(on(server_uri, db, "cancel", "done"), "already succeeded")

    assert_one_line(on(server_uri, db, "retrain", "busy"), "is training now", "listener cancel busy")
    assert_one_line(on(server_uri, db, "retrain", "waiting"), "already waits")
    retrained = on(server_uri, db, "retrain", "done")
    assert retrained.output == "model 'done' is pending again: run 3 starts from the base model, when a daemon " \
                               "claims it\n", retrained.output
    requeued = models.find_one({"_id": "done"})
    assert requeued["status"] == "pending" and requeued["trigger"] == "user" and "cancel" not in requeued
    assert [(e["kind"], e["trigger"]) for e in requeued["events"]] == [("retrain_requested", "user")]

    served = {"status": "succeeded", "run": 2, "best_checkpoint": {"run": 2, "step": 20},
              "checkpoints": [{"run": 1, "step": 10}, {"run": 2, "step": 20}, {"run": 2, "step": 30}]}
    models.insert_many([{"_id": "served", **served}, {"_id": "anew", **served, "retrain": {"from": "base"}}])
    for model_id, start in (("served", "run 2's best checkpoint (step 20)"),
                            ("anew", "the base model (retrain.from is base)")):
        retrained = on(server_uri, db, "retrain", model_id)
        assert f"is pending again: run 3 starts from {start}, when" in retrained.output, retrained.output

    assert_one_line(on(server_uri, db, "delete", "busy", "--yes"), "is training now", "--force")
    assert run("delete", "--uri", server_uri, "--db", db.name, "done", input="n\n").exit_code == 1
    assert models.find_one({"_id": "done"}) is not None, "not confirmed: nothing deleted"


def test_delete_removes_the_models_checkpoints_and_no_other(server_uri, db, tmp_path):
    folder = tiny_model.build(tmp_path / "weights")
    for model_id, run_number in (("doomed", 1), ("doomed", 2), ("kept", 1)):
        checkpoints.upload(db, folder, model_id=model_id, run=run_number, step=1)
    db[defaults.MODELS].insert_many([{"_id": "doomed", "status": "failed"}, {"_id": "kept", "status": "failed"}])
    deleted = on(server_uri, db, "delete", "doomed", input="y\n")
    assert deleted.exit_code == 0 and "2 checkpoint file(s)" in deleted.output, deleted.output
    left = [f.metadata["model"] for f in GridFSBucket(db, defaults.CHECKPOINTS).find()]
    assert left == ["kept"] and db[defaults.MODELS].distinct("_id") == ["kept"]


def test_logs_follows_a_real_training_to_its_end_with_its_events(server_uri, db, start_daemon, tiny_model_path,
                                                                 tmp_path):
    load_samples(db)
    registered(db, start_daemon().process)
    model = definition(tmp_path, tiny_yaml("followed", tiny_model_path,
                                           "{max_steps: 4, per_device_train_batch_size: 2, save_steps: 2, "
                                           "logging_steps: 1, max_seq_length: 64}"))
    assert on(server_uri, db, "submit", model, "--no-follow").exit_code == 0
    followed = on(server_uri, db, "logs", "followed", "--follow")
    assert followed.exit_code == 0, followed.output
    for text in ("claimed", "checkpoint_stored", "succeeded", "status succeeded, run 1, step 4/4"):
        assert text in followed.output, followed.output

    shown = on(server_uri, db, "logs", "followed", "-n", "2")
    assert shown.exit_code == 0 and shown.output.splitlines()[-2].split()[2] == "succeeded", shown.output

    assert_one_line(on(server_uri, db, "cancel", "followed"), "already succeeded")
    deleted = on(server_uri, db, "delete", "followed", "--yes")
    assert deleted.exit_code == 0 and "2 checkpoint file(s)" in deleted.output, deleted.output
    assert GridFSBucket(db, defaults.CHECKPOINTS).find().to_list() == []


def test_a_model_cancelled_before_it_starts_can_be_retrained(server_uri, db, start_daemon, tiny_model_path,
                                                               tmp_path):
    load_samples(db)
    models = db[defaults.MODELS]
    models.insert_one(documents.model("stopped", tiny_model_path))  # from any driver, before a daemon runs
    assert on(server_uri, db, "cancel", "stopped").exit_code == 0
    start_daemon()
    assert wait_for(models, "stopped", finished)["status"] == "cancelled"
    assert on(server_uri, db, "retrain", "stopped").exit_code == 0
    done = wait_for(models, "stopped", lambda d: d.get("status") == "succeeded")
    kinds = [e["kind"] for e in done["events"]]
    assert kinds[:4] == ["cancelled", "retrain_requested", "claimed", "checkpoint_stored"], kinds
    assert kinds[-1] == "succeeded", kinds
    assert done["run"] == 1 and done["events"][2]["owner"].startswith("d0:") and done["events"][2]["run"] == 1


def test_a_uris_own_server_selection_timeout_wins():
    assert timeouts("mongodb://h/db?replicaSet=rs0&serverSelectionTimeoutMS=300", 5) == {}
    assert timeouts("mongodb://h/db?replicaSet=rs0", 5) == {"serverSelectionTimeoutMS": 5000}
