"""Which collections the daemon reads and writes on a document's behalf (issue 21, class 1), and the size of
the filters it sends with every read (class 3).

The listener's own collections (`_models`, `_requests`, `_listener`, the `_checkpoints` GridFS bucket) and the
server's `system.*` are never a document's data, whatever pattern the operator lists; a view is never read on a
document's behalf, since it reads whatever its pipeline names with the daemon's rights.
"""

import asyncio

import pytest
from pymongo import AsyncMongoClient, MongoClient, monitoring

from listener.batch_predictions import CollectionJob
from listener.settings import Settings
from tests.conftest import settled
from tests.documents import ANSWERS, collection_request
from tests.test_collection_answers import OWNER, Answering
from tests.test_serving import served_model
from training import defaults
from training.config import MAX_FILTER_BYTES, SpecError, parse_model, parse_request
from training.dataset import check_documents
from training.hints import user_collections


DAEMON_ENV = {**ANSWERS, "MONGOTUNE_REQUEST_LEASE_S": "3"}  # answers allowed anywhere (conftest.module_daemon)


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


# --- re-attack on issue 21: what a document's filter and collection cost the server ------------------------

EXPENSIVE = {"$expr": {"$gt": [{"$reduce": {"input": {"$range": [0, 10**9]}, "initialValue": 0,
                                            "in": {"$add": ["$$value", 1]}}}, 0]}}  # 155 bytes as BSON


def test_class1_a_small_filter_never_makes_a_job_that_runs_unbounded_on_the_server(client, db):
    """16 KiB bounds a filter's size, not its cost: `EXPENSIVE` is 155 bytes and makes the server count to 10**9
    for every document (on the embedded server 10**6 took 21 s for 3 documents). The job's counts and finds carry
    no `maxTimeMS`, and a running job over a collection never looks at `cancel` before its first pass ends, so such
    a request holds a collection place (and the server's CPU) for as long as the server takes, and its writer
    cannot even cancel it. Either the filter is refused, or every read the job sends is bounded in time.
    (The job is not run: the commands it would send are recorded from a filter that matches at once.)"""
    document = collection_request("costly", "m", "notes", filter=EXPENSIVE)
    limits = Settings.load({}, environ=ANSWERS).limits
    try:
        parse_request(document, limits)
    except SpecError:
        return  # refused: fine
    db.notes.insert_many([{"_id": n, "text": f"ahoy {n}"} for n in range(3)])
    cheap = {**document, "filter": {"$expr": {"$gt": [{"$reduce": {"input": {"$range": [0, 3]}, "initialValue": 0,
                                                                   "in": {"$add": ["$$value", 1]}}}, 0]}}}
    spec = parse_request(cheap, limits)
    db[defaults.REQUESTS].insert_one({**cheap, "status": "running", "lease": {"owner": OWNER}})

    class Reads(monitoring.CommandListener):
        def __init__(self):
            self.unbounded = []

        def started(self, event):
            command = event.command
            if event.command_name in ("find", "aggregate", "count") and command.get(event.command_name) == "notes":
                if "maxTimeMS" not in command:
                    self.unbounded.append(event.command_name)

        def succeeded(self, event):
            pass

        def failed(self, event):
            pass

    reads = Reads()

    async def job():
        async_client = AsyncMongoClient(client.address[0], client.address[1], directConnection=True,
                                        event_listeners=[reads])
        try:
            await asyncio.wait_for(CollectionJob(Answering(async_client[db.name]), spec).answer_all(), 60)
        finally:
            await async_client.close()

    asyncio.run(job())
    assert db[defaults.REQUESTS].find_one({"_id": "costly"})["status"] == "done"
    assert reads.unbounded == [], f"reads of the document's collection with no time bound: {reads.unbounded}"


class SwapForView(monitoring.CommandListener):
    """A writer who may drop and create collections replaces `notes` by a view over a collection documents may not
    use (`secret`) the moment `command` is first sent on `notes` (as another user would: the listener only
    watches the commands, for timing)."""

    def __init__(self, db, command: str):
        self.db, self.command, self.swapped = db, command, False

    def started(self, event):
        if not self.swapped and event.command_name == self.command and event.command.get(self.command) == "notes":
            self.swapped = True
            self.db.notes.drop()
            self.db.command("create", "notes", viewOn="secret", pipeline=[])

    def succeeded(self, event):
        pass

    def failed(self, event):
        pass


