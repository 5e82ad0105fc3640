"""`training.dataset`: documents in the real database become trl datasets in each shape."""

import pytest
from pymongo.errors import OperationFailure

from training.child import failure
from training.config import DataSpec, SpecError
from training.limits import Limits
from training.dataset import MESSAGES, PROMPT_COMPLETION, TEXT, build_datasets, detect_format


def data(**kwargs) -> DataSpec:
    return DataSpec.model_validate({"collection": "docs", **kwargs})


def refused(db, spec: DataSpec) -> SpecError:
    with pytest.raises(SpecError) as info:
        build_datasets(db, spec, Limits())
    return info.value


def chat(i: int) -> list[dict]:
    return [{"role": "system", "content": "be a pirate"}, {"role": "user", "content": f"q{i}"},
            {"role": "assistant", "content": f"arr {i}"}]


# --- detect_format -------------------------------------------------------------------------------

def test_detect_format_every_shape():
    assert detect_format({"text": "hello"}) == TEXT
    assert detect_format({"prompt": "p", "completion": "c"}) == PROMPT_COMPLETION
    assert detect_format({"messages": [{"role": "user", "content": "hi"}]}) == MESSAGES


def test_detect_format_prefers_messages_and_needs_both_prompt_parts():
    assert detect_format({"messages": [], "text": "x"}) == MESSAGES
    assert detect_format({"prompt": "p"}) == TEXT


# --- build_datasets over each shape --------------------------------------------------------------

def test_text_shape_with_folds(db):
    db.docs.insert_many([{"text": f"t{i}", "_fold": "valid" if i % 4 == 0 else "train", "other": i}
                         for i in range(8)])
    train, valid = build_datasets(db, data(), Limits())
    assert train.column_names == ["text"]
    assert sorted(train["text"]) == sorted(f"t{i}" for i in range(8) if i % 4)
    assert sorted(valid["text"]) == ["t0", "t4"]
    assert detect_format(train[0]) == TEXT


def test_documents_without_fold_go_to_train_when_others_have_one(db):
    db.docs.insert_many([{"text": "a", "_fold": "valid"}, {"text": "b"}, {"text": "c", "_fold": "other"}])
    train, valid = build_datasets(db, data(), Limits())
    assert sorted(train["text"]) == ["b", "c"]
    assert valid["text"] == ["a"]


def test_custom_fold_field(db):
    db.docs.insert_many([{"text": "a", "split": "valid"}, {"text": "b", "split": "train"},
                         {"text": "c", "_fold": "valid"}])
    train, valid = build_datasets(db, data(fold_field="split"), Limits())
    assert sorted(train["text"]) == ["b", "c"]
    assert valid["text"] == ["a"]


def test_prompt_response_shape(db):
    db.qa.insert_many([{"q": f"question {i}", "a": i, "_fold": "train"} for i in range(3)]
                      + [{"q": "held out", "a": "x", "_fold": "valid"}])
    train, valid = build_datasets(db, data(collection="qa", key=["q", "a"]), Limits())
    assert set(train.column_names) == {"prompt", "completion"}
    assert sorted(zip(train["prompt"], train["completion"])) == [
        ("question 0", "0"), ("question 1", "1"), ("question 2", "2")]
    assert valid[0] == {"prompt": "held out", "completion": "x"}
    assert detect_format(train[0]) == PROMPT_COMPLETION


def test_prompt_response_shape_with_template(db):
    db.qa.insert_many([{"prompt": f"p{i}", "response": f"r{i}"} for i in range(3)])
    train, valid = build_datasets(db, data(collection="qa", key=["prompt", "response"],
                                           template="Q: {prompt}\nA: {response}</s>"), Limits())
    assert valid is None  # fewer than 10 documents and no folds: everything trains
    assert train.column_names == ["text"]
    assert sorted(train["text"]) == [f"Q: p{i}\nA: r{i}</s>" for i in range(3)]


def test_template_alone_on_text_key(db):
    db.docs.insert_many([{"title": "T", "body": "B"}])
    train, _ = build_datasets(db, data(template="# {title}\n{body}"), Limits())
    assert train["text"] == ["# T\nB"]


def test_messages_shape(db):
    db.chats.insert_many([{"messages": chat(i), "_fold": "valid" if i == 0 else "train"} for i in range(3)])
    train, valid = build_datasets(db, data(collection="chats", key="messages"), Limits())
    assert train.column_names == ["messages"]
    assert len(train) == 2 and len(valid) == 1
    assert valid[0]["messages"] == chat(0)
    assert detect_format(train[0]) == MESSAGES


def test_messages_keep_only_role_and_content(db):
    messages = [{"role": "user", "content": "hi", "name": "x", "ts": 5}]
    db.chats.insert_one({"messages": messages})
    train, _ = build_datasets(db, data(collection="chats", key="messages"), Limits())
    assert train[0]["messages"] == [{"role": "user", "content": "hi"}]


# --- seeded split --------------------------------------------------------------------------------

def split_of(db, **kwargs) -> tuple[list, list]:
    train, valid = build_datasets(db, data(**kwargs), Limits())
    return sorted(train["text"]), sorted(valid["text"]) if valid is not None else []


