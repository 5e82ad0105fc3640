"""Malformed documents thrown at a running daemon: each ends failed or is refused; the daemon lives on."""

import asyncio
import functools

from bson.errors import BSONError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

from listener import schema
from listener.processes import wait_until
from tests.conftest import finished, wait_for
from training import defaults
from training.config import LISTENER_FIELDS, SpecError, parse_model, parse_request
from training.limits import Limits

MODEL_EXAMPLES, REQUEST_EXAMPLES = 600, 400
FUZZ = settings(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

odd_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | odd_text
           | st.text(min_size=5000, max_size=6000) | st.integers(10**30, 10**40).map(float))
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(odd_text, inner, max_size=3),
                    max_leaves=12)
deep = st.integers(20, 150).map(lambda n: functools.reduce(lambda acc, _: {"x": [acc]}, range(n), "bottom"))
anything = junk | deep
safe_key = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=12)


def not_a(*types):
    return anything.filter(lambda value: not isinstance(value, types) or isinstance(value, bool) and bool not in types)


def base_model():
    return {"model_name_or_path": "fuzz-model", "data": {"collection": "fuzz_data", "key": "text"}, "trainer": {}}


def set_path(document, path, value):
    *parents, last = path.split(".")
    target = document
    for part in parents:
        target = target[part]
    if value is DELETE:
        target.pop(last, None)
    else:
        target[last] = value


DELETE = object()
model_breaks = st.one_of(
    st.sampled_from(["model_name_or_path", "data", "data.collection"]).map(lambda p: (p, DELETE)),
    st.tuples(st.just("model_name_or_path"), not_a(str)),
    st.tuples(st.just("data"), not_a(dict)),
    st.tuples(st.just("data.collection"), not_a(str)),
    st.tuples(st.just("data.key"), not_a(str, list)),
    st.tuples(st.just("trainer"), not_a(dict)),
    st.tuples(st.just("trainer.lora_r"), not_a(int)),
    st.tuples(st.just("trainer.use_lora"), not_a(bool)),
    st.tuples(st.just("data.template"), odd_text.map(lambda t: "{x.__class__}" + t)),
    st.tuples(st.just("data.filter"), anything.map(lambda v: {"$or": [{"$where": "while(1){}"}, {"v": v}]})),
    st.tuples(st.just("model_kwargs"), st.just({"trust_remote_code": True})),
    st.tuples(safe_key.filter(lambda k: k not in LISTENER_FIELDS and k not in {"cancel", "description"})
              .map(lambda k: "x_" + k), anything),
)
noise = st.lists(st.tuples(st.sampled_from(["model_kwargs", "tokenizer_kwargs", "description", "trainer.extra"]),
                           anything), max_size=2)


@st.composite
def bad_models(draw):
    document = base_model()
    for path, value in draw(noise):
        if path.startswith("trainer.") or path != "description":
            set_path(document, path, {"k": value} if path.endswith("kwargs") else value)
    path, value = draw(model_breaks)
    set_path(document, path, value)
    return document


request_breaks = st.one_of(
    st.sampled_from(["model", "input"]).map(lambda p: (p, DELETE)),
    st.tuples(st.just("input"), not_a(str, list)),
    st.tuples(st.just("input"), st.lists(anything, min_size=1, max_size=3).filter(
        lambda items: any(not isinstance(i, dict) or set(i) != {"role", "content"} for i in items))),
    st.tuples(st.just("params"), not_a(dict)),
    st.tuples(st.just("params"), st.fixed_dictionaries({"max_new_tokens": st.integers(-(2**63), 0)
                                                         | st.integers(Limits().max_new_tokens + 1, 2**63 - 1)
                                                         | not_a(int)})),
    st.tuples(st.just("checkpoint"), not_a(dict).filter(lambda v: v not in ("best", "latest", "base"))),
    st.tuples(safe_key.map(lambda k: "x_" + k), anything),
)


