"""The $jsonSchema validators: generated from the daemon's own models, refusing bad inserts at write time."""

import asyncio

import pytest
from pymongo import AsyncMongoClient
from pymongo.errors import WriteError

from listener import schema
from training import defaults
from training.config import MAX_KEY_CHARS, SpecError, parse_model, parse_request
from training.limits import Limits

GOOD_MODELS = [
    {"model_name_or_path": "m", "data": {"collection": "c"}},
    {"model_name_or_path": "m", "data": {"collection": "c", "key": ["prompt", "response"], "template": "{prompt}"},
     "trainer": {"num_train_epochs": 1, "learning_rate": 1e-3, "lora_r": 8, "evaluation_strategy": "steps",
                 "deepspeed": {"zero_optimization": {"stage": 2}}, "bits": 4}},
    {"model_name_or_path": "m", "data": {"collection": "c", "key": "messages", "filter": {"x": {"$gt": 1}},
                                         "valid_fraction": 0.2, "limit": 10}, "model_kwargs": {"dtype": "bfloat16"},
     "description": "chat", "cancel": False},
    # a collection's own field names are free-form: spaces, accents, a `$` past a name's first character
    {"model_name_or_path": "m", "data": {"collection": "c", "key": ["un título", "price$ é"], "fold_field": "fold"}},
]
BAD_MODELS = [
    {"data": {"collection": "c"}},
    {"model_name_or_path": "m", "data": {"key": "text"}},
    {"model_name_or_path": 5, "data": {"collection": "c"}},
    {"model_name_or_path": "m", "data": {"collection": "c"}, "trainer": {"lora_r": "8"}},
    {"model_name_or_path": "m", "data": {"collection": "c"}, "colection": "typo"},
    {"model_name_or_path": "m", "data": {"collection": "c", "valid_fraction": 1.5}},
    {"model_name_or_path": "m", "data": {"collection": "c"}, "status": "bogus"},
    # Field names are quoted into errors and skip reasons: megabytes of them would overflow what the daemon writes.
    {"model_name_or_path": "m", "method": "dpo",
     "data": {"collection": "c", "key": ["x" * (MAX_KEY_CHARS + 1), "y", "z"]}},
    {"model_name_or_path": "m", "data": {"collection": "c", "key": "x" * (MAX_KEY_CHARS + 1)}},
    {"model_name_or_path": "m", "data": {"collection": "c", "fold_field": "x" * (MAX_KEY_CHARS + 1)}},
    # Field names are projected by the read and rows read by name: an operator, an empty part or a dotted path is no
    # top-level field (the pattern reaches the validator).
    {"model_name_or_path": "m", "data": {"collection": "c", "key": "arr.$"}},
    {"model_name_or_path": "m", "data": {"collection": "c", "key": ["prompt", "a..b"]}},
    {"model_name_or_path": "m", "data": {"collection": "c", "fold_field": "$fold"}},
    {"model_name_or_path": "m", "data": {"collection": "c", "key": "meta.title"}},
    # a run that never saves would store nothing
    {"model_name_or_path": "m", "data": {"collection": "c"}, "trainer": {"save_strategy": "no"}},
]
GOOD_REQUESTS = [
    {"model": "m", "input": "hi"},
    {"model": "m", "input": [{"role": "user", "content": "hi"}], "params": {"max_new_tokens": 5, "temperature": 1},
     "checkpoint": {"run": 1, "step": 2}},
    {"model": "m", "input": "hi", "checkpoint": "base", "params": {"top_p": 0.9, "do_sample": True}},
]
BAD_REQUESTS = [
    {"input": "hi"},
    {"model": "m"},
    {"model": "m", "input": 5},
    {"model": "m", "input": [{"role": "wizard", "content": "hi"}]},
    {"model": "m", "input": "hi", "params": {"max_new_tokens": 0}},
    {"model": "m", "input": "hi", "params": {"max_new_tokens": Limits().max_new_tokens + 1}},
    {"model": "m", "input": "hi", "checkpoint": "worst"},
    {"model": "m", "input": "hi", "status": "bogus"},
]


@pytest.fixture
def validated(db, server_uri):
    async def install():
        client = AsyncMongoClient(server_uri)
        try:
            first = await schema.install(client[db.name], Limits())
            again = await schema.install(client[db.name], Limits())  # the collMod path, as a second daemon takes it
            return first and again
        finally:
            await client.close()

    assert asyncio.run(install())
    return db


def test_the_validator_is_installed_on_both_collections(validated):
    options = {c["name"]: c["options"] for c in validated.list_collections()}
    for name in (defaults.MODELS, defaults.REQUESTS):
        assert "$jsonSchema" in options[name]["validator"]


GOOD = [(defaults.MODELS, parse_model, d) for d in GOOD_MODELS] + [(defaults.REQUESTS, parse_request, d)
                                                                     for d in GOOD_REQUESTS]
BAD = [(defaults.MODELS, parse_model, d) for d in BAD_MODELS] + [(defaults.REQUESTS, parse_request, d)
                                                                  for d in BAD_REQUESTS]


@pytest.mark.parametrize(("collection", "parse", "document"), GOOD)
def test_good_documents_pass_both_checks(validated, collection, parse, document):
    validated[collection].insert_one(dict(document))
    parse({"_id": 1, **document})


@pytest.mark.parametrize(("collection", "parse", "document"), BAD)
def test_bad_documents_are_refused_at_write_time_and_by_the_daemon(validated, collection, parse, document):
    with pytest.raises(WriteError) as refused:
        validated[collection].insert_one(dict(document))
    assert refused.value.code == 121
    if "status" not in document:  # the one rule only the validator holds: a status the listener never writes
        with pytest.raises(SpecError):
            parse({"_id": 1, **document})


def test_the_listener_can_still_write_every_field_it_owns(validated):
    models = validated[defaults.MODELS]
    models.insert_one({"_id": "m", **GOOD_MODELS[0]})
    models.update_one({"_id": "m"}, {"$set": {"status": "failed", "run": 1, "attempts": 1, "error": {"field": "x"},
                                              "progress": {"step": 1}, "lease": {"owner": "o"}},
                                     "$push": {"history": {"event": "lease expired"}}})
    assert models.find_one({"_id": "m"})["status"] == "failed"


def test_a_retrain_at_a_beta_that_overflows_is_refused_at_write_time(validated):
    """IPO's 1/(2*beta) overflows at beta 1e-300: the update that would retrain a served model at it is refused, and
    the model stays as it was."""
    models = validated[defaults.MODELS]
    models.insert_one({"_id": "dpo", "model_name_or_path": "m", "method": "dpo",
                       "data": {"collection": "c", "key": ["q", "good", "bad"]}, "status": "succeeded"})
    with pytest.raises(WriteError) as refused:
        models.update_one({"_id": "dpo"}, {"$set": {"status": "pending", "trainer.loss_type": "ipo",
                                                    "trainer.beta": 1e-300}})
    assert refused.value.code == 121 and models.find_one({"_id": "dpo"})["status"] == "succeeded"