@pytest.mark.parametrize("command", ["aggregate", "find"])
def test_class1_a_collection_swapped_for_a_view_after_the_check_never_reads_through_the_view(client, db, command):
    """`answer_all` checks the collection's type once, then runs three counts and writes them as `progress`
    before `_next` checks again. A writer who may drop and create collections replaces `notes` by a view over a
    collection documents may not use (`secret`) right after the check (here: the moment the first count is sent,
    as another user would, through a command listener that only watches): the counts run through the view with
    the daemon's rights, and `progress` tells the writer how many of `secret`'s documents match their filter.
    The same swap at a chunk's `find` must not have the model generate over `secret`'s documents."""
    db.secret.insert_many([{"_id": n, "text": f"salary {n}"} for n in range(7)])
    db.notes.insert_many([{"_id": n, "text": f"ahoy {n}"} for n in range(3)])
    document = collection_request("swapped", "m", "notes")
    spec = parse_request(document, Settings.load({}, environ=ANSWERS).limits)
    db[defaults.REQUESTS].insert_one({**document, "status": "running", "lease": {"owner": OWNER}})
    swap, generated = SwapForView(db, command), []

    async def job():
        async_client = AsyncMongoClient(client.address[0], client.address[1], directConnection=True,
                                        event_listeners=[swap])
        try:
            serving = Answering(async_client[db.name], meanwhile=lambda: generated.append(1))
            await asyncio.wait_for(CollectionJob(serving, spec).answer_all(), 60)
        finally:
            await async_client.close()

    asyncio.run(job())
    assert swap.swapped
    ended = db[defaults.REQUESTS].find_one({"_id": "swapped"})
    assert (ended.get("progress") or {}).get("total") != 7, f"counted through the view: {ended.get('progress')}"
    assert generated == [] and ended["status"] == "failed" and ended["error"]["field"] == "collection", ended


@pytest.mark.parametrize("command", ["find", "aggregate"])
def test_class1_a_collection_swapped_for_a_view_while_training_reads_it_is_refused(client, db, limits, command):
    """The same swap at the `find` that reads a model's training documents (the run never gets them), or at the
    `aggregate` that names the fields the documents have when none has `data.key` (the error never names
    another collection's fields)."""
    db.secret.insert_many([{"_id": n, "text": f"salary {n}", "salary": n} for n in range(7)])
    db.notes.insert_many([{"_id": n, "body": f"ahoy {n}"} for n in range(3)])
    swap = SwapForView(db, command)
    swapping = MongoClient(client.address[0], client.address[1], directConnection=True, event_listeners=[swap])
    try:
        model = parse_model({"_id": "m", "model_name_or_path": "org/m", "data": {"collection": "notes"}}, limits)
        with pytest.raises(SpecError) as refused:
            check_documents(swapping[db.name], model.data, limits)
    finally:
        swapping.close()
    assert swap.swapped and refused.value.field == "data.collection", refused.value


@pytest.mark.parametrize("filter_", [EXPENSIVE, {"$and": [{"lang": "en"}, {"$expr": {"$gt": ["$a", "$b"]}}]},
                                     {"items": {"$elemMatch": {"$expr": {"$eq": ["$n", 1]}}}}])
def test_class1_a_filter_selects_and_never_computes(limits, filter_):
    """`$expr` anywhere in a request's or a model's filter is refused naming the field: a filter selects documents
    with query operators; aggregation expressions cost the server without a bound its size could set."""
    with pytest.raises(SpecError) as request:
        parse_request(collection_request("r", "m", "notes", filter=filter_), limits)
    with pytest.raises(SpecError) as model:
        parse_model({"_id": "m", "model_name_or_path": "org/m", "data": {"collection": "notes", "filter": filter_}},
                    limits)
    assert (request.value.field, model.value.field) == ("filter", "data.filter")
    assert "$expr" in request.value.message and "$expr" in model.value.message
