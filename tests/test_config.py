"""`training.config`: documents parsed once; every refusal names the field to change."""

import pytest
from pymongo.errors import OperationFailure
from hypothesis import given, settings
from hypothesis import strategies as st

from training.config import (
    LISTENER_FIELDS, CheckpointRef, ModelSpec, RequestSpec, SpecError, parse_model, parse_request,
)
from training.limits import Limits

CAPS = Limits()
TRUSTING = Limits(trust_remote_code=True)


def model_doc(**overrides) -> dict:
    doc = {"_id": "llm", "model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
           "data": {"collection": "docs"}}
    doc.update(overrides)
    return doc


def request_doc(**overrides) -> dict:
    doc = {"_id": "r1", "model": "llm", "input": "Hello"}
    doc.update(overrides)
    return doc


def refused(parse, document) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse(document)
    return info.value


# --- good documents ------------------------------------------------------------------------------

def test_text_document_and_defaults():
    spec = parse_model(model_doc())
    assert isinstance(spec, ModelSpec)
    assert spec.id == "llm"
    assert spec.data.collection == "docs"
    assert spec.data.key == "text"
    assert spec.data.template is None
    assert spec.data.fold_field == "_fold"
    assert spec.data.filter == {}
    assert spec.trainer.use_lora is True
    assert spec.trainer.training_arguments() == {}


def test_prompt_response_document_without_template():
    spec = parse_model(model_doc(data={"collection": "qa", "key": ["prompt", "response"]}))
    assert spec.data.key == ["prompt", "response"]
    assert spec.data.template is None


def test_prompt_response_document_with_template():
    spec = parse_model(model_doc(data={"collection": "qa", "key": ["prompt", "response"],
                                       "template": "{prompt}{response}</s>",
                                       "filter": {"lang": "en", "$or": [{"a": 1}, {"b": {"$gt": 2}}]}}))
    assert spec.data.template == "{prompt}{response}</s>"
    assert spec.data.filter["lang"] == "en"


def test_messages_document_with_full_trainer_section():
    trainer = {
        "num_train_epochs": 3, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 2,
        "max_seq_length": 512, "eval_steps": 100, "save_steps": 100, "save_total_limit": 3,
        "logging_steps": 10, "use_lora": True, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
        "lora_target_modules": "all-linear", "bits": 4, "deepspeed": {"zero_optimization": {"stage": 2}},
        "num_gpus": 2, "training_kwargs": {"dataset_text_field": "text"},
    }
    spec = parse_model(model_doc(data={"collection": "chats", "key": "messages"}, trainer=trainer,
                                 model_kwargs={"dtype": "float32"}, tokenizer_kwargs={"use_fast": True}))
    assert spec.data.key == "messages"
    assert spec.trainer.bits == 4
    assert spec.trainer.num_gpus == 2
    assert spec.trainer.deepspeed.zero_optimization.stage == 2
    args = spec.trainer.training_arguments()
    # mongotune's own fields are not TrainingArguments; the rest pass through, training_kwargs merged.
    assert args == {"num_train_epochs": 3, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 2,
                    "max_seq_length": 512, "eval_steps": 100, "save_steps": 100, "save_total_limit": 3,
                    "logging_steps": 10, "dataset_text_field": "text"}


def test_good_requests_in_every_shape():
    assert parse_request(request_doc()).input == "Hello"
    chat = parse_request(request_doc(input=[{"role": "system", "content": "be a pirate"},
                                            {"role": "user", "content": "hi"}],
                                     params={"max_new_tokens": CAPS.max_new_tokens, "temperature": 0.7,
                                             "top_p": 1.0, "do_sample": True},
                                     checkpoint={"run": 2, "step": 40}))
    assert isinstance(chat, RequestSpec)
    assert [m.role for m in chat.input] == ["system", "user"]
    assert chat.params.max_new_tokens == CAPS.max_new_tokens
    assert chat.checkpoint == CheckpointRef(run=2, step=40)
    for ref in ("best", "latest", "base"):
        assert parse_request(request_doc(checkpoint=ref)).checkpoint == ref
    assert parse_request(request_doc()).checkpoint == "best"


def test_listener_written_fields_are_ignored():
    written = {"status": "running", "run": "not even an int", "attempts": 3, "progress": {"step": 1},
               "metrics": [{"loss": 1.0}], "checkpoints": [{"run": 1, "step": 10}],
               "best_checkpoint": {"run": 1, "step": 10}, "error": {"type": "x"}, "lease": {"owner": "d"},
               "created_at": 1, "started_at": 2, "finished_at": 3, "history": []}
    spec = parse_model(model_doc(**written))
    assert spec.id == "llm"
    request = parse_request(request_doc(status="done", output="arr", usage={"prompt_tokens": 1},
                                        latency_ms=5, completed_at=6))
    assert request.input == "Hello"


