"""Bad documents end `failed` with an error naming the field; the daemon keeps serving the rest.

The module's daemon runs without the $jsonSchema validators, as on a server that refuses them, so every
bad document reaches the daemon's own checks (`test_schema.py` covers the refusal at write time).
"""

from tests.conftest import finished, wait_for
from tests.documents import QUICK, model
from training import defaults
from training.limits import Limits

DAEMON_ENV = {"MONGOTUNE_VALIDATORS": "0"}


def test_bad_model_documents_fail_with_the_field_and_a_good_one_still_trains(module_samples, module_daemon,
                                                                             tiny_model_path):
    db = module_samples
    db["empty"].insert_one({"other": 1})
    db["empty"].delete_many({})
    bad = {
        "no-collection": (model("x", tiny_model_path, data={"key": "text"}), "data.collection"),
        "empty-collection": (model("x", tiny_model_path, data={"collection": "empty", "key": "text"}),
                             "data.collection"),
        "missing-key": (model("x", tiny_model_path, data={"collection": "pirate_chat", "key": "text"}), "data.key"),
        "unknown-argument": (model("x", tiny_model_path, trainer={**QUICK, "learnin_rate": 0.1}),
                             "trainer.learnin_rate"),
        "wrong-type": (model("x", tiny_model_path, trainer={**QUICK, "num_train_epochs": "three"}),
                       "trainer.num_train_epochs"),
        "wrong-own-type": (model("x", tiny_model_path, trainer={**QUICK, "lora_r": "8"}), "trainer.lora_r"),
        "unknown-model": (model("x", "/nowhere/such-model"), "model_name_or_path"),
        "unknown-field": (model("x", tiny_model_path, colection="typo"), "colection"),
        "javascript-filter": (model("x", tiny_model_path, data={"collection": "pirate_chat", "key": "messages",
                                                                 "filter": {"$where": "sleep(1000)"}}),
                              "data.filter"),
        # a run that could store nothing to serve, and a field the read would project as an operator
        "never-saves": (model("x", tiny_model_path, trainer={**QUICK, "save_strategy": "no"}), "trainer.save_strategy"),
        "positional-key": (model("x", tiny_model_path, data={"collection": "pirate_chat", "key": "arr.$"}),
                           "data.key"),
    }
    for name, (document, _) in bad.items():
        db[defaults.MODELS].insert_one({**document, "_id": name})
    db[defaults.MODELS].insert_one(model("good", tiny_model_path))

    for name, (_, field) in bad.items():
        document = wait_for(db[defaults.MODELS], name, finished, timeout_s=180)
        assert document["status"] == "failed", name
        assert document["error"]["field"] == field, (name, document["error"])
        assert field in document["error"]["message"]
        assert "Traceback" not in document["error"]["message"]
    good = wait_for(db[defaults.MODELS], "good", finished, timeout_s=180)
    assert good["status"] == "succeeded", good.get("error")


def test_bad_requests_fail_with_a_reason_and_a_good_one_is_answered(module_samples, module_daemon, tiny_model_path):
    db = module_samples
    db[defaults.MODELS].insert_one(model("untrained", tiny_model_path, data={"collection": "none", "key": "text"}))
    db[defaults.MODELS].insert_one(model("ready", tiny_model_path))
    wait_for(db[defaults.MODELS], "untrained", finished, timeout_s=60)
    assert wait_for(db[defaults.MODELS], "ready", finished, timeout_s=180)["status"] == "succeeded"

    requests = db[defaults.REQUESTS]
    bad = {
        "unknown-model": ({"model": "nobody", "input": "hi"}, "no document with _id 'nobody'"),
        "no-checkpoint": ({"model": "untrained", "input": "hi"}, "has no checkpoint yet"),
        "bad-params": ({"model": "ready", "input": "hi", "params": {"max_new_tokens": -1}}, "params.max_new_tokens"),
        "over-cap": ({"model": "ready", "input": "hi", "params": {"max_new_tokens": Limits().max_new_tokens + 1}},
                     "params.max_new_tokens"),
        "no-input": ({"model": "ready"}, "input"),
        "bad-role": ({"model": "ready", "input": [{"role": "wizard", "content": "hi"}]}, "input"),
        "bad-checkpoint": ({"model": "ready", "input": "hi", "checkpoint": {"run": 9, "step": 1}}, "no checkpoint"),
    }
    for name, (document, _) in bad.items():
        requests.insert_one({"_id": name, **document})
    requests.insert_one({"_id": "good", "model": "ready", "input": "ahoy", "params": {"max_new_tokens": 4}})
    for name, (_, expected) in bad.items():
        answer = wait_for(requests, name, finished, timeout_s=60)
        assert answer["status"] == "failed", name
        assert expected in answer["error"]["message"], (name, answer["error"])
    good = wait_for(requests, "good", finished, timeout_s=60)
    assert good["status"] == "done" and isinstance(good["output"], str)
