"""`submit --replace` against documents someone else wrote: what the model document holds (its listener
fields, its junk, its history) is written by anyone who may write `_models`, and must not make a replace
crash, merge two definitions, or make a run start from or be gated against an adapter of another base."""

import pytest

from listener.definitions import Busy, replace_model
from tests.documents import QUICK, model
from tests.test_definitions import CHECKPOINT, finished_model
from training import defaults, promotion
from training.lineage import MAX_CHANGED
from training.starting import continued, next_start


def claimed(document: dict) -> dict:
    """The document as the daemon's claim leaves it for the training child: the next run, started."""
    return {**document, "status": "running", "run": document["run"] + 1, "started_at": defaults.now()}


def test_a_run_on_a_new_base_is_not_gated_against_the_old_bases_adapter(db, tiny_model_path, model_root):
    """The gate loads the serving adapter onto this run's base: after a change of base it does not fit (a size
    mismatch at the end of a run that trained to its end, or an adapter scored, and kept, on the wrong base)."""
    models = db[defaults.MODELS]
    models.insert_one(finished_model("m", tiny_model_path))
    stored, _ = replace_model(models, model("m", str(model_root / "other")))
    assert promotion.serving_ref(claimed(stored)) is None
    written = {"run": 2, "trigger": "definition", "changed": ["trainer.lora_r"],
               "best_checkpoint": {"run": 1, "step": 2}}
    assert promotion.serving_ref(written) is None


def test_a_retrain_after_a_failed_run_on_a_new_base_does_not_continue_from_the_old_bases_adapter(
        db, tiny_model_path, model_root):
    """`trigger` is cleared when the run on the new base ends; `best_checkpoint` still names the old base's
    adapter, so `listener retrain` (trigger "user") would continue from it."""
    models = db[defaults.MODELS]
    models.insert_one(finished_model("m", tiny_model_path))
    replace_model(models, model("m", str(model_root / "other")))
    models.update_one({"_id": "m"}, {"$set": {"status": "failed", "run": 2}, "$unset": {"trigger": ""}})  # `jobs._end`
    models.update_one({"_id": "m"}, {"$set": {"status": "pending", "trigger": "user"}})  # `listener retrain`
    after = models.find_one({"_id": "m"})
    assert continued({**after, "run": 3}, "best") is None
    assert next_start(after).startswith("run 3 starts from the base model"), next_start(after)


def test_a_definition_that_says_cancel_false_replaces_a_finished_model(db, tiny_model_path):
    """`cancel` is a field of the definition; the replace also unsets it: `$set` and `$unset` of one path conflict."""
    models = db[defaults.MODELS]
    models.insert_one(finished_model("m", tiny_model_path))
    stored, changed = replace_model(models, model("m", tiny_model_path, {**QUICK, "max_steps": 3}, cancel=False))
    assert stored["status"] == "pending" and stored["trainer"]["max_steps"] == 3
    assert "trainer.max_steps" in changed


@pytest.mark.parametrize("status", [{"$ne": None}, ["succeeded"]])
def test_a_status_of_another_type_is_refused_as_busy_not_a_type_error(db, tiny_model_path, status):
    models = db[defaults.MODELS]
    models.insert_one({**finished_model("m", tiny_model_path), "status": status})
    with pytest.raises(Busy):
        replace_model(models, model("m", tiny_model_path, {**QUICK, "max_steps": 3}))


def test_events_someone_overwrote_do_not_block_a_replace(db, tiny_model_path):
    """`transition` replaces an `events` that is not a list (`listener.status`); the replace must too."""
    models = db[defaults.MODELS]
    models.insert_one({**finished_model("m", tiny_model_path), "events": "spoiled"})
    stored, _ = replace_model(models, model("m", tiny_model_path, {**QUICK, "max_steps": 3}))
    assert stored["status"] == "pending" and stored["events"][-1]["kind"] == "definition_changed"


