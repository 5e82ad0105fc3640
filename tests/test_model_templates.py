"""Model templates (`export-template`, `apply`): a definition with named variables, round-tripped through YAML."""

import pytest
import yaml
from click.testing import CliRunner

from listener.cli.main import cli
from listener.model_templates import definition
from training import defaults

VARS = ("--var", "collection=data.collection", "--var", "model=model_name_or_path", "--var", "steps=trainer.max_steps")


@pytest.fixture
def original(db, model_root) -> dict:
    """A trained model's document: the definition plus everything the listener wrote into it."""
    document = {
        "_id": "pirate", "model_name_or_path": str(model_root / "base"),
        "data": {"collection": "pirate_chat", "key": ["prompt", "response"], "filter": {"score": {"$gte": 2}},
                 "template": "{prompt} costs $5{response}"},
        "trainer": {"max_steps": 4, "learning_rate": 1e-3, "lora_r": 8},
        "description": "answers like a pirate", "cancel": False,
        "status": "succeeded", "run": 2, "attempts": 1, "lease": None, "progress": {"step": 4},
        "metrics": [{"run": 1, "step": 1, "loss": 2.0}], "checkpoints": [], "events": [{"type": "claimed"}],
        "error": None, "warnings": [],
    }
    db[defaults.MODELS].insert_one(document)
    return document


@pytest.fixture
def cli_env(model_root, monkeypatch):
    monkeypatch.setenv("MONGOTUNE_MODEL_ROOTS", str(model_root))


def invoke(server_uri, db, *args):
    return CliRunner().invoke(cli, [args[0], "--uri", server_uri, "--db", db.name, *args[1:]])


def test_export_then_apply_gives_the_definition_with_the_new_values(server_uri, db, tmp_path, original,
                                                                    model_root, cli_env):
    folder = tmp_path / "pirate-template"
    exported = invoke(server_uri, db, "export-template", "pirate", str(folder), *VARS)
    assert exported.exit_code == 0, exported.output
    template = yaml.safe_load((folder / "template.yaml").read_text())
    assert set(template) == {"model_name_or_path", "data", "trainer", "description"}
    assert template["data"]["collection"] == "${collection}" and template["trainer"]["max_steps"] == "${steps}"
    assert template["data"]["template"] == "{prompt} costs $$5{response}"
    assert yaml.safe_load((folder / "variables.yaml").read_text())["steps"] == {"default": 4,
                                                                                 "path": "trainer.max_steps"}

    same = invoke(server_uri, db, "apply", str(folder), "--id", "same")
    assert same.exit_code == 0, same.output
    assert db[defaults.MODELS].find_one({"_id": "same"}) == {**definition(original), "_id": "same"}
    taken = invoke(server_uri, db, "apply", str(folder), "--id", "same")
    assert taken.exit_code == 1 and taken.output.startswith(
        "Error: refused before anything was written: _id: a model with _id 'same' is already in"), taken.output

    other = str(model_root / "other")
    applied = invoke(server_uri, db, "apply", str(folder), "--set", "collection=sea_shanties",
                     "--set", f"model={other}", "--set", "steps=3", "--id", "shanty")
    assert applied.exit_code == 0, applied.output
    expected = definition(original)
    expected.update(_id="shanty", model_name_or_path=other,
                    data={**original["data"], "collection": "sea_shanties"},
                    trainer={**original["trainer"], "max_steps": 3})
    assert db[defaults.MODELS].find_one({"_id": "shanty"}) == expected


def test_a_variable_without_value_or_an_unknown_one_is_one_line(server_uri, db, tmp_path, original, cli_env):
    folder = tmp_path / "t"
    assert invoke(server_uri, db, "export-template", "pirate", str(folder)).exit_code == 0
    variables = yaml.safe_load((folder / "variables.yaml").read_text())
    assert set(variables) == {"collection", "model"}
    del variables["collection"]["default"]
    (folder / "variables.yaml").write_text(yaml.safe_dump(variables))
    cases = [
        ((), "variable 'collection' has no value: pass --set collection=VALUE"),
        (("--set", "colection=x"), "--set colection: this template has no such variable; it has collection, model"),
        (("--set", "collection=_listener"), "the filled-in template is not a valid model: data.collection"),
    ]
    for args, message in cases:
        result = invoke(server_uri, db, "apply", str(folder), *args)
        assert result.exit_code == 1 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert db[defaults.MODELS].count_documents({}) == 1

    missing_field = invoke(server_uri, db, "export-template", "pirate", str(tmp_path / "u"), "--var", "x=trainer.seed")
    assert missing_field.exit_code == 1 and "the definition has no field 'trainer.seed'" in missing_field.output
