"""The CLI through click's runner, against a real daemon: thin commands over the same documents."""

import json

from click.testing import CliRunner

from listener.cli.main import cli
from listener.demo import load_samples
from listener.processes import registered


def invoke(server_uri, db, *args):
    return CliRunner().invoke(cli, [args[0], "--uri", server_uri, "--db", db.name, *args[1:]])


def test_submit_follows_training_and_predict_prints_the_answer(db, server_uri, start_daemon, tiny_model_path,
                                                              tmp_path):
    load_samples(db)
    registered(db, start_daemon().process)  # submit and predict refuse to go on while no daemon is alive
    definition = tmp_path / "model.json"
    definition.write_text(json.dumps({
        "_id": "cli", "model_name_or_path": tiny_model_path, "data": {"collection": "pirate_chat", "key": "messages"},
        "trainer": {"max_steps": 2, "per_device_train_batch_size": 2, "max_seq_length": 64},
    }))
    submitted = invoke(server_uri, db, "submit", str(definition))
    assert submitted.exit_code == 0, submitted.output
    assert "succeeded" in submitted.output

    answered = invoke(server_uri, db, "predict", "cli", "ahoy", "--max-new-tokens", "3", "--checkpoint", "1:2")
    assert answered.exit_code == 0, answered.output
    assert '"checkpoint": {"run": 1, "step": 2}' in answered.output

    unknown = invoke(server_uri, db, "predict", "nobody", "ahoy", "--timeout", "60")
    assert unknown.exit_code == 1 and "no model with _id 'nobody'" in unknown.output


def test_bad_arguments_are_refused_before_anything_is_written(db, server_uri, tmp_path):
    not_json = tmp_path / "model.json"
    not_json.write_text("{model_name_or_path: oops")
    refused = invoke(server_uri, db, "submit", str(not_json))
    assert refused.exit_code == 2 and "not JSON" in refused.output
    refused = invoke(server_uri, db, "predict", "m", "hi", "--checkpoint", "one:two")
    assert refused.exit_code == 2 and "RUN:STEP" in refused.output
    assert db.list_collection_names() == []
