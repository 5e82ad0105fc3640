"""Which collections the daemon reads and writes on a document's behalf (issue 21, class 1), and the size of
the filters it sends with every read (class 3).

The listener's own collections (`_models`, `_requests`, `_listener`, the `_checkpoints` GridFS bucket) and the
server's `system.*` are never a document's data, whatever pattern the operator lists; a view is never read on a
document's behalf, since it reads whatever its pipeline names with the daemon's rights.
"""

import pytest

from tests.conftest import settled
from tests.documents import ANSWERS, collection_request
from tests.test_serving import served_model
from training import defaults
from training.config import MAX_FILTER_BYTES, SpecError, parse_model, parse_request
from training.dataset import check_documents
from training.hints import user_collections


DAEMON_ENV = {**ANSWERS, "MONGOTUNE_REQUEST_LEASE_S": "3"}  # the operator allows answers into every data collection (conftest.module_daemon)


# --- class 1: no confused deputy ---------------------------------------------------------------------------------

OURS = ["_models", "_requests", "_listener", "_checkpoints.files", "_checkpoints.chunks", "system.profile"]
PATTERNS = [("*",), ("_*",), ("_listener",), ("*.chunks", "*.files"), ("system.*",)]


@pytest.mark.parametrize("collection", OURS)
def test_class1_no_operator_pattern_lets_a_model_train_on_the_listeners_or_the_systems_collections(limits, collection):
    """An operator who lists `MONGOTUNE_COLLECTIONS=*` means "any data collection". `collection_allowed` then
    matched the pattern alone, so a model trained on `_listener` (other daemons' records), `_requests` (everyone's
    prompts and answers) or `_checkpoints.chunks` (every model's adapter bytes), and "did you mean" hints
    listed them too."""
    everything = limits.model_copy(update={"collections": ("*",)})
    with pytest.raises(SpecError) as refused:
        parse_model({"_id": "m", "model_name_or_path": "org/m", "data": {"collection": collection}}, everything)
    assert refused.value.field == "data.collection"


@pytest.mark.parametrize("collection", OURS)
def test_class1_no_operator_pattern_lets_answers_be_written_into_the_listeners_collections(limits, collection):
    """The same for predictions over a collection, which *write*: with `MONGOTUNE_COLLECTIONS=*` a request over
    `_models` with `output_field: "status"` was accepted, and the daemon `$set` `status` on every model document
    (everyone's), or into `_listener` and the GridFS bucket."""
    everything = limits.model_copy(update={"collections": ("*",)})
    with pytest.raises(SpecError) as refused:
        parse_request({"_id": "r", "model": "m", "collection": collection, "input": "{text}",
                       "output_field": "status"}, everything)
    assert refused.value.field == "collection"


@pytest.mark.parametrize("patterns", PATTERNS)
def test_class1_even_a_pattern_naming_them_never_opens_the_listeners_or_the_systems_collections(limits, patterns):
    """The class: whatever the operator's patterns name, ours and the server's stay closed; another `_`-prefixed
    collection is the operator's to open, and a data collection the pattern names stays open."""
    listed = limits.model_copy(update={"collections": patterns})
    for collection in OURS + ["_checkpoints.files.x", "system.buckets.notes"]:
        with pytest.raises(SpecError):
            parse_model({"_id": "m", "model_name_or_path": "org/m", "data": {"collection": collection}}, listed)
    opened = limits.model_copy(update={"collections": ("_archive", "notes")})
    for collection in ("_archive", "notes"):
        parse_model({"_id": "m", "model_name_or_path": "org/m", "data": {"collection": collection}}, opened)


def test_class1_hints_never_name_the_listeners_collections_or_a_view(db, limits):
    """"Did you mean" lists only collections a document may train on: never ours, and never a view."""
    db[defaults.LISTENER].insert_one({"_id": "daemon:other"})
    db[defaults.MODELS].insert_one({"_id": "m"})
    db.notes.insert_one({"_id": 1})
    db.create_collection("notes_view", viewOn="notes", pipeline=[])
    everything = limits.model_copy(update={"collections": ("*",)})
    assert user_collections(db, everything) == ["notes"]