def test_parse_refuses_non_documents():
    assert refused(parse_model, ["not", "a", "dict"]).field == ""
    assert refused(parse_request, "text").field == ""


# --- refusals naming the field -------------------------------------------------------------------

def test_missing_collection():
    error = refused(parse_model, model_doc(data={"key": "text"}))
    assert error.field == "data.collection"
    assert "missing" in error.message
    assert error.as_error() == {"type": "invalid_document", "field": "data.collection", "message": str(error)}


def test_missing_model_name():
    doc = model_doc()
    del doc["model_name_or_path"]
    assert refused(parse_model, doc).field == "model_name_or_path"


@pytest.mark.parametrize("overrides, field", [
    ({"trainer": {"lora_r": "8"}}, "trainer.lora_r"),
    ({"trainer": {"use_lora": "yes"}}, "trainer.use_lora"),
    ({"trainer": {"lora_dropout": 1.5}}, "trainer.lora_dropout"),
    ({"trainer": {"bits": 3}}, "trainer.bits"),
    ({"trainer": {"num_gpus": -1}}, "trainer.num_gpus"),
    ({"data": {"collection": ""}}, "data.collection"),
    ({"data": {"collection": 5}}, "data.collection"),
    ({"data": {"collection": "c", "limit": 0}}, "data.limit"),
    ({"data": {"collection": "c", "valid_fraction": 1.0}}, "data.valid_fraction"),
    ({"data": {"collection": "c", "key": ["prompt"]}}, "data.key"),
    ({"data": {"collection": "c", "key": ""}}, "data.key"),
    ({"data": {"collection": "c", "template": "{x.__class__}"}}, "data.template"),
    ({"data": {"collection": "c", "template": "no fields"}}, "data.template"),
    ({"data": {"collection": "c", "extra": 1}}, "data.extra"),
    ({"data": "docs"}, "data"),
    ({"model_kwargs": "x"}, "model_kwargs"),
])
def test_wrong_values_name_the_field(overrides, field):
    assert refused(parse_model, model_doc(**overrides)).field == field


@pytest.mark.parametrize("data, field", [
    ({"key": "arr.$"}, "data.key"), ({"key": "$text"}, "data.key"), ({"key": "a..b"}, "data.key"),
    ({"key": "a."}, "data.key"), ({"key": "a\x00b"}, "data.key"), ({"key": ["prompt", "arr.$"]}, "data.key.1"),
    ({"fold_field": "$fold"}, "data.fold_field"), ({"fold_field": "f.$"}, "data.fold_field"),
    ({"key": "meta.title"}, "data.key"), ({"key": "doc", "fold_field": "doc.fold"}, "data.fold_field"),
])
def test_a_field_name_the_server_cannot_project_is_refused_naming_it(data, field):
    """Every field `data` names is projected by the read: an operator (`arr.$` is a positional projection) or an
    empty part would have the server refuse the read once the run started; the parse refuses it, saying why."""
    error = refused(parse_model, model_doc(data={"collection": "c", **data}))
    assert error.field == field and "starting with $" in error.message, error


@pytest.mark.parametrize("key", ["title", "a title é", "x$y"])
def test_a_collections_own_field_names_stay_allowed(key):
    assert parse_model(model_doc(data={"collection": "c", "key": key})).data.key == key


def test_wrong_key_type_names_data_key_with_a_prefix():
    # At least the path starts where the user must look.
    assert refused(parse_model, model_doc(data={"collection": "c", "key": 5})).field.startswith("data.key")


def test_wrong_key_type_names_exactly_data_key():
    assert refused(parse_model, model_doc(data={"collection": "c", "key": 5})).field == "data.key"


def test_unknown_top_level_field():
    error = refused(parse_model, model_doc(epochs=3))
    assert error.field == "epochs"
    assert "unknown field" in error.message


def test_unknown_request_field():
    assert refused(parse_request, request_doc(prompt="x")).field == "prompt"


