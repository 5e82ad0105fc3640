"""`method: "dpo" | "kto"`: preference runs on trl's own trainers, parsed, trained and recorded like SFT's."""

import dataclasses
import math
import signal

import pytest
from trl import DPOConfig, KTOConfig

from tests.conftest import finished, job_log, wait_for
from tests.test_cli import invoke
from tests.test_recovery import SHORT_LEASE, assert_gone, child_pid
from training import defaults
from training.arguments import resolved_arguments, to_config
from training.config import DPO_LOSSES, KTO_LOSSES, METHOD_ONLY, SpecError, TrainerSpec, parse_model
from training.config import DataSpec
from training.limits import Limits
from training.preferences import Skipped, check_documents, label, one_shape, read_datasets, to_row

TINY = "/models/tiny"
DPO_KEY, KTO_KEY = ["question", "good", "bad"], ["question", "answer", "thumb"]


def document(method=None, key=DPO_KEY, trainer=None, **extra) -> dict:
    return {"_id": "m", "model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "data": {"collection": "prefs", "key": key}, **({"method": method} if method else {}),
            **({"trainer": trainer} if trainer is not None else {}), **extra}


def refusal(doc: dict) -> SpecError:
    with pytest.raises(SpecError) as caught:
        parse_model(doc)
    return caught.value


# --- parse: method, data.key, trainer names -------------------------------------------------------------------

def test_method_is_sft_unless_given():
    assert parse_model(document(key="text")).method == "sft"
    assert parse_model(document("dpo")).method == "dpo"
    assert parse_model(document("kto", KTO_KEY)).method == "kto"
    assert refusal(document("ppo")).field == "method"


@pytest.mark.parametrize("method, key, field", [
    ("dpo", "text", "data.key"), ("dpo", ["prompt", "chosen"], "data.key"), ("kto", ["prompt", "completion"], "data.key"),
    ("kto", "messages", "data.key"), ("sft", DPO_KEY, "data.key"), ("dpo", ["prompt", "chosen", "rejected", "extra"],
                                                                    "data.key"),
    ("dpo", ["prompt", "", "rejected"], "data.key.1"),  # an empty name is named by its index
])
def test_a_data_key_of_the_wrong_length_for_the_method_is_refused_naming_it(method, key, field):
    assert refusal(document(method, key)).field == field


@pytest.mark.parametrize("field, value", [("template", "{question}"), ("transform", "chat_from_pairs")])
def test_a_template_or_transform_is_for_sft_only(field, value):
    doc = document("dpo")
    doc["data"][field] = value
    error = refusal(doc)
    assert error.field == f"data.{field}" and "sft only" in error.message


@pytest.mark.parametrize("method, name, value", [
    ("sft", "beta", 0.1), ("sft", "loss_type", "sigmoid"), ("sft", "precompute_ref_log_probs", True),
    ("dpo", "desirable_weight", 2.0), ("dpo", "undesirable_weight", 2.0), ("kto", "label_smoothing", 0.1),
    ("dpo", "packing", True), ("kto", "completion_only_loss", True), ("dpo", "assistant_only_loss", True),
    ("kto", "dataset_text_field", "text"), ("dpo", "padding_free", True), ("dpo", "label_smoothing_factor", 0.1),
])
def test_a_name_for_another_method_is_refused_naming_it(method, name, value):
    key = {"sft": "text", "dpo": DPO_KEY, "kto": KTO_KEY}[method]
    error = refusal(document(method, key, {name: value}))
    assert error.field == f"trainer.{name}" and f"method is {method!r}" in error.message
    nested = refusal(document(method, key, {"training_kwargs": {name: value}}))
    assert nested.field == f"trainer.training_kwargs.{name}"


@pytest.mark.parametrize("method, trainer", [
    ("dpo", {"beta": 0.5, "loss_type": "robust", "label_smoothing": 0.1, "precompute_ref_log_probs": True}),
    ("dpo", {"loss_type": ["sigmoid", "exo_pair"], "label_smoothing": 1e-3}),
    ("dpo", {"loss_type": ["sigmoid", "sft"]}),
    ("kto", {"beta": 100, "loss_type": "apo_zero_unpaired", "desirable_weight": 1.33, "undesirable_weight": 0.5,
             "per_device_train_batch_size": 1}),
])
def test_the_methods_own_names_are_accepted(method, trainer):
    spec = parse_model(document(method, DPO_KEY if method == "dpo" else KTO_KEY, trainer))
    assert spec.trainer.training_arguments() == trainer


