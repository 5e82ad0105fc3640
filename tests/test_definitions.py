"""Correcting a submitted model: `submit --replace` and `Client.submit(replace=True)` make a changed
definition the model's next run, its runs and checkpoints kept and the change recorded."""

import pytest

from listener.definitions import Busy, changes, replace_model
from mongotune import Client
from tests.conftest import finished, wait_for
from tests.documents import QUICK, heartbeat, model
from tests.test_cli_lifecycle import assert_one_line, definition, on, tiny_yaml
from training import defaults
from training.config import SpecError
from training.starting import next_start

CHECKPOINT = {"run": 1, "step": 2, "files_id": "f", "metrics": {"eval_loss": 1.0}}


def finished_model(doc_id, path: str, **user) -> dict:
    """A model whose first run succeeded, as the daemon leaves it."""
    return {**model(doc_id, path, **user), "status": "succeeded", "run": 1, "started_at": defaults.now(),
            "finished_at": defaults.now(), "runs": [{"number": 1, "trigger": "insert"}],
            "checkpoints": [CHECKPOINT], "best_checkpoint": {"run": 1, "step": 2}}


def test_changes_name_each_differing_field_by_its_dotted_path():
    old = {"trainer": {"learning_rate": 1e-4, "max_steps": 5}, "data": {"collection": "a"}, "gone": 1}
    new = {"trainer": {"learning_rate": 1e-3, "max_steps": 5}, "data": {"collection": "a", "key": "k"}}
    assert changes(old, new) == ["data.key", "gone", "trainer.learning_rate"]


def test_a_finished_models_replaced_definition_is_its_next_run_with_its_history_kept(db, tiny_model_path):
    models = db[defaults.MODELS]
    models.insert_one(finished_model("m", tiny_model_path, notes="old"))
    new = model("m", tiny_model_path, {**QUICK, "learning_rate": 1e-3})
    stored, changed = replace_model(models, new)
    assert changed == ["notes", "trainer.learning_rate"]
    assert stored["status"] == "pending" and stored["trigger"] == "definition" and stored["changed"] == changed
    assert "notes" not in stored and stored["trainer"]["learning_rate"] == 1e-3
    assert stored["runs"] and stored["checkpoints"] == [CHECKPOINT] and stored["run"] == 1
    assert stored["events"][-1]["kind"] == "definition_changed" and stored["events"][-1]["changed"] == changed
    assert next_start(stored) == "run 2 starts from run 1's best checkpoint (step 2)"


def test_a_new_base_model_starts_from_the_base_and_says_why(db, tiny_model_path, model_root):
    models = db[defaults.MODELS]
    models.insert_one(finished_model("m", tiny_model_path))
    stored, changed = replace_model(models, model("m", str(model_root / "other")))
    assert changed == ["model_name_or_path"]
    assert next_start(stored) == "run 2 starts from the base model (the definition changed its base or LoRA shape)"


def test_a_model_under_way_is_not_changed_under_its_run(db, tiny_model_path):
    models = db[defaults.MODELS]
    models.insert_many([{**model("training", tiny_model_path), "status": "running", "run": 1},
                        {**model("resuming", tiny_model_path), "status": "pending", "run": 1,
                         "started_at": defaults.now()}])
    for doc_id in ("training", "resuming"):
        with pytest.raises(Busy, match="cancel"):
            replace_model(models, model(doc_id, tiny_model_path, {**QUICK, "max_steps": 3}))
        assert models.find_one({"_id": doc_id})["trainer"]["max_steps"] == QUICK["max_steps"]


def test_a_model_not_yet_claimed_is_changed_in_place(db, tiny_model_path):
    models = db[defaults.MODELS]
    models.insert_one(model("m", tiny_model_path))
    stored, changed = replace_model(models, model("m", tiny_model_path, {**QUICK, "max_steps": 3}))
    assert changed == ["trainer.max_steps"] and stored.get("status") is None and stored["trainer"]["max_steps"] == 3


def test_submit_without_replace_names_it_and_with_it_replaces(server_uri, db, tmp_path, tiny_model_path):
    db[defaults.MODELS].insert_one(finished_model("m", tiny_model_path))
    heartbeat(db)
    fixed = definition(tmp_path, tiny_yaml("m", tiny_model_path, "{max_steps: 3, per_device_train_batch_size: 2}"))
    refused = on(server_uri, db, "submit", fixed, "--no-follow")
    assert_one_line(refused, "already in", "--replace")
    done = on(server_uri, db, "submit", fixed, "--no-follow", "--replace")
    assert done.exit_code == 0, done.output
    first = done.output.splitlines()[0]
    assert first.startswith("replaced the definition of model 'm' (changed: ") and "trainer.max_steps" in first, first
    assert "pending: run 2 starts from run 1's best checkpoint" in done.output
    busy = db[defaults.MODELS].update_one({"_id": "m"}, {"$set": {"status": "running"}})
    assert busy.modified_count == 1
    assert_one_line(on(server_uri, db, "submit", fixed, "--no-follow", "--replace"), "is running", "cancel")


def test_the_python_client_replaces_only_when_asked(server_uri, db, tiny_model_path, limits):
    db[defaults.MODELS].insert_one(finished_model("m", tiny_model_path))
    tune = Client(server_uri, db.name, limits=limits)
    changed = {**model("m", tiny_model_path), "trainer": {**QUICK, "max_steps": 3}}
    with pytest.raises(SpecError, match="replace=True"):
        tune.submit(changed)
    assert tune.submit(changed, replace=True) == "m"
    assert tune.model("m")["changed"] == ["trainer.max_steps"]


def test_a_corrected_definition_trains_as_the_next_run_and_records_what_changed(module_samples, module_daemon,
                                                                               tiny_model_path):
    models = module_samples[defaults.MODELS]
    models.insert_one(model("fixme", tiny_model_path, data={"collection": "pirate_chat", "key": "nope"}))
    failed = wait_for(models, "fixme", finished, timeout_s=120)
    assert failed["status"] == "failed" and failed["error"]["field"] == "data.key"
    replace_model(models, model("fixme", tiny_model_path))
    done = wait_for(models, "fixme", lambda d: finished(d) and d.get("run") == 2, timeout_s=180)
    assert done["status"] == "succeeded", done.get("error")
    assert done["runs"][-1]["trigger"] == "definition" and done["runs"][-1]["changed"] == ["data.key"]


def test_a_changed_list_anyone_wrote_is_read_as_bounded_field_paths():
    """`changed` is on the document, which any writer may set; the run's entry copies it, so only paths, bounded."""
    from training.lineage import MAX_CHANGED, MAX_PATH_CHARS, changed_fields

    written = {"run": 2, "trigger": "definition", "changed": [{"$x": 1}, 7, "p" * 10_000, *["trainer.lora_r"] * 500]}
    fields = changed_fields(written)
    assert len(fields) == MAX_CHANGED and fields[0] == "p" * MAX_PATH_CHARS and set(fields[1:]) == {"trainer.lora_r"}
    assert changed_fields({**written, "trigger": "user"}) == [] == changed_fields({**written, "changed": "x"})
    assert next_start({**written, "run": 1, "best_checkpoint": {"run": 1, "step": 2}, "checkpoints": [CHECKPOINT]}) \
        == "run 2 starts from the base model (the definition changed its base or LoRA shape)"