def test_class1_a_view_never_lets_a_model_read_the_listeners_collections(db, limits):
    """`check_collection` judges a name only. A view is a name too: anyone who may create one in the database
    names it `innocent`, over `_listener` (or over any collection, with a `$lookup` into `_listener`,
    `_requests` or the GridFS bucket), and the daemon read through it with its own rights for the training data,
    its field hints and the run's `runs[].data` (first and last `_id`, count)."""
    db[defaults.LISTENER].insert_one({"_id": "daemon:other", "owner": "other", "text": "another daemon's record"})
    db.create_collection("innocent", viewOn=defaults.LISTENER, pipeline=[])
    spec = parse_model({"_id": "m", "model_name_or_path": "org/m", "data": {"collection": "innocent"}}, limits)
    with pytest.raises(SpecError) as refused:
        check_documents(db, spec.data, limits)  # what the training child checks first, as it reads
    assert refused.value.field == "data.collection"
    assert "view" in refused.value.message


def test_class1_a_view_with_a_lookup_is_refused_like_any_view(db, limits):
    """A view over the user's own data that `$lookup`s into `_requests` is still a view: refused before any read."""
    db.notes.insert_one({"_id": 1, "text": "mine"})
    db.create_collection("joined", viewOn="notes", pipeline=[
        {"$lookup": {"from": defaults.REQUESTS, "pipeline": [], "as": "theirs"}}])
    spec = parse_model({"_id": "m", "model_name_or_path": "org/m", "data": {"collection": "joined"}}, limits)
    with pytest.raises(SpecError) as refused:
        check_documents(db, spec.data, limits)
    assert refused.value.field == "data.collection"
    plain = parse_model({"_id": "m", "model_name_or_path": "org/m", "data": {"collection": "notes"}}, limits)
    assert check_documents(db, plain.data, limits) == 1


def test_class1_predictions_never_count_or_read_the_listeners_collections_through_a_view(module_db,
                                                                                       module_daemon,
                                                                                       tiny_model_path):
    """The same view, named in a request over a collection: the daemon counted `_listener` with the request's
    filter and wrote the count into `progress.total` (an oracle: how many daemon records, resume tokens or
    tallies match any filter), and generated over its documents, before the answers' writes failed on the
    read-only view."""
    db = module_db
    db[defaults.MODELS].insert_one(served_model("peek", tiny_model_path))
    db.create_collection("peephole", viewOn=defaults.LISTENER, pipeline=[])
    db[defaults.REQUESTS].insert_one(collection_request("through-view", "peek", "peephole", input="{owner}",
                                                        filter={"kind": "daemon"}))
    ended = settled(db, "through-view")
    assert "progress" not in ended, f"the daemon counted _listener for a request: {ended.get('progress')}"
    assert ended.get("status") == "failed" and (ended.get("error") or {}).get("field") == "collection", ended


# --- class 3: capacity apportioned -------------------------------------------------------------------------------

HUGE = {"$or": [{"text": "x" * 1000 + str(n)} for n in range(4000)]}


def test_class3_a_requests_filter_is_bounded_like_every_other_field(limits):
    """`RequestSpec.filter` was any dict: a 4 MB filter was accepted, then sent with every `count_documents`,
    every chunk's `find` and every watched event's `find_one` for as long as the request runs."""
    with pytest.raises(SpecError) as refused:
        parse_request({"_id": "r", "model": "m", "collection": "notes", "input": "{text}", "output_field": "answer",
                       "filter": HUGE}, limits)
    assert refused.value.field == "filter"
    assert f"{MAX_FILTER_BYTES:,}" in refused.value.message


def test_class3_a_models_data_filter_is_bounded_too(limits):
    """`data.filter` is sent with every training read and serialised and hashed by every retrain pass."""
    with pytest.raises(SpecError) as refused:
        parse_model({"_id": "m", "model_name_or_path": "org/m", "data": {"collection": "notes", "filter": HUGE}},
                    limits)
    assert refused.value.field == "data.filter"
    small = {"$or": [{"text": str(n)} for n in range(100)]}
    assert parse_model({"_id": "m", "model_name_or_path": "org/m",
                        "data": {"collection": "notes", "filter": small}}, limits).data.filter == small