@pytest.mark.parametrize("method, name, value", [
    ("dpo", "beta", 0), ("dpo", "beta", 100.5), ("kto", "beta", -1), ("dpo", "label_smoothing", 0.5),
    ("kto", "desirable_weight", 0), ("kto", "undesirable_weight", 101), ("dpo", "loss_type", "kto"),
    ("kto", "loss_type", "sigmoid"), ("kto", "loss_type", ["kto"]), ("dpo", "loss_type", ["sigmoid", "made_up"]),
    ("dpo", "loss_type", "made_up"), ("dpo", "precompute_ref_log_probs", "yes"),
])
def test_preference_names_are_bounded(method, name, value):
    error = refusal(document(method, DPO_KEY if method == "dpo" else KTO_KEY, {name: value}))
    assert error.field.split(".")[:2] == ["trainer", name]  # a list's item is named by its index


@pytest.mark.parametrize("trainer", [{"num_processes": 2}, {"deepspeed": {"zero_optimization": {"stage": 3}}},
                                     {"num_processes": 2, "fsdp": True, "fsdp_config": {"version": 2}}])
def test_preference_runs_take_the_launchers_settings(trainer):
    assert parse_model(document("dpo", DPO_KEY, trainer)).trainer.training_arguments() == {
        k: v for k, v in trainer.items() if k not in ("num_processes", "deepspeed")}


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_rows_of_several_sequences_are_not_grouped_by_length(method):
    error = refusal(document(method, DPO_KEY if method == "dpo" else KTO_KEY,
                             {"train_sampling_strategy": "group_by_length"}))
    assert error.field == "trainer.train_sampling_strategy" and "no single length" in error.message


def test_kto_has_no_token_accuracy_to_pick_its_best_checkpoint_by():
    assert refusal(document("kto", KTO_KEY, {"metric_for_best_model": "eval_mean_token_accuracy"})).field == \
        "trainer.metric_for_best_model"
    assert parse_model(document("dpo", DPO_KEY, {"metric_for_best_model": "eval_mean_token_accuracy"}))


def test_kto_needs_batches_of_two_in_a_fixed_order_for_its_kl_term():
    assert refusal(document("kto", KTO_KEY, {"per_device_train_batch_size": 1})).field == \
        "trainer.per_device_train_batch_size"
    assert refusal(document("kto", KTO_KEY, {"train_sampling_strategy": "random"})).field == \
        "trainer.train_sampling_strategy"


def test_every_preference_name_is_a_field_of_the_trainers_config_and_the_loss_lists_match_trl():
    fields = {"dpo": {f.name for f in dataclasses.fields(DPOConfig)}, "kto": {f.name for f in dataclasses.fields(KTOConfig)}}
    for name, methods in METHOD_ONLY.items():
        for method in set(methods) - {"sft"}:
            assert name in fields[method], (name, method)
    assert set(KTO_LOSSES) == set(KTOConfig.__dataclass_fields__["loss_type"].metadata["choices"])
    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    assert all(f"'{loss}'" in help_text for loss in DPO_LOSSES)


@pytest.mark.parametrize("loss", [[], ["sigmoid"] * 100_000, ["ipo", "sigmoid", "ipo"]])
def test_a_loss_type_list_holds_one_to_all_distinct_losses(loss):
    """An empty list makes trl sum no loss; copies are each computed at every step and copied into the run's entry."""
    assert refusal(document("dpo", trainer={"loss_type": loss})).field == "trainer.loss_type"


@pytest.mark.parametrize("loss", ["exo_pair", ["sigmoid", "exo_pair"]])
def test_exo_pair_needs_a_positive_label_smoothing_as_trl_does(loss):
    assert refusal(document("dpo", trainer={"loss_type": loss})).field == "trainer.label_smoothing"
    assert refusal(document("dpo", trainer={"loss_type": loss, "label_smoothing": 0})).field == \
        "trainer.label_smoothing"


@pytest.mark.parametrize("loss", [None, "sigmoid", "ipo", "hinge", ["sigmoid", "sft"]])
def test_label_smoothing_with_a_loss_that_ignores_it_is_refused(loss):
    """trl 1.16 reads it only for exo_pair, robust, aot and aot_unpaired: never silently dropped."""
    trainer = {"label_smoothing": 0.2, **({"loss_type": loss} if loss else {})}
    assert refusal(document("dpo", trainer=trainer)).field == "trainer.label_smoothing"


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_a_beta_whose_inverse_overflows_is_refused(method):
    """IPO's 1/(2*beta) at beta 1e-300 is inf in float32, which turns the adapter's weights into NaN."""
    assert refusal(document(method, DPO_KEY if method == "dpo" else KTO_KEY, {"beta": 1e-300})).field == "trainer.beta"
    assert parse_model(document(method, DPO_KEY if method == "dpo" else KTO_KEY, {"beta": 1e-3}))


