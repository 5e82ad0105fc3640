"""The promotion gate's rules, best-checkpoint ranking and run-local pruning, and the fields they read."""

import pytest

from training import defaults
from training.checkpoints import best_of, ranking, to_prune
from training.config import SpecError, parse_model
from training.limits import Limits
from training.promotion import conclude, decide, judge, serving_ref


def entry(run, step, **metrics):
    return {"run": run, "step": step, "metrics": metrics}


@pytest.mark.parametrize("metric, min_delta, new, serving, promoted, reason", [
    ("eval_loss", 0, 1.0, 1.0, True, "eval_loss equal to the serving checkpoint's (1); min_delta 0 allows not worse"),
    ("eval_loss", 0.1, 1.0, 1.0, False,
     "eval_loss equal to the serving checkpoint's (1); min_delta 0.1 asks for better"),
    ("eval_loss", 0, 1.1, 1.0, False, "eval_loss worse by 0.1 (1.1 against 1)"),
    ("eval_loss", 0.5, 0.7, 1.0, False, "eval_loss better by 0.3 (0.7 against 1), less than min_delta 0.5"),
    ("eval_loss", 0.5, 0.4, 1.0, True, "eval_loss better by 0.6 (0.4 against 1), at least min_delta 0.5"),
    ("eval_perplexity", 0, 2.0, 3.0, True, "eval_perplexity better by 1 (2 against 3), at least min_delta 0"),
    ("eval_mean_token_accuracy", 0, 0.6, 0.5, True,  # higher is better
     "eval_mean_token_accuracy better by 0.1 (0.6 against 0.5), at least min_delta 0"),
    ("eval_mean_token_accuracy", 0, 0.4, 0.5, False, "eval_mean_token_accuracy worse by 0.1 (0.4 against 0.5)"),
    ("eval_perplexity", 0, None, 3.0, False, "eval_perplexity could not be computed for both checkpoints "
                                             "(the loss overflows): kept"),
])
def test_decide_says_why_in_words(metric, min_delta, new, serving, promoted, reason):
    assert decide(metric, min_delta, new, serving) == (promoted, reason)


@pytest.mark.parametrize("promotion, serving, reason", [
    ({"promotion": False}, {"run": 1, "step": 2}, "promotion is false: every finished run serves"),
    ({}, None, "no earlier checkpoint serves"),
    ({}, {"run": 1, "step": 2}, "this run has no held-out documents to compare on"),
])
def test_a_preference_run_serves_without_a_gate_or_held_out_rows(promotion, serving, reason):
    """As an SFT run does; nothing is loaded for it."""
    spec = parse_model({"_id": "m", "model_name_or_path": "m", "method": "dpo", **promotion,
                        "data": {"collection": "c", "key": ["q", "good", "bad"]}})
    decision = judge(None, spec, {"run": 2, "step": 4}, serving, None, None, None)
    assert decision == {"promoted": True, "checkpoint": {"run": 2, "step": 4}, "reason": reason}


def test_ranking_reads_the_trainer_arguments_as_transformers_does():
    assert ranking(None, None) == ("eval_loss", False)
    assert ranking("loss", None) == ("eval_loss", False)
    assert ranking("mean_token_accuracy", None) == ("eval_mean_token_accuracy", True)
    assert ranking("eval_loss", True) == ("eval_loss", True)


def test_best_of_follows_the_metric_and_its_direction():
    listed = [entry(1, 1, eval_loss=0.5, eval_mean_token_accuracy=0.2),
              entry(1, 2, eval_loss=0.9, eval_mean_token_accuracy=0.7)]
    assert best_of(listed) is listed[0]
    assert best_of(listed, "eval_mean_token_accuracy", True) is listed[1]


def test_pruning_keeps_the_runs_own_best_and_never_touches_an_earlier_run():
    listed = [entry(1, 2, eval_loss=0.1), entry(2, 2, eval_loss=0.5), entry(2, 4, eval_loss=0.9),
              entry(2, 6, eval_loss=0.8)]
    assert [(c["run"], c["step"]) for c in to_prune(listed, run=2, keep=1)] == [(2, 4)]


def test_a_run_that_stored_no_checkpoint_fails_and_never_succeeds(db, tmp_path):
    """Whatever kept a run from saving (save_strategy "no" is refused at parse), a run that trained to its end with
    no checkpoint of its own has nothing to serve: its end fails naming the setting, an earlier run's aside."""
    spec = parse_model({"_id": "m", "model_name_or_path": "org/model", "data": {"collection": "c"}})
    db[defaults.MODELS].insert_one({"_id": "m", "run": 2, "checkpoints": [entry(1, 4, eval_loss=1.0)]})
    with pytest.raises(SpecError) as info:
        conclude(db, {"_id": "m"}, spec, 2, None, None, tmp_path, Limits(), ("eval_loss", False))
    assert info.value.field == "trainer.save_strategy" and "stored no checkpoint" in info.value.message
    assert "best_checkpoint" not in db[defaults.MODELS].find_one({"_id": "m"})


def test_serving_ref_is_an_earlier_runs_checkpoint_only():
    assert serving_ref({"run": 2, "best_checkpoint": {"run": 1, "step": 4}}) == {"run": 1, "step": 4}
    assert serving_ref({"run": 1, "best_checkpoint": {"run": 1, "step": 4}}) is None
    assert serving_ref({"run": 2, "best_checkpoint": {"run": "1", "step": 4}}) is None
    assert serving_ref({"run": 2}) is None


BASE = {"_id": "m", "model_name_or_path": "org/model", "data": {"collection": "docs"}}