def test_seeded_split_without_folds(db):
    db.docs.insert_many([{"text": f"t{i:02d}"} for i in range(50)])
    train, valid = split_of(db, valid_fraction=0.2, seed=1)
    assert len(valid) == 10 and len(train) == 40
    assert not set(train) & set(valid)
    assert split_of(db, valid_fraction=0.2, seed=1) == (train, valid)
    _, other_valid = split_of(db, valid_fraction=0.2, seed=2)
    assert other_valid != valid


def test_small_collection_all_trains(db):
    db.docs.insert_many([{"text": f"t{i}"} for i in range(9)])
    train, valid = build_datasets(db, data(valid_fraction=0.5), Limits())
    assert len(train) == 9 and valid is None


def test_zero_valid_fraction(db):
    db.docs.insert_many([{"text": f"t{i}"} for i in range(20)])
    train, valid = build_datasets(db, data(valid_fraction=0.0), Limits())
    assert len(train) == 20 and valid is None


# --- filter and limit ----------------------------------------------------------------------------

def test_filter_is_applied(db):
    db.docs.insert_many([{"text": f"t{i}", "lang": "en" if i % 2 else "fr", "n": i} for i in range(8)])
    train, _ = build_datasets(db, data(filter={"lang": "en", "n": {"$gt": 2}}), Limits())
    assert sorted(train["text"]) == ["t3", "t5", "t7"]


def test_filter_with_or(db):
    db.docs.insert_many([{"text": f"t{i}", "n": i} for i in range(8)])
    train, _ = build_datasets(db, data(filter={"$or": [{"n": 0}, {"n": {"$gte": 6}}]}), Limits())
    assert sorted(train["text"]) == ["t0", "t6", "t7"]


def test_limit(db):
    db.docs.insert_many([{"text": f"t{i}"} for i in range(8)])
    train, valid = build_datasets(db, data(limit=3), Limits())
    assert len(train) == 3 and valid is None


def test_only_needed_fields_are_read(db):
    db.docs.insert_many([{"text": "a", "big": "x" * 1000, "nested": {"a": 1}}])
    train, _ = build_datasets(db, data(), Limits())
    assert train.column_names == ["text"]


# --- errors name the field -----------------------------------------------------------------------

def test_empty_collection(db):
    error = refused(db, data(collection="nothing_here"))
    assert error.field == "data.collection"
    assert "nothing_here" in error.message


def test_filter_matching_nothing(db):
    db.docs.insert_many([{"text": "a", "lang": "en"}])
    error = refused(db, data(filter={"lang": "de"}))
    assert error.field == "data.filter"
    assert "de" in error.message


def test_a_read_the_server_refuses_fails_with_its_errmsg_alone(db):
    """The server's whole reply (`$clusterTime` and its signature included) never goes into a document: the run's
    error is the server's `errmsg` and code."""
    db.docs.insert_many([{"text": "a"}, {"text": "b"}])
    with pytest.raises(OperationFailure) as info:
        build_datasets(db, data(filter={"text": {"$regex": "("}}), Limits())
    error = failure(info.value)
    assert error["type"] == "training_failed" and info.value.details["errmsg"] in error["message"], error
    assert "full error" not in error["message"] and "clusterTime" not in error["message"], error


def test_documents_lacking_the_key(db):
    db.docs.insert_many([{"text": "a"}, {"body": "b"}, {"text": "c"}, {"body": "d"}, {"text": "e"}])
    error = refused(db, data())
    assert error.field == "data.key"
    assert "2 of 5" in error.message
    assert "'text'" in error.message


def test_documents_lacking_the_response(db):
    db.qa.insert_many([{"prompt": "p", "response": "r"}, {"prompt": "p"}])
    error = refused(db, data(collection="qa", key=["prompt", "response"]))
    assert error.field == "data.key"
    assert "1 of 2" in error.message and "'response'" in error.message


def test_template_naming_a_missing_field(db):
    db.qa.insert_many([{"prompt": "p", "response": "r"} for _ in range(3)])
    error = refused(db, data(collection="qa", key=["prompt", "response"], template="{prompt}{answer}"))
    assert error.field == "data.template"
    assert "'answer'" in error.message and "3 of 3" in error.message


@pytest.mark.parametrize("messages", [
    [],
    [{"role": "robot", "content": "hi"}],
    [{"role": "user"}],
    [{"role": "user", "content": 5}],
    ["just a string"],
])
def test_malformed_messages(db, messages):
    db.chats.insert_many([{"messages": chat(0)}, {"_id": "bad", "messages": messages}])
    error = refused(db, data(collection="chats", key="messages"))
    assert error.field == "data.key"
    assert "'bad'" not in error.message, "errors never echo other documents"


def test_key_of_wrong_type(db):
    db.docs.insert_many([{"_id": 7, "text": 42}])
    error = refused(db, data())
    assert error.field == "data.key"
    assert "int" in error.message and "7" not in error.message


def test_mixed_shapes(db):
    db.docs.insert_many([{"text": "plain"}, {"text": chat(1)}])
    error = refused(db, data())
    assert error.field == "data.key"
    assert "mix" in error.message


def test_all_documents_in_valid_fold(db):
    db.docs.insert_many([{"text": f"t{i}", "_fold": "valid"} for i in range(3)])
    error = refused(db, data())
    assert error.field == "data.fold_field"
    assert "train" in error.message