def test_many_fields_another_writer_left_do_not_make_the_replace_too_large(db, tiny_model_path):
    """Each field left on the document is a changed path, written twice (`changed` and the event): a document
    of 7 MB of fields made a 21 MB update, refused, so its owner could not correct it; `changed` is bounded."""
    models = db[defaults.MODELS]
    junk = {f"{i:05d}" + "x" * 995: None for i in range(7_000)}
    models.insert_one({**finished_model("m", tiny_model_path), **junk})
    stored, changed = replace_model(models, model("m", tiny_model_path, {**QUICK, "max_steps": 3}))
    assert stored["status"] == "pending" and not set(junk) & set(stored)
    assert len(stored["changed"]) <= MAX_CHANGED + 1 and len(stored["events"][-1]["changed"]) <= MAX_CHANGED + 1
    assert "trainer.max_steps" in stored["changed"]


def test_a_base_change_is_seen_however_many_fields_sort_before_it(db, tiny_model_path, model_root):
    """The run's entry keeps the first `MAX_CHANGED` paths: a base change after them must still start from the base."""
    models = db[defaults.MODELS]
    junk = {f"a{i:04d}": 1 for i in range(MAX_CHANGED + 5)}
    models.insert_one({**finished_model("m", tiny_model_path), **junk})
    stored, _ = replace_model(models, model("m", str(model_root / "other")))
    assert continued(claimed(stored), "best") is None
    assert next_start(stored).startswith("run 2 starts from the base model"), next_start(stored)


class Stale:
    """The models collection as a replace that read it a moment earlier sees it: its `find_one` is old."""

    def __init__(self, models, seen: dict):
        self.models, self.seen = models, seen

    def find_one(self, *args, **kwargs):
        return self.seen

    def __getattr__(self, name):
        return getattr(self.models, name)


@pytest.mark.parametrize("finished", [False, True], ids=["not-yet-claimed", "finished"])
def test_two_replaces_of_one_model_do_not_merge(db, tiny_model_path, finished):
    """Both read the same document. Not yet claimed: the second's fence (status, run, started_at) still matched
    after the first wrote, so the result held the second definition plus what only the first added, and
    `changed` said neither; the whole document as read is the fence now. Finished: the status the first moved."""
    models = db[defaults.MODELS]
    models.insert_one(finished_model("m", tiny_model_path) if finished else model("m", tiny_model_path))
    seen = models.find_one({"_id": "m"})
    replace_model(models, model("m", tiny_model_path, description="the first"))
    with pytest.raises(Busy, match="changed while this ran"):
        replace_model(Stale(models, seen), model("m", tiny_model_path, {**QUICK, "max_steps": 3}))
    after = models.find_one({"_id": "m"})
    assert after["description"] == "the first" and after["trainer"]["max_steps"] == QUICK["max_steps"]


def test_a_document_nested_as_deep_as_the_server_allows_is_compared(db, tiny_model_path):
    """Held: `changes` recurses only where both sides are objects, and the server nests at most 100 deep."""
    models = db[defaults.MODELS]

    def nested(leaf: dict) -> dict:
        for _ in range(90):
            leaf = {"a": leaf}
        return leaf

    data = {"collection": "pirate_chat", "key": "messages"}
    models.insert_one(finished_model("m", tiny_model_path, data={**data, "filter": nested({"x": 1})}))
    stored, changed = replace_model(models, model("m", tiny_model_path, data={**data, "filter": nested({"x": 2})}))
    assert changed == ["data.filter." + "a." * 90 + "x"] and stored["status"] == "pending"


def test_control_sequences_in_fields_someone_left_are_not_printed_raw(server_uri, db, tmp_path, tiny_model_path):
    """Held: the `replaced(...)` line names every changed path, which include the names of fields anyone wrote."""
    from tests.documents import heartbeat
    from tests.test_cli_lifecycle import definition, on, tiny_yaml

    db[defaults.MODELS].insert_one({**finished_model("m", tiny_model_path), "\x1b]0;owned\x07[red]x[/red]": 1})
    heartbeat(db)
    fixed = definition(tmp_path, tiny_yaml("m", tiny_model_path, "{max_steps: 3, per_device_train_batch_size: 2}"))
    done = on(server_uri, db, "submit", fixed, "--no-follow", "--replace")
    assert done.exit_code == 0, done.output
    assert "\x1b" not in done.output and "\x07" not in done.output
    assert CHECKPOINT == db[defaults.MODELS].find_one({"_id": "m"})["checkpoints"][0]