@pytest.mark.parametrize("method, name, value", [("dpo", "loss_type", "kto"), ("kto", "per_device_train_batch_size", 1),
                                                 ("dpo", "label_smoothing", 0.1)])
def test_a_refusal_of_a_training_kwargs_name_names_it_there(method, name, value):
    key = DPO_KEY if method == "dpo" else KTO_KEY
    assert refusal(document(method, key, {"training_kwargs": {name: value}})).field == f"trainer.training_kwargs.{name}"


def test_megabytes_of_key_names_are_refused_naming_the_key():
    """Skip reasons and errors quote the names, so a run would write megabytes of them; the write-time validator,
    generated from the same bound, refuses them too (tests/test_schema.py)."""
    error = refusal(document("dpo", [letter * 3_000_000 for letter in "xyz"]))
    assert error.field == "data.key.0" and len(str(error.as_error())) < 5_000


# --- arguments: each method's trl configuration ---------------------------------------------------------------

def test_a_dpo_run_gets_a_dpo_config_without_sfts_batch_arrangement(tmp_path):
    spec = TrainerSpec(beta=0.2, loss_type=["sigmoid", "sft"], per_device_train_batch_size=4)
    resolved = resolved_arguments(spec, str(tmp_path), has_eval=False, use_cpu=True, method="dpo")
    assert "padding_free" not in resolved and "train_sampling_strategy" not in resolved
    config = to_config("dpo", resolved)
    assert isinstance(config, DPOConfig) and config.beta == 0.2 and config.loss_type == ["sigmoid", "sft"]


def test_a_kto_run_keeps_trls_sequential_order(tmp_path):
    spec = TrainerSpec(desirable_weight=2.0, per_device_train_batch_size=4)
    config = to_config("kto", resolved_arguments(spec, str(tmp_path), has_eval=False, use_cpu=True, method="kto"))
    assert isinstance(config, KTOConfig) and config.train_sampling_strategy == "sequential"
    assert config.desirable_weight == 2.0


# --- rows: the method's shape, or skipped -------------------------------------------------------------------

def test_a_dpo_row_reads_the_named_fields_as_text_or_chat():
    assert to_row({"question": "q", "good": "a", "bad": "b"}, "dpo", DPO_KEY) == \
        {"prompt": "q", "chosen": "a", "rejected": "b"}
    chat = [{"role": "user", "content": "q", "extra": 1}]
    row = to_row({"question": chat, "good": "a", "bad": "b"}, "dpo", DPO_KEY)
    assert row["prompt"] == [{"role": "user", "content": "q"}]
    assert one_shape([row, {"prompt": "p", "chosen": "c", "rejected": "r"}])[1] == {
        "prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "assistant", "content": "c"}],
        "rejected": [{"role": "assistant", "content": "r"}]}


@pytest.mark.parametrize("doc, reason", [
    ({"question": "q", "good": "a"}, "no field 'bad'"),
    ({"question": "q", "good": "a", "bad": 3}, "field 'bad' is neither"),
    ({"question": "  ", "good": "a", "bad": "b"}, "field 'question' is neither"),
    ({"question": "q", "good": "a", "bad": [{"role": "wizard", "content": "x"}]}, "field 'bad' is neither"),
    ({"question": "q", "good": "same", "bad": "same"}, "chosen and rejected are the same"),
])
def test_a_document_not_of_the_dpo_shape_is_skipped_with_its_reason(doc, reason):
    with pytest.raises(Skipped, match=reason):
        to_row(doc, "dpo", DPO_KEY)


@pytest.mark.parametrize("value, good", [(True, True), (False, False), (1, True), (-1, False), (0.25, True),
                                         (-3.5, False)])
def test_a_kto_label_is_a_bool_or_the_sign_of_a_number(value, good):
    assert label(value) is good
    assert to_row({"question": "q", "answer": "a", "thumb": value}, "kto", KTO_KEY)["label"] is good


@pytest.mark.parametrize("value", [0, 0.0, math.nan, math.inf, "up", None, [1]])
def test_a_kto_label_without_a_sign_is_skipped(value):
    with pytest.raises(Skipped):
        to_row({"question": "q", "answer": "a", "thumb": value}, "kto", KTO_KEY)