@pytest.mark.parametrize("filter_", [
    {"$where": "this.a == 1"},
    {"$and": [{"a": 1}, {"$where": "sleep(1000)"}]},
    {"$or": [{"a": 1}, {"$and": [{"b": 2}, {"$where": "true"}]}]},
    {"$or": [{"$function": {"body": "function() {return true}", "args": [], "lang": "js"}}]},
    {"$expr": {"$function": {"body": "x", "args": [], "lang": "js"}}},
    {"items": {"$elemMatch": {"$where": "true"}}},
    {"$and": [{"$expr": {"$gt": [{"$accumulator": {}}, 1]}}]},
])
def test_server_javascript_refused_anywhere_in_the_filter(filter_):
    error = refused(parse_model, model_doc(data={"collection": "c", "filter": filter_}))
    assert error.field == "data.filter"
    assert "JavaScript" in error.message


@pytest.mark.parametrize("filter_", [{"$ne": None}, {"$gt": ""}, {"$or": [{"a": 1}, {"$exists": True}]},
                                     {"$nor": [{"$and": [{"$in": [1]}]}]}, {"$sampleRate": 0.5}, {"$or": []},
                                     {"$and": {"a": 1}}, {"$or": [1]}])
def test_a_filter_of_a_shape_every_server_refuses_is_refused_at_the_parse(filter_, db):
    """The server refuses these at each read (checked here on the real one): a collection request retried
    `{$ne: null}` until it failed as too many attempts; the parse names the field instead, wherever a document gives
    a filter."""
    with pytest.raises(OperationFailure):
        db.c.find_one(filter_)
    assert refused(parse_model, model_doc(data={"collection": "c", "filter": filter_})).field == "data.filter"
    request = request_doc(collection="c", filter=filter_, input="{title}", output_field="answer")
    assert refused(lambda d: parse_request(d, Limits(answer_collections=("*",))), request).field == "filter"


def test_plain_operators_allowed_in_the_filter(db):
    """What the parse lets through, the server runs (the real one, here)."""
    filter_ = {"$and": [{"lang": {"$in": ["en", "fr"]}}, {"$or": [{"n": {"$gt": 1}}, {"where": "$where"}]}],
               "$comment": "top-level operators the server takes", "$jsonSchema": {"required": ["lang"]},
               "$nor": [{"lang": "de"}]}
    assert parse_model(model_doc(data={"collection": "c", "filter": filter_})).data.filter == filter_
    db.c.find_one(filter_)


@pytest.mark.parametrize("section", ["model_kwargs", "tokenizer_kwargs"])
def test_trust_remote_code_refused(section):
    error = refused(parse_model, model_doc(**{section: {"trust_remote_code": True}}))
    assert error.field == f"{section}.trust_remote_code"
    assert "MONGOTUNE_TRUST_REMOTE_CODE" in error.message


def test_trust_remote_code_false_is_harmless():
    assert parse_model(model_doc(model_kwargs={"trust_remote_code": False})).model_kwargs.trust_remote_code is False


def test_operator_opt_in_allows_trust_remote_code():
    spec = parse_model(model_doc(model_kwargs={"trust_remote_code": True}), TRUSTING)
    assert spec.model_kwargs.trust_remote_code is True


@pytest.mark.parametrize("value", ["false", "0"])
def test_the_operator_can_turn_init_from_off(value):
    from listener.settings import Settings

    starting = model_doc(init_from={"model": "other", "checkpoint": "latest"})
    assert parse_model(starting).init_from.model == "other"
    off = Settings.load({}, {"MONGOTUNE_ALLOW_INIT_FROM": value}).limits
    assert off.allow_init_from is False and Settings.load({}, {}).limits.allow_init_from is True
    error = refused(lambda document: parse_model(document, off), starting)
    assert error.field == "init_from" and "MONGOTUNE_ALLOW_INIT_FROM=1" in error.message
    assert parse_model(model_doc(), off).init_from is None


@pytest.mark.parametrize("params, field", [
    ({"max_new_tokens": 0}, "params.max_new_tokens"),
    ({"max_new_tokens": CAPS.max_new_tokens + 1}, "params.max_new_tokens"),
    ({"max_new_tokens": "10"}, "params.max_new_tokens"),
    ({"top_p": 1.5}, "params.top_p"),
    ({"top_p": 0}, "params.top_p"),
    ({"temperature": 0}, "params.temperature"),
    ({"top_k": 0}, "params.top_k"),
    ({"do_sample": "yes"}, "params.do_sample"),
    ({"seed": 1}, "params.seed"),
])
def test_request_params_out_of_range(params, field):
    assert refused(parse_request, request_doc(params=params)).field == field


