"""Issue 25's feedback loop attacked as a writer of documents (`_models`, `_requests`, their own data) would:
each test is a finding, named by issue 21's class, and fails until the product holds what the README promises.

Most run a daemon's feedback pass in-process (`listener.feedback.FeedbackTrigger`) or the run's read
(`training.feedback`) against the real server: no training is needed to show them.
"""

import json
import shutil
from pathlib import Path


from tests.conftest import finished, wait_for
from tests.documents import model, nested_document
from tests.test_feedback import BASE, rated
from training import defaults
from training.config import parse_model

DAEMON_ENV = {"MONGOTUNE_RETRAIN_CHECK_S": "0.5"}


def test_class1_a_raters_request_id_nested_deep_makes_the_models_document_unreadable(module_samples, module_daemon,
                                                                                     tiny_model_path):
    """A user expects ratings others write to never break their model: a rated request whose `_id` is a document 98
    levels deep (MongoDB stores it: 100 is its limit) is copied into the feedback run's entry as `first`, and the
    model's document then nests deeper than the daemon reads it (`runs`): seen here, its requests then fail
    `model_unavailable` and its next run fails `invalid_document`, field `runs`."""
    db = module_samples
    db[defaults.MODELS].insert_one(model("deep_id", tiny_model_path, feedback={"method": "kto", "every": 3}))
    first = wait_for(db[defaults.MODELS], "deep_id", finished, timeout_s=600)
    assert first["status"] == "succeeded", first.get("error")
    for n, rating in enumerate([1, -1]):
        rated(db, "deep_id", f"honest {n}", {"rating": rating})
    rated(db, "deep_id", "newest", {"rating": 1}, _id=nested_document(98))
    done = wait_for(db[defaults.MODELS], "deep_id", lambda d: d.get("run") == 2 and finished(d), timeout_s=600)
    assert done["status"] == "succeeded", done.get("error")
    parse_model(done)  # what every daemon does with the model document


def test_class4_a_feedback_filter_the_server_refuses_is_never_told_to_its_writer(module_db, module_daemon):
    """A user expects a `feedback.filter` the server refuses to be named to them, as a refused `data.filter` of
    `retrain` is (the model's `warnings`): today the daemon only logs it, and the model waits for ratings forever."""
    db = module_db
    for name, query in (("silent", {"input": {"$regex": "("}}), ("zz_control", {"input": {"$exists": True}})):
        db[defaults.MODELS].insert_one({**BASE, "_id": name, "status": "succeeded", "run": 1,
                                        "feedback": {"method": "kto", "every": 1, "filter": query}})
        rated(db, name, "hello", {"rating": 1})
    # The pass takes models in the order first seen, by id: once the control's rating is stamped, "silent" was tried.
    wait_for(db[defaults.REQUESTS], db[defaults.REQUESTS].find_one({"model": "zz_control"})["_id"],
             lambda d: d.get("feedback_run") == 1, timeout_s=60)
    warnings = db[defaults.MODELS].find_one({"_id": "silent"}).get("warnings") or []
    assert any("feedback.filter" in w for w in warnings), warnings


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


# Chat templates that refuse roles out of turn, as Llama 2's, Mistral's and Gemma's do.
STRICT_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 > 0 and message['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


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


def strict_model(tiny_model_path: str) -> str:
    """The tiny model with a chat template that refuses two turns of one role in a row."""
    folder = Path(tiny_model_path).parent / "strict_tiny"
    if not folder.exists():
        shutil.copytree(tiny_model_path, folder)
        config = folder / "tokenizer_config.json"
        settings = json.loads(config.read_text())
        settings["chat_template"] = STRICT_TEMPLATE
        config.write_text(json.dumps(settings))
        (folder / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    return str(folder)


def test_class2_one_raters_chat_out_of_turn_fails_the_models_feedback_run(module_samples, module_daemon,
                                                                          tiny_model_path):
    """A user expects a rating whose chat the model's template refuses (two user turns in a row) to be skipped and
    counted like any rating of a wrong shape, and the run to train on the others: it fails the whole run."""
    db = module_samples
    db[defaults.MODELS].insert_one(model("strict", strict_model(tiny_model_path),
                                         feedback={"method": "kto", "every": 5}))
    first = wait_for(db[defaults.MODELS], "strict", finished, timeout_s=600)
    assert first["status"] == "succeeded", first.get("error")
    for n, rating in enumerate([1, -1, 1, -1]):
        rated(db, "strict", f"honest {n}", {"rating": rating})
    rated(db, "strict", [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}], {"rating": 1})
    done = wait_for(db[defaults.MODELS], "strict", lambda d: d.get("run") == 2 and finished(d), timeout_s=600)
    assert done["status"] == "succeeded", done.get("error")


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