def test_the_dataset_holds_the_usable_rows_and_the_read_counts_the_skipped(db):
    chat = [{"role": "user", "content": "hello"}]
    db["prefs"].insert_many([{"_id": n, "question": f"q{n}", "good": "yes", "bad": "no"} for n in range(11)]
                            + [{"_id": 11, "question": chat, "good": "yes", "bad": "no"},
                               {"_id": 12, "question": "q", "good": "yes"}, {"_id": 13, "question": "q", "good": 1,
                                                                           "bad": "no"}])
    data = DataSpec(collection="prefs", key=DPO_KEY)
    train, valid, read = read_datasets(db, data, "dpo", Limits())
    assert len(train) + len(valid) == 12 and len(valid) == 1  # the seeded 10% of the usable rows
    assert all(isinstance(row["prompt"], list) for row in train)  # one chat row makes every row chat
    assert read["count"] == 14 and read["first_id"] == 0 and read["last_id"] == 13
    assert read["skipped"] == {"count": 2, "reasons": [
        {"reason": "no field 'bad'", "count": 1},
        {"reason": "field 'good' is neither non-empty text nor a list of {role, content} messages", "count": 1}]}
    assert check_documents(db, data, "dpo", Limits()) == 14


def test_too_few_usable_rows_are_refused_with_the_fields_the_documents_have(db):
    db["prefs"].insert_many([{"question": "q", "answer": "a", "rating": 1}, {"question": "q", "answer": "a"}])
    data = DataSpec(collection="prefs", key=KTO_KEY)
    for read in (lambda: read_datasets(db, data, "kto", Limits()), lambda: check_documents(db, data, "kto", Limits())):
        with pytest.raises(SpecError) as caught:
            read()
        error = caught.value
        assert error.field == "data.key" and "only 0 of 2 selected documents are usable for method kto" in error.message
        assert "2 with no field 'thumb'" in error.message and "the documents have fields" in error.message


def test_the_dry_run_refuses_what_the_run_refuses_when_the_usable_rows_are_held_out(db):
    """Usable rows the fold field puts in the valid fold do not train: the dry run counts what the run counts."""
    db["prefs"].insert_many([{"question": "q", "good": "a", "bad": "b", "_fold": fold}
                             for fold in ("train", "valid", "valid")])
    data = DataSpec(collection="prefs", key=DPO_KEY)
    for read in (lambda: read_datasets(db, data, "dpo", Limits()), lambda: check_documents(db, data, "dpo", Limits())):
        with pytest.raises(SpecError) as caught:
            read()
        assert caught.value.field == "data.key" and "3 of 3 selected documents are usable" in caught.value.message
        assert "1 of them in the training fold" in caught.value.message


def test_a_text_answer_and_its_chat_twin_are_skipped_as_the_same():
    """trl sees one shape, in which the two are identical."""
    doc = {"q": "hi", "g": "ahoy", "b": [{"role": "assistant", "content": "ahoy"}]}
    with pytest.raises(Skipped, match="the same"):
        to_row(doc, "dpo", ["q", "g", "b"])


@pytest.mark.parametrize("method, doc", [
    ("dpo", {"q": [{"role": "user", "content": "hi"}], "g": "a", "b": "b"}),
    ("kto", {"q": "hi", "g": [{"role": "assistant", "content": "a"}], "b": True}),
])
def test_chat_rows_are_skipped_for_a_model_without_a_chat_template(method, doc):
    assert to_row(doc, method, ["q", "g", "b"])
    with pytest.raises(Skipped, match="no chat template"):
        to_row(doc, method, ["q", "g", "b"], chat=False)


# --- runs through a daemon ------------------------------------------------------------------------------------

PROMPTS = [f"what is {n} plus one" for n in range(24)]
CHOSEN, REJECTED = "ahoy matey", "the sea be blue"
# Enough steps at a high learning rate for the tiny model to learn one fixed preference (a few seconds).
PREFERENCE_TRAINER = {"max_steps": 12, "per_device_train_batch_size": 8, "learning_rate": 5e-3, "logging_steps": 1,
                      "max_seq_length": 64}


def preference_model(doc_id, path, method, collection, trainer=PREFERENCE_TRAINER, **extra) -> dict:
    return {"_id": doc_id, "model_name_or_path": path, "method": method,
            "data": {"collection": collection, "key": DPO_KEY if method == "dpo" else KTO_KEY},
            "trainer": dict(trainer), **extra}


def logged(document: dict, name: str) -> list:
    return [m[name] for m in document["metrics"] if name in m]