def test_max_new_tokens_cap_is_the_operator_one():
    parse_request(request_doc(params={"max_new_tokens": CAPS.max_new_tokens}))
    error = refused(parse_request, request_doc(params={"max_new_tokens": CAPS.max_new_tokens + 1}))
    assert str(CAPS.max_new_tokens) in error.message


@pytest.mark.parametrize("ref", ["worst", "", {"run": 0, "step": 1}, {"run": 1}, {"run": 1, "step": -1},
                                 {"run": 1, "step": 2, "extra": 3}, {"run": "1", "step": 2}, 5])
def test_bad_checkpoint_refs(ref):
    assert refused(parse_request, request_doc(checkpoint=ref)).field.startswith("checkpoint")


@pytest.mark.parametrize("ref", ["worst", {"run": 0, "step": 1}, {"run": 1}])
def test_bad_checkpoint_refs_name_a_real_field(ref):
    assert refused(parse_request, request_doc(checkpoint=ref)).field in {
        "checkpoint", "checkpoint.run", "checkpoint.step"}


@pytest.mark.parametrize("input_", ["", [], "x" * (CAPS.max_input_chars + 1)])
def test_empty_or_oversized_input(input_):
    error = refused(parse_request, request_doc(input=input_))
    assert error.field == "input"


def test_missing_input():
    doc = request_doc()
    del doc["input"]
    assert refused(parse_request, doc).field == "input"


@pytest.mark.parametrize("messages", [
    [{"role": "bot", "content": "hi"}],
    [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}],
    [{"role": "user"}],
    [{"role": "user", "content": 5}],
])
def test_messages_with_bad_shape_refused(messages):
    assert refused(parse_request, request_doc(input=messages)).field.startswith("input")


def test_message_with_bad_role_names_the_role():
    error = refused(parse_request, request_doc(input=[{"role": "bot", "content": "hi"}]))
    assert error.field == "input.0.role"
    assert "user" in error.message


def test_unknown_field_named_like_a_pydantic_internal():
    assert refused(parse_model, model_doc(**{"function-x": 1})).field == "function-x"


# --- property ------------------------------------------------------------------------------------

KNOWN = set(ModelSpec.model_fields) | {"_id"} | LISTENER_FIELDS
SAFE_KEYS = st.text(min_size=1, max_size=30).filter(
    lambda key: key not in KNOWN and not key.startswith(("function-", "json-or-python")))


@settings(max_examples=200, deadline=None, database=None)
@given(key=SAFE_KEYS, value=st.one_of(st.none(), st.integers(), st.text(max_size=5), st.booleans()))
def test_any_unknown_top_level_key_is_named(key, value):
    with pytest.raises(SpecError) as info:
        parse_model(model_doc(**{key: value}))
    assert info.value.field == key


# --- several nodes -------------------------------------------------------------------------------

def test_num_nodes_defaults_to_one_and_is_capped_by_the_operator():
    assert parse_model(model_doc()).trainer.num_nodes == 1
    assert parse_model(model_doc(trainer={"num_nodes": 2, "num_processes": 2})).trainer.num_nodes == 2
    error = refused(lambda d: parse_model(d, Limits(max_nodes=2)), model_doc(trainer={"num_nodes": 3}))
    assert error.field == "trainer.num_nodes" and "MONGOTUNE_MAX_NODES" in error.message
    assert refused(parse_model, model_doc(trainer={"num_nodes": 0})).field == "trainer.num_nodes"


@pytest.mark.parametrize("trainer", [{"deepspeed": {"zero_optimization": {"stage": 2}}}, {"fsdp": True}])
def test_sharded_training_runs_across_nodes(trainer):
    assert parse_model(model_doc(trainer={"num_nodes": 2, "num_processes": 2, **trainer})).trainer.num_nodes == 2


@pytest.mark.parametrize("field", ["master_addr", "master_port", "rdzv_endpoint", "node_rank", "nnodes"])
def test_a_document_never_names_a_rendezvous(field):
    for where in ({"trainer": {"num_nodes": 2, field: "10.0.0.9:29400"}},
                  {"trainer": {"num_nodes": 2, "training_kwargs": {field: 1}}}):
        assert refused(parse_model, model_doc(**where)).field.endswith(field)


def test_a_refusal_repeating_megabytes_of_the_writers_input_is_cut_to_fit_a_document():
    error = SpecError("data." + "k" * 3_000_000, "no document has " + "x" * 3_000_000)
    assert len(str(error)) < 5_000 and len(str(error.as_error())) < 5_000
    assert error.message.endswith("…(+2,998,016 chars)") and error.field.startswith("data.kkk")