@st.composite
def bad_requests(draw):
    document = {"model": "fuzz-model", "input": "hi"}
    path, value = draw(request_breaks)
    set_path(document, path, value)
    return document


def insert_all(collection, strategy, examples: int) -> tuple[list, int]:
    """Insert every generated document; returns the inserted ids and how many the server refused."""
    inserted, refused = [], [0]

    @settings(FUZZ, max_examples=examples)
    @given(strategy)
    def insert(document):
        try:
            inserted.append(collection.insert_one(document).inserted_id)
        except (PyMongoError, BSONError, OverflowError):
            refused[0] += 1

    insert()
    return inserted, refused[0]


def test_a_thousand_malformed_documents_fail_clearly_and_good_ones_still_work(db, start_daemon, tiny_model_path):
    daemon = start_daemon("fuzzed", args=("--no-validators",))
    db["chat"].insert_many([{"messages": [{"role": "user", "content": f"hi {i}"},
                                          {"role": "assistant", "content": "ahoy"}]} for i in range(8)])
    good_model = {"model_name_or_path": tiny_model_path, "data": {"collection": "chat", "key": "messages"},
                  "trainer": {"max_steps": 2, "per_device_train_batch_size": 2, "max_seq_length": 64}}
    models, requests = db[defaults.MODELS], db[defaults.REQUESTS]
    models.insert_one({"_id": "good-before", **good_model})

    bad_model_ids, models_refused = insert_all(models, bad_models(), MODEL_EXAMPLES)
    models.insert_one({"_id": "good-between", **good_model})
    requests.insert_one({"_id": "good-between", "model": "good-before", "input": "hi", "checkpoint": "base",
                         "params": {"max_new_tokens": 2}})
    bad_request_ids, requests_refused = insert_all(requests, bad_requests(), REQUEST_EXAMPLES)
    requests.insert_one({"_id": "good-after", "model": "good-between", "input": "hi", "checkpoint": "base",
                         "params": {"max_new_tokens": 2}})

    tried = len(bad_model_ids) + models_refused + len(bad_request_ids) + requests_refused
    assert tried >= 1000
    for collection, ids in ((models, bad_model_ids), (requests, bad_request_ids)):
        wait_until(lambda: collection.count_documents({"_id": {"$in": ids}, "status": "failed"}) == len(ids), 300,
                   "every malformed document ending failed", poll_s=2)  # a count over 500 ids loads the shared server
        for document in collection.find({"_id": {"$in": ids}}, {"error": 1}):
            error = document["error"]
            assert error["message"] and "Traceback" not in error["message"]
    for collection, doc_id, status in ((models, "good-before", "succeeded"), (models, "good-between", "succeeded"),
                                       (requests, "good-between", "done"), (requests, "good-after", "done")):
        assert wait_for(collection, doc_id, finished, timeout_s=180)["status"] == status
    assert daemon.process.poll() is None, "the daemon survived"
    print(f"fuzz: {tried} malformed documents, {models_refused + requests_refused} refused by the server/driver, "
          f"{len(bad_model_ids) + len(bad_request_ids)} failed by the daemon")


def test_what_the_validator_lets_through_the_daemon_still_fails(db, server_uri):
    async def install():
        client = AsyncMongoClient(server_uri)
        try:
            return await schema.install(client[db.name], Limits())
        finally:
            await client.close()

    assert asyncio.run(install())
    for collection, strategy, parse, examples in ((db[defaults.MODELS], bad_models(), parse_model, 300),
                                                  (db[defaults.REQUESTS], bad_requests(), parse_request, 200)):
        inserted, refused = insert_all(collection, strategy, examples)
        assert refused > len(inserted), "the validator refuses most malformed documents at write time"
        for document in collection.find({"_id": {"$in": inserted}}):
            try:
                parse(document)
            except SpecError:
                continue
            raise AssertionError(f"accepted by the validator and by the daemon: {document}")