def test_a_dpo_run_learns_the_preference_and_records_it(module_db, module_daemon, tiny_model_path, server_uri):
    module_db["pairs"].insert_many([{"question": p, "good": CHOSEN, "bad": REJECTED} for p in PROMPTS])
    models = module_db[defaults.MODELS]
    models.insert_one(preference_model("dpo", tiny_model_path, "dpo", "pairs"))
    done = wait_for(models, "dpo", finished, timeout_s=600)
    assert done["status"] == "succeeded", done.get("error")
    accuracies, margins = logged(done, "rewards/accuracies"), logged(done, "rewards/margins")
    assert logged(done, "rewards/chosen") and logged(done, "rewards/rejected")
    # The policy starts as its reference (every reward 0): by the end it ranks chosen over rejected.
    assert accuracies[0] < accuracies[-1] == 1.0 and margins[-1] > margins[0]
    run = done["runs"][0]
    assert run["method"] == "dpo" and run["reference"]["model"] == "base" and run["data"]["skipped"]["count"] == 0
    assert run["outcome"] == "succeeded"
    # The gate scores its held-out pairs against the base: before (the base itself, every reward 0) and after.
    gate = run["promotion"]
    assert gate["promoted"] and gate["reason"] == "no earlier checkpoint serves" and gate["pairs"] >= 2
    before, after = gate["scores"]["base"], gate["scores"]["candidate"]
    assert after["preference_accuracy"] == 1.0 and after["reward_margin"] > 0
    assert gate["pairs"] == gate["documents"] and math.isfinite(after["eval_loss"])
    assert after["eval_loss"] != before["eval_loss"] and before["tokens"] == after["tokens"] > 0
    assert "preference_accuracy" not in before  # the base's rewards are all 0 by definition: nothing measured
    shown = invoke(server_uri, module_db, "logs", "dpo")
    assert shown.exit_code == 0 and f"accuracy 1 margin {margins[-1]:.4g} (step 12)" in shown.output, shown.output

    # A retrain starts from the serving adapter, which is then its frozen reference; the SFT gate does not apply.
    models.update_one({"_id": "dpo"}, {"$set": {"status": "pending"}})
    again = wait_for(models, "dpo", lambda d: d.get("run") == 2 and finished(d), timeout_s=600)
    assert again["status"] == "succeeded", again.get("error")
    second = again["runs"][1]
    assert second["init_from"] == {"model": "dpo", "run": 1, "step": done["best_checkpoint"]["step"]}
    assert second["reference"] == {"model": "start", "adapter": second["init_from"],
                                   "how": "a frozen copy of the adapter the run starts from (trl's 'ref' adapter)"}
    # Its gate scores it against the serving checkpoint, on its own held-out pairs, against the same base.
    gate = second["promotion"]
    assert gate["serving"] == done["best_checkpoint"] and gate["metric"] == "preference_accuracy"
    assert gate["scores"]["serving"]["tokens"] == gate["scores"]["candidate"]["tokens"] > 0 and gate["pairs"] >= 2
    assert gate["score"] == gate["scores"]["candidate"]["preference_accuracy"] and gate["max_eval_loss_rise"] == 0.05
    assert again["best_checkpoint"] == (gate["checkpoint"] if gate["promoted"] else done["best_checkpoint"]), gate
    served = "forgot" not in gate["reason"] and ("at least" in gate["reason"] or "allows not worse" in gate["reason"])
    assert gate["promoted"] == served, gate
    second_margins = [m["rewards/margins"] for m in again["metrics"] if m.get("run") == 2 and "rewards/margins" in m]
    assert second_margins[0] == 0  # each run compares against where it started: its first step's rewards are 0
    # Its adapter serves like an SFT run's (the frozen 'ref' copy trl saved beside it is never stored).
    module_db[defaults.REQUESTS].insert_one({"_id": "ask_dpo", "model": "dpo", "input": PROMPTS[0],
                                             "params": {"max_new_tokens": 3}})
    answer = wait_for(module_db[defaults.REQUESTS], "ask_dpo", finished, timeout_s=300)
    assert answer["status"] == "done" and answer["checkpoint_used"] == again["best_checkpoint"], answer.get("error")


def test_a_kto_run_in_two_processes_trains_on_thumbs_and_skips_what_is_not_one(module_db, module_daemon, tiny_model_path):
    thumbs = [{"question": p, "answer": CHOSEN if n % 2 else REJECTED, "thumb": 1 if n % 2 else -1}
              for n, p in enumerate(PROMPTS)]
    malformed = [{"question": "q", "answer": "a", "thumb": 0}, {"question": "q", "answer": 5, "thumb": True},
                 {"question": "q", "thumb": True}]
    module_db["thumbs"].insert_many(thumbs + malformed)
    models = module_db[defaults.MODELS]
    # In two processes through torchrun: KTO's KL term is estimated within each rank's batch.
    models.insert_one(preference_model("kto", tiny_model_path, "kto", "thumbs",
                                       {**PREFERENCE_TRAINER, "per_device_train_batch_size": 4, "num_processes": 2}))
    done = wait_for(models, "kto", finished, timeout_s=600)
    assert done["status"] == "succeeded", done.get("error")
    assert logged(done, "kl") and logged(done, "rewards/chosen") and logged(done, "rewards/rejected")
    assert logged(done, "rewards/margins")[-1] > 0
    skipped = done["runs"][0]["data"]["skipped"]
    assert skipped["count"] == 3 and {r["reason"] for r in skipped["reasons"]} == {
        "label is neither a bool nor a nonzero number", "no field 'answer'",
        "field 'answer' is neither non-empty text nor a list of {role, content} messages"}
    assert done["runs"][0]["data"]["count"] == 27
    assert done["runs"][0]["host"]["world_size"] == 2
    # Its gate scores the held-out examples by the sign of their rewards, before (the base) and after.
    gate = done["runs"][0]["promotion"]
    before, after = gate["scores"]["base"], gate["scores"]["candidate"]
    assert gate["promoted"] and gate["examples"] >= 2 and after["preference_accuracy"] > 0, gate
    assert math.isfinite(after["eval_loss"]) and after["eval_loss"] != before["eval_loss"]


