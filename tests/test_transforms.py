"""Transforms are named by documents and registered by operators as entry points; never supplied."""

import pytest

from listener.demo import load_samples
from tests.conftest import finished, wait_for
from training import defaults, transforms
from training.config import DataSpec, SpecError, parse_model
from training.dataset import MESSAGES, TEXT, build_datasets, detect_format
from training.limits import Limits

PLUGIN = '''
def shout(document):
    return {"text": document["text"].upper()}

def only_valid_fold(document):
    return {"text": document["text"]} if "matey" in document["text"] else None

def broken_shape(document):
    return ["not", "an", "example"]

def explodes(document):
    raise RuntimeError("no such column")
'''


@pytest.fixture
def operator_plugin(tmp_path, monkeypatch):
    """An installed package registering transforms, as an operator's own would be."""
    (tmp_path / "ops_transforms.py").write_text(PLUGIN)
    info = tmp_path / "ops_transforms-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ops-transforms\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[mongotune.transforms]\n" + "".join(f"{n} = ops_transforms:{n}\n"
                                             for n in ("shout", "only_valid_fold", "broken_shape", "explodes")))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_the_builtin_turns_pairs_into_chat(db):
    load_samples(db)
    train, valid = build_datasets(db, DataSpec(collection="pirate_prompt_response", transform="chat_from_pairs"), Limits())
    assert detect_format(train[0]) == MESSAGES and len(train) + len(valid) == 200
    assert [m["role"] for m in train[0]["messages"]] == ["user", "assistant"]


def test_an_unregistered_name_is_refused_with_what_is_registered():
    with pytest.raises(SpecError) as refused:
        parse_model({"_id": 1, "model_name_or_path": "m", "data": {"collection": "c", "transform": "os.system"}})
    assert refused.value.field == "data.transform" and "chat_from_pairs" in refused.value.message


def test_template_and_transform_together_are_refused():
    with pytest.raises(SpecError) as refused:
        DataSpec(collection="c", transform="chat_from_pairs", template="{prompt}")
    assert refused.value.field == "data.template"


def test_an_operator_plugin_is_found_and_used(db, operator_plugin):
    load_samples(db)
    assert {"shout", "chat_from_pairs"} <= set(transforms.registered())
    train, _ = build_datasets(db, DataSpec(collection="pirate_text", transform="shout"), Limits())
    assert detect_format(train[0]) == TEXT and train[0]["text"] == train[0]["text"].upper()


def test_a_transform_may_leave_documents_out(db, operator_plugin):
    db["notes"].insert_many([{"text": "ahoy matey"}, {"text": "hello"}, {"text": "matey arr"}])
    train, valid = build_datasets(db, DataSpec(collection="notes", transform="only_valid_fold"), Limits())
    assert len(train) + len(valid or []) == 2


@pytest.mark.parametrize(("name", "expected"), [("broken_shape", "returned list"), ("explodes", "RuntimeError")])
def test_a_misbehaving_transform_is_reported_against_the_document(db, operator_plugin, name, expected):
    load_samples(db)
    with pytest.raises(SpecError) as refused:
        build_datasets(db, DataSpec(collection="pirate_text", transform=name), Limits())
    assert refused.value.field == "data.transform" and expected in refused.value.message


def test_the_daemon_trains_with_an_operator_transform(db, start_daemon, tiny_model_path, operator_plugin):
    load_samples(db)
    start_daemon(env={"PYTHONPATH": str(operator_plugin)})
    db[defaults.MODELS].insert_one({"_id": "shouty", "model_name_or_path": tiny_model_path,
                                    "data": {"collection": "pirate_text", "transform": "shout"},
                                    "trainer": {"max_steps": 2, "per_device_train_batch_size": 2}})
    assert wait_for(db[defaults.MODELS], "shouty", finished, timeout_s=120)["status"] == "succeeded"