@pytest.mark.parametrize("fields, field", [
    ({"promotion": True}, "promotion"),
    ({"promotion": {"metric": "accuracy"}}, "promotion.metric"),
    ({"promotion": {"min_delta": -1}}, "promotion.min_delta"),
    ({"init_from": {"model": {"$gt": ""}}}, "init_from.model"),
    ({"init_from": {"model": "x", "checkpoint": "base"}}, "init_from.checkpoint"),
    ({"trainer": {"early_stopping_patience": 0}}, "trainer.early_stopping_patience"),
    ({"trainer": {"metric_for_best_model": "bleu"}}, "trainer.metric_for_best_model"),
    ({"runs": "user-written"}, None),  # listener-owned: ignored by the parse, never trusted
])
def test_fields_are_bounded(fields, field):
    if field is None:
        parse_model({**BASE, **fields})
        return
    with pytest.raises(SpecError) as caught:
        parse_model({**BASE, **fields})
    assert caught.value.field.startswith(field)


def test_fields_parse():
    spec = parse_model({**BASE, "promotion": False, "init_from": {"model": "other", "checkpoint": {"run": 1, "step": 2}},
                        "trainer": {"early_stopping_patience": 2, "metric_for_best_model": "mean_token_accuracy",
                                    "packing": True, "assistant_only_loss": True}})
    assert spec.promotion is False and spec.init_from.checkpoint.step == 2
    assert parse_model(BASE).promotion.metric == "eval_loss"


def test_early_stopping_tracks_the_best_model_and_needs_held_out_documents():
    from training.arguments import sft_config

    spec = parse_model({**BASE, "trainer": {"early_stopping_patience": 2, "save_steps": 5}}).trainer
    config = sft_config(spec, "/tmp/unused", has_eval=True, use_cpu=True)
    assert config.load_best_model_at_end and config.metric_for_best_model == "eval_loss"
    assert config.eval_steps == config.save_steps == 5
    with pytest.raises(SpecError) as caught:
        sft_config(spec, "/tmp/unused", has_eval=False, use_cpu=True)
    assert caught.value.field == "trainer.early_stopping_patience"


def test_assistant_only_loss_needs_chat_data_and_a_template_that_marks_the_assistant(tiny_model_path):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from training.dataset import check_loss_options

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    chat = Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ahoy"}]}])
    text = Dataset.from_list([{"text": "ahoy"}])
    check_loss_options(False, text, tokenizer)
    for data, why in ((text, "chat data only"), (chat, "{% generation %}")):
        with pytest.raises(SpecError) as caught:
            check_loss_options(True, data, tokenizer)
        assert caught.value.field == "trainer.assistant_only_loss" and why in str(caught.value)
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "{{ message['content'] }}", "{% generation %}{{ message['content'] }}{% endgeneration %}")
    check_loss_options(True, chat, tokenizer)


def test_the_gate_scores_every_checkpoint_on_one_base_as_it_would_alone(tiny_model_path, limits, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.inference import apply_checkpoint
    from training.models import load_checked_model
    from training.promotion import GateModel, measure

    spec = parse_model({**BASE, "model_name_or_path": tiny_model_path}, limits)
    folders = []
    for seed in (1, 2):  # two adapters with different, non-zero weights
        torch.manual_seed(seed)
        lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path), lora).save_pretrained(tmp_path / f"a{seed}")
        folders.append(tmp_path / f"a{seed}")
    full = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with torch.no_grad():
        full.lm_head.weight.mul_(1.5)
    full.save_pretrained(tmp_path / "full")
    folders.append(tmp_path / "full")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    ids = tokenizer(["ahoy matey the capital of france", "arr what is two plus two"], padding=True,
                    return_tensors="pt")
    batches = [{**ids, "labels": ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)}]

    alone = [measure(apply_checkpoint(load_checked_model(spec, limits), folder), batches) for folder in folders]
    gate = GateModel(spec, limits)
    shared = [gate.score(folder, f"c{i}", batches) for i, folder in enumerate(folders + folders[:1])]
    assert len({round(s["eval_loss"], 6) for s in alone}) == 3, "the three checkpoints score differently"
    expected = alone + alone[:1]  # the last adapter comes after full weights: the base is loaded afresh for it
    assert [s["eval_loss"] for s in shared] == pytest.approx([s["eval_loss"] for s in expected], rel=1e-6)
    assert [s["tokens"] for s in shared] == [s["tokens"] for s in expected]


@pytest.mark.parametrize("options", [{}, {"packing": True}])
def test_the_gate_counts_the_tokens_the_trainer_evaluates(tiny_model_path, tmp_path, options):
    """Prompt/completion data: only the completion is scored; packed rows: each example apart, as the trainer."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from training.promotion import examples, held_out_batches, measure

    pairs = Dataset.from_list([{"prompt": f"what is {i} plus {i}?", "completion": f"ahoy, {2 * i} it be"}
                               for i in range(12)])
    config = SFTConfig(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to="none", use_cpu=True,
                       bf16=False, max_length=64, **options)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_path), args=config, train_dataset=pairs,
                         eval_dataset=pairs, processing_class=AutoTokenizer.from_pretrained(tiny_model_path),
                         peft_config=LoraConfig(r=4, task_type="CAUSAL_LM"))
    batches = held_out_batches(trainer)
    scored = measure(trainer.model, batches)
    assert sum(map(examples, batches)) == len(pairs)
    completions = sum(sum(label != -100 for label in row["labels"]) for row in trainer.eval_dataset)
    assert scored["tokens"] == completions  # the whole sequences would count the prompts too
    assert scored["eval_loss"] == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-3)
