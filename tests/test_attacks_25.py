"""Issue 25's feedback loop attacked as a writer of documents (`_models`, `_requests`, their own data) would:
each test is a finding, named by issue 21's class, and fails until the product holds what the README promises.

The findings fixed on branch fx25 moved, each test with its name, to the file of the part it tests
(`test_feedback.py`, `test_preference_gate.py`, `test_shards.py`); those left here are branch fb2's.
"""

import json
import shutil
from pathlib import Path

from tests.conftest import finished, wait_for
from tests.documents import model
from tests.test_feedback import rated
from training import defaults

DAEMON_ENV = {"MONGOTUNE_RETRAIN_CHECK_S": "0.5"}


def assert_waits(db, name: str, document: dict, unusable: list) -> None:
    """`document` (a model with `feedback: {method: kto, every: 2}`) trained, then rated with `unusable` inputs
    only: its feedback run must wait. A second model like it, rated with usable text and counted after it in each
    pass, shows that a pass went by."""
    control = f"{name}_zz"
    for doc_id in (name, control):
        db[defaults.MODELS].insert_one({**document, "_id": doc_id})
    for doc_id in (name, control):
        first = wait_for(db[defaults.MODELS], doc_id, finished, timeout_s=600)
        assert first["status"] == "succeeded", first.get("error")
    for prompt, rating in zip(unusable, [1, -1]):
        rated(db, name, prompt, {"rating": rating})
    for n, rating in enumerate([1, -1]):
        rated(db, control, f"short {n}", {"rating": rating})
    wait_for(db[defaults.MODELS], control, lambda d: d.get("run") == 2 or d.get("status") != "succeeded",
             timeout_s=120)
    after = db[defaults.MODELS].find_one({"_id": name})
    if after["run"] != 1:  # it started: say how it ended
        after = wait_for(db[defaults.MODELS], name, lambda d: d.get("run") == 2 and finished(d), timeout_s=600)
    assert (after["status"], after["run"]) == ("succeeded", 1), after.get("error")


FEEDBACK = {"feedback": {"method": "kto", "every": 2}}


def test_class2_two_ratings_of_prompts_longer_than_max_length_fail_the_model(module_samples, module_daemon,
                                                                         tiny_model_path):
    """A user expects a feedback run to wait, as it waits for too few examples, when every rated answer it reads has
    a prompt that fills `trainer.max_length` (trl drops such rows): two such ratings, within the input caps, start
    the run and fail the model, which then takes no feedback run until its owner sets it back to pending."""
    assert_waits(module_samples, "long", model("long", tiny_model_path, **FEEDBACK),
                 [f"{n} " + "ahoy matey " * 200 for n in range(2)])


def test_class2_two_chat_ratings_fail_a_base_model_without_a_chat_template(module_samples, module_daemon,
                                                                          tiny_model_path):
    """A user expects a feedback run to wait for usable ratings: on a base model (no chat template) the daemon's
    check counts chat ratings as usable, the run then skips them all, and the model ends `failed` naming
    `feedback` after two ratings written as chat, as any driver may write a request's input."""
    base_only = {**model("base_only", templateless_model(tiny_model_path), **FEEDBACK),
                 "data": {"collection": "pirate_text", "key": "text"}}
    assert_waits(module_samples, "base_only", base_only,
                 [[{"role": "user", "content": f"ahoy {n}"}] for n in range(2)])


def templateless_model(tiny_model_path: str) -> str:
    """The tiny model as a base model is: no chat template."""
    folder = Path(tiny_model_path).parent / "templateless_tiny"
    if not folder.exists():
        shutil.copytree(tiny_model_path, folder)
        config = folder / "tokenizer_config.json"
        settings = json.loads(config.read_text())
        settings.pop("chat_template", None)
        config.write_text(json.dumps(settings))
        (folder / "chat_template.jinja").unlink(missing_ok=True)
    return str(folder)


def test_class1_a_feedback_runs_forgetting_guard_measures_only_the_raters_answers(module_samples, module_daemon,
                                                                                tiny_model_path):
    """A user expects the gate's forgetting guard to measure "the SFT eval loss on the model's own held-out documents
    so that a preference run cannot quietly forget what it knew" (issue 25): for a feedback run on an SFT model it
    scores only the held-out ratings' own answers, which the raters wrote and the run just trained toward, never
    the model's held-out documents (20 of `pirate_chat`'s), so raters choose both the lesson and the exam."""
    db = module_samples
    db[defaults.MODELS].insert_one(model("guarded", tiny_model_path, feedback={"method": "kto", "every": 12}))
    first = wait_for(db[defaults.MODELS], "guarded", finished, timeout_s=600)
    assert first["status"] == "succeeded", first.get("error")
    for n in range(12):
        rated(db, "guarded", f"question {n}", {"rating": 1}, output=f"zz qq zz qq {n}")
    done = wait_for(db[defaults.MODELS], "guarded", lambda d: d.get("run") == 2 and finished(d), timeout_s=600)
    assert done["status"] == "succeeded", done.get("error")
    gate = done["runs"][-1]["promotion"]
    own_held_out = db["pirate_chat"].count_documents({"_fold": "valid"})
    assert gate.get("documents", 0) >= own_held_out, gate