def test_too_few_usable_rows_fail_naming_the_key(module_db, module_daemon, tiny_model_path):
    module_db["few"].insert_many([{"question": "q", "good": "a", "bad": "b"}, {"question": "q", "good": "a"},
                                  {"question": "q", "good": "a", "bad": "a"}])
    models = module_db[defaults.MODELS]
    models.insert_one(preference_model("few", tiny_model_path, "dpo", "few"))
    failed = wait_for(models, "few", finished, timeout_s=300)
    assert failed["status"] == "failed" and failed["error"]["field"] == "data.key"
    assert "only 1 of 3 selected documents are usable for method dpo" in failed["error"]["message"]
    assert "no field 'bad'" in failed["error"]["message"]


LONG_PROMPT = "what is the capital of france matey " * 40  # well over max_length 64 tokens


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_rows_all_truncated_away_fail_naming_max_length(module_db, module_daemon, tiny_model_path, method):
    """trl drops each row whose prompt alone fills max_length: a run left with none fails naming it, instead of
    'succeeding' after 0 steps (kto) or failing with torch's num_samples=0 (dpo)."""
    collection = f"long_{method}"
    if method == "dpo":
        rows = [{"question": f"{LONG_PROMPT} {n}", "good": CHOSEN, "bad": REJECTED} for n in range(8)]
    else:
        rows = [{"question": f"{LONG_PROMPT} {n}", "answer": CHOSEN, "thumb": 1 if n % 2 else -1} for n in range(8)]
    module_db[collection].insert_many(rows)
    models = module_db[defaults.MODELS]
    trainer = {"max_steps": 4, "per_device_train_batch_size": 2, "max_seq_length": 64, "logging_steps": 1}
    models.insert_one(preference_model(collection, tiny_model_path, method, collection, trainer))
    done = wait_for(models, collection, finished, timeout_s=600)
    assert done["status"] == "failed" and done["error"]["field"] == "trainer.max_seq_length", done.get("error")
    assert not done.get("checkpoints")


@pytest.mark.parametrize("method", ["dpo", "sft"])
def test_fewer_rows_than_a_dropped_last_batch_fail_naming_the_batch_size(module_db, module_daemon, tiny_model_path,
                                                                           method):
    collection = f"few_dropped_{method}"
    module_db[collection].insert_many([{"question": f"what is {n}", "good": CHOSEN, "bad": REJECTED}
                                       for n in range(6)])
    models = module_db[defaults.MODELS]
    trainer = {"max_steps": 3, "per_device_train_batch_size": 8, "dataloader_drop_last": True, "max_seq_length": 64}
    doc = preference_model(collection, tiny_model_path, method, collection, trainer)
    if method == "sft":
        doc["data"]["key"] = ["question", "good"]
    models.insert_one(doc)
    done = wait_for(models, collection, finished, timeout_s=600)
    assert done["status"] == "failed", (done["status"], done.get("progress"))
    assert done["error"]["field"] == "trainer.per_device_train_batch_size", done["error"]


def _poison(db, model_id, entry: dict, work) -> None:
    """The stored checkpoint `entry` of `model_id`, replaced by one whose adapter weights are NaN."""
    import torch
    from safetensors.torch import load_file, save_file

    from training import checkpoints

    folder = checkpoints.download(db, entry["files_id"], work / "poisoned")
    weights = folder / "adapter_model.safetensors"
    save_file({name: torch.full_like(t, math.nan) for name, t in load_file(str(weights)).items()}, str(weights))
    stored = checkpoints.upload(db, folder, model_id=model_id, run=entry["run"], step=entry["step"])
    db[defaults.MODELS].update_one({"_id": model_id}, {"$set": {"checkpoints.$[c].files_id": stored["files_id"]}},
                                   array_filters=[{"c.files_id": entry["files_id"]}])


def test_a_run_whose_weights_go_nan_fails_and_stores_nothing_to_serve(module_db, module_daemon, tiny_model_path,
                                                                       tmp_path):
    """A retrain from a serving adapter gone NaN trains NaN weights: no checkpoint of the run is stored, the run
    fails naming what to change, and what served before still does."""
    module_db["nan_weights"].insert_many([{"question": f"what is {n} plus one", "good": CHOSEN, "bad": REJECTED}
                                          for n in range(16)])
    models = module_db[defaults.MODELS]
    trainer = {"max_steps": 2, "per_device_train_batch_size": 8, "max_seq_length": 64}
    models.insert_one(preference_model("nan_weights", tiny_model_path, "dpo", "nan_weights", trainer))
    first = wait_for(models, "nan_weights", finished, timeout_s=600)
    assert first["status"] == "succeeded", first.get("error")
    best = first["best_checkpoint"]
    _poison(module_db, "nan_weights", next(c for c in first["checkpoints"] if c["step"] == best["step"]), tmp_path)
    models.update_one({"_id": "nan_weights"}, {"$set": {"status": "pending"}})
    again = wait_for(models, "nan_weights", lambda d: d.get("run") == 2 and finished(d), timeout_s=600)
    assert again["status"] == "failed" and again["error"]["field"] == "trainer.learning_rate", again.get("error")
    assert "NaN or inf" in again["error"]["message"] and again["best_checkpoint"] == best
    assert [c["run"] for c in again["checkpoints"]] == [1]


def test_a_checkpoint_whose_weights_are_not_all_finite_is_found(tmp_path):
    import torch
    from safetensors.torch import save_file

    from training.checkpoints import nonfinite

    save_file({"a": torch.ones(3), "b": torch.zeros(2)}, str(tmp_path / "adapter_model.safetensors"))
    assert nonfinite(tmp_path) is None
    save_file({"a": torch.ones(3), "b": torch.tensor([0.0, math.nan])}, str(tmp_path / "adapter_model.safetensors"))
    assert nonfinite(tmp_path) == "b"
    save_file({"c": torch.tensor([math.inf])}, str(tmp_path / "adapter_model.safetensors"))
    assert nonfinite(tmp_path) == "c"


def _without_chat_template(tiny: str, root) -> str:
    """A copy of the tiny model whose tokenizer has no chat template, as a base (not instruct) model's has none."""
    import json
    import shutil

    folder = root / "tiny_no_chat"
    if not folder.exists():
        shutil.copytree(tiny, folder)
        (folder / "chat_template.jinja").unlink(missing_ok=True)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


def test_chat_rows_on_a_model_without_a_chat_template_are_skipped_or_fail_naming_the_key(module_db, module_daemon,
                                                                                        tiny_model_path, model_root):
    """One chat row among text pairs (anyone writing the collection can add it) would make every row chat, which
    this tokenizer cannot render: it is skipped and counted; a collection of chat rows only fails naming data.key."""
    path = _without_chat_template(tiny_model_path, model_root)
    chat = {"question": [{"role": "user", "content": "hi"}], "good": CHOSEN, "bad": REJECTED}
    module_db["one_chat"].insert_many([{"question": f"what is {n} plus one", "good": CHOSEN, "bad": REJECTED}
                                       for n in range(16)] + [dict(chat)])
    module_db["all_chat"].insert_many([dict(chat, n=n) for n in range(4)])
    models = module_db[defaults.MODELS]
    trainer = {"max_steps": 2, "per_device_train_batch_size": 4, "max_seq_length": 64}
    models.insert_many([preference_model(name, path, "dpo", name, trainer) for name in ("one_chat", "all_chat")])
    done = wait_for(models, "one_chat", finished, timeout_s=600)
    assert done["status"] == "succeeded", done.get("error")
    assert done["runs"][0]["data"]["skipped"]["reasons"] == [
        {"reason": "chat messages, and the model's tokenizer has no chat template to render them", "count": 1}]
    failed = wait_for(models, "all_chat", finished, timeout_s=600)
    assert failed["status"] == "failed" and failed["error"]["field"] == "data.key"
    assert "no chat template" in failed["error"]["message"]


LONG_PREFERENCE = {**PREFERENCE_TRAINER, "max_steps": 30, "per_device_train_batch_size": 4, "save_steps": 5}


def test_a_dpo_run_cancelled_midway_stops_after_a_checkpoint(module_db, module_daemon, tiny_model_path):
    module_db["pairs_cancel"].insert_many([{"question": p, "good": CHOSEN, "bad": REJECTED} for p in PROMPTS])
    models = module_db[defaults.MODELS]
    models.insert_one(preference_model("dpo_cancel", tiny_model_path, "dpo", "pairs_cancel", LONG_PREFERENCE))
    wait_for(models, "dpo_cancel", lambda d: (d.get("progress") or {}).get("step", 0) >= 2, timeout_s=300)
    models.update_one({"_id": "dpo_cancel"}, {"$set": {"cancel": True}})
    done = wait_for(models, "dpo_cancel", finished, timeout_s=300)
    assert done["status"] == "cancelled" and done["checkpoints"]
    assert done["checkpoints"][-1]["step"] < LONG_PREFERENCE["max_steps"]


def test_a_dpo_run_killed_midway_resumes_from_its_checkpoint(db, start_daemon, tiny_model_path, tmp_path):
    db["pairs"].insert_many([{"question": p, "good": CHOSEN, "bad": REJECTED} for p in PROMPTS])
    models = db[defaults.MODELS]
    victim = start_daemon("victim", env=SHORT_LEASE)
    models.insert_one(preference_model("long", tiny_model_path, "dpo", "pairs", LONG_PREFERENCE))
    wait_for(models, "long", lambda d: len(d.get("checkpoints") or []) >= 1, timeout_s=300)
    victim.stop(signal.SIGKILL)
    assert_gone(child_pid(victim))
    saved = models.find_one({"_id": "long"})["checkpoints"][-1]["step"]

    start_daemon("survivor", env=SHORT_LEASE)
    done = wait_for(models, "long", finished, timeout_s=600)
    assert done["status"] == "succeeded", done.get("error")
    assert done["attempts"] == 2 and done["checkpoints"][-1]["step"] == LONG_PREFERENCE["max_steps"]
    steps = [m["step"] for m in done["metrics"] if "rewards/margins" in m]
    assert steps.count(1) == 1, "step 1 was trained once: the second attempt resumed"
    assert "resuming run 1 from its checkpoint at step" in job_log(tmp_path)
    resumed = min(c["step"] for c in done["checkpoints"] if c["step"] >= saved)
    assert min(s for s in steps if s > resumed) == resumed + 1


def test_a_dpo_run_on_a_4_bit_base_trains(module_db, module_daemon, tiny_model_path):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs the qlora extra: pip install 'mongotune[qlora]'")
    module_db["pairs_bits"].insert_many([{"question": p, "good": CHOSEN, "bad": REJECTED} for p in PROMPTS[:8]])
    models = module_db[defaults.MODELS]
    models.insert_one(preference_model("dpo_bits", tiny_model_path, "dpo", "pairs_bits",
                                       {**PREFERENCE_TRAINER, "max_steps": 3, "per_device_train_batch_size": 4,
                                        "bits": 4}))
    done = wait_for(models, "dpo_bits", finished, timeout_s=300)
    assert done["status"] == "succeeded", done.get("error")
    assert done["checkpoints"][-1]["step"] == 3 and logged(done, "rewards/margins")


def test_a_full_fine_tuning_dpo_run_compares_against_a_second_copy_of_the_base(module_db, module_daemon,
                                                                               tiny_model_path):
    module_db["pairs_full"].insert_many([{"question": p, "good": CHOSEN, "bad": REJECTED} for p in PROMPTS[:8]])
    models = module_db[defaults.MODELS]
    models.insert_one(preference_model("dpo_full", tiny_model_path, "dpo", "pairs_full",
                                       {**PREFERENCE_TRAINER, "max_steps": 3, "per_device_train_batch_size": 4,
                                        "use_lora": False}))
    done = wait_for(models, "dpo_full", finished, timeout_s=300)
    assert done["status"] == "succeeded", done.get("error")
    assert done["runs"][0]["reference"] == {"model": "base",
                                            "how": "a second, frozen copy of the base model (full fine-tuning)"}
    assert logged(done, "rewards/margins")


def test_a_dpo_run_under_deepspeed_zero_3_in_two_processes_trains(module_db, module_daemon, tiny_model_path):
    module_db["pairs_zero"].insert_many([{"question": p, "good": CHOSEN, "bad": REJECTED} for p in PROMPTS])
    models = module_db[defaults.MODELS]
    models.insert_one(preference_model("dpo_zero", tiny_model_path, "dpo", "pairs_zero",
                                       {**PREFERENCE_TRAINER, "per_device_train_batch_size": 4, "num_processes": 2,
                                        "deepspeed": {"zero_optimization": {"stage": 3}}}))
    done = wait_for(models, "dpo_zero", finished, timeout_s=600)
    assert done["status"] == "succeeded", done.get("error")
    assert done["runs"][0]["host"]["world_size"] == 2 and logged(done, "rewards/accuracies")[-1] == 1.0
    gate = done["runs"][0]["promotion"]  # scored by rank 0 alone, on the base unpartitioned
    assert gate["pairs"] >= 2 and gate["scores"]["candidate"]["eval_loss"] > 0
