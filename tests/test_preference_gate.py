"""The preference gate's scores (`training.preference_gate`) on crafted rows, and against trl's own rewards."""

import math

import pytest
import torch
from bson import ObjectId

from training.config import SpecError, parse_model
from training.preference_gate import HeldOut, example_scores, pair_scores, scores, sft_batches
from training.promotion import decide, decide_preferences, forgot

PAIRS = {"_id": "m", "model_name_or_path": "org/model", "method": "dpo",
         "data": {"collection": "c", "key": ["q", "good", "bad"]}}
THUMBS = {**PAIRS, "method": "kto", "data": {"collection": "c", "key": ["q", "answer", "thumb"]}}
TEXTS = {"_id": "m", "model_name_or_path": "org/model", "data": {"collection": "c"}}
RATED = {**TEXTS, "feedback": {"method": "dpo", "every": 4}}  # an sft model whose feedback runs are dpo


def test_a_pair_is_ranked_right_when_its_chosen_reward_is_above_its_rejected():
    scored = pair_scores(torch.tensor([0.5, -0.25, 0.0, 1.0]))
    assert scored == {"preference_accuracy": 0.5, "reward_margin": pytest.approx(0.3125)}  # a tie is wrong


def test_an_example_is_ranked_right_when_its_rewards_sign_agrees_with_its_label():
    rewards, labels = torch.tensor([1.0, -2.0, 0.5, 0.0, -1.0]), torch.tensor([True, True, False, False, False])
    scored = example_scores(rewards, labels)
    assert scored["preference_accuracy"] == pytest.approx(2 / 5)
    assert scored["reward_margin"] == pytest.approx(-0.5 - (0.5 + 0.0 - 1.0) / 3)  # desirable mean - undesirable mean
    assert example_scores(torch.tensor([1.0, 2.0]), torch.tensor([True, True]))["reward_margin"] is None


def test_rewards_are_beta_times_the_summed_log_ratio_to_the_reference():
    """One batch of two pairs: rows 0-1 chosen, rows 2-3 rejected."""
    held = HeldOut("dpo", [{"input_ids": torch.zeros(4, 3)}], [], beta=0.5)
    policy, reference = [torch.tensor([-1.0, -4.0, -3.0, -2.0])], [torch.tensor([-2.0, -2.0, -2.0, -2.0])]
    scored = scores(held, policy, reference)  # rewards 0.5, -1, -0.5, 0: margins 1 and -1
    assert scored == {"preference_accuracy": 0.5, "reward_margin": 0.0} and held.rows == 2
    assert scores(held, reference, reference)["preference_accuracy"] == 0  # the reference itself ranks nothing


def test_the_forgetting_guard_reads_the_chosen_or_desirable_answers_alone():
    ids = torch.tensor([[5, 6, 7, 0], [5, 8, 0, 0], [5, 6, 9, 9], [5, 8, 9, 0]])
    answer = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0], [0, 1, 1, 1], [0, 1, 1, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "completion_mask": answer}
    [chosen] = sft_batches([batch], "dpo")
    assert chosen["labels"].tolist() == [[-100, 6, 7, -100], [-100, 8, -100, -100]]
    [desirable] = sft_batches([{**batch, "label": torch.tensor([False, True, True, False])}], "kto")
    assert desirable["input_ids"].tolist() == ids[1:3].tolist()
    assert sft_batches([{**batch, "label": torch.zeros(4, dtype=torch.bool)}], "kto") == []


@pytest.mark.parametrize("new, serving, kept", [(1.06, 1.0, True), (1.04, 1.0, False), (0.5, 1.0, False)])
def test_a_candidate_that_forgot_more_than_allowed_is_kept(new, serving, kept):
    reason = forgot(0.05, new, serving)
    assert bool(reason) == kept
    if kept:
        assert reason.startswith("eval_loss on the held-out documents rose by 0.06 (1.06 against 1)")


@pytest.mark.parametrize("metric, new, promoted, reason", [
    ("preference_accuracy", {"preference_accuracy": 1.0, "eval_loss": 2.0}, True,
     "preference_accuracy better by 0.5 (1 against 0.5), at least min_delta 0"),
    ("preference_accuracy", {"preference_accuracy": 1.0, "eval_loss": 2.1}, False,
     "preference_accuracy better by 0.5 (1 against 0.5), at least min_delta 0; but eval_loss on the held-out documents "
     "rose by 0.1 (2.1 against 2), more than max_eval_loss_rise 0.05: the run forgot what the serving checkpoint "
     "knew: kept"),
    ("preference_accuracy", {"preference_accuracy": 0.25, "eval_loss": 1.0}, False,
     "preference_accuracy worse by 0.25 (0.25 against 0.5)"),
    ("eval_loss", {"preference_accuracy": 0.0, "eval_loss": 1.5}, True,
     "eval_loss better by 0.5 (1.5 against 2), at least min_delta 0"),
    # No chosen or desirable held-out answer (raters who rate every answer bad): a guard that measured nothing keeps it.
    ("preference_accuracy", {"preference_accuracy": 1.0, "eval_loss": None}, False,
     "preference_accuracy better by 0.5 (1 against 0.5), at least min_delta 0; but the forgetting guard measured no "
     "eval_loss (no chosen or desirable held-out answer to score): kept"),
    ("reward_margin", {"reward_margin": None, "eval_loss": 2.0}, False,
     "reward_margin could not be computed for both checkpoints (the held-out rows lack the answers it needs: one of "
     "each label for reward_margin, a chosen or desirable one for the SFT scores): kept"),
])
def test_a_preference_candidate_is_promoted_when_its_metric_is_better_and_it_did_not_forget(metric, new, promoted,
                                                                                           reason):
    serving = {"preference_accuracy": 0.5, "reward_margin": 0.5, "eval_loss": 2.0}
    assert decide_preferences(metric, 0, 0.05, new, serving) == (promoted, reason)


def test_preference_scores_are_better_higher():
    assert decide("preference_accuracy", 0, 0.75, 0.5) == (
        True, "preference_accuracy better by 0.25 (0.75 against 0.5), at least min_delta 0")
    assert decide("reward_margin", 0, -1.0, 0.5) == (False, "reward_margin worse by 1.5 (-1 against 0.5)")


# --- parse: the metric names each method's gate scores ----------------------------------------------------------

def test_a_preference_models_gate_defaults_to_preference_accuracy_and_a_loss_guard():
    promotion = parse_model(PAIRS).promotion
    assert (promotion.metric, promotion.min_delta, promotion.max_eval_loss_rise) == ("preference_accuracy", 0, 0.05)
    promotion = parse_model({**THUMBS, "promotion": {"metric": "reward_margin", "max_eval_loss_rise": 0.5}}).promotion
    assert (promotion.metric, promotion.max_eval_loss_rise) == ("reward_margin", 0.5)
    promotion = parse_model(TEXTS).promotion
    assert promotion.metric == "eval_loss" and promotion.max_eval_loss_rise is None
    assert parse_model({**PAIRS, "promotion": False}).promotion is False


@pytest.mark.parametrize("doc", [THUMBS, RATED])
def test_a_loss_metric_is_its_own_forgetting_guard(doc):
    """Under eval_loss (or eval_perplexity) any rise of the held-out loss keeps the candidate: no allowance is filled
    in, and none is taken."""
    assert parse_model({**doc, "promotion": {"metric": "eval_loss"}}).promotion.max_eval_loss_rise is None
    serving = {"preference_accuracy": 0.5, "eval_loss": 2.0}
    assert decide_preferences("eval_loss", 0, None, {"preference_accuracy": 0.0, "eval_loss": 2.01}, serving) == (
        False, "eval_loss worse by 0.01 (2.01 against 2)")


def test_an_sft_models_feedback_runs_are_judged_by_its_own_metric_and_guarded():
    """A feedback run trains with feedback.method, and the preference gate judges it: the loss guard applies to it."""
    promotion = parse_model(RATED).promotion
    assert (promotion.metric, promotion.max_eval_loss_rise) == ("eval_loss", None)
    promotion = parse_model({**RATED, "promotion": {"metric": "eval_mean_token_accuracy"}}).promotion
    assert (promotion.metric, promotion.max_eval_loss_rise) == ("eval_mean_token_accuracy", 0.05)
    promotion = parse_model({**RATED, "promotion": {"metric": "eval_mean_token_accuracy",
                                                    "max_eval_loss_rise": 0.2}}).promotion
    assert promotion.max_eval_loss_rise == 0.2


@pytest.mark.parametrize("doc, promotion, field", [
    (TEXTS, {"metric": "preference_accuracy"}, "promotion.metric"),
    (TEXTS, {"metric": "reward_margin"}, "promotion.metric"),
    (TEXTS, {"max_eval_loss_rise": 0.1}, "promotion.max_eval_loss_rise"),
    (PAIRS, {"metric": "eval_perplexity"}, "promotion.metric"),
    (THUMBS, {"metric": "eval_mean_token_accuracy"}, "promotion.metric"),
    (PAIRS, {"metric": "accuracy"}, "promotion.metric"),
    (PAIRS, {"max_eval_loss_rise": -0.1}, "promotion.max_eval_loss_rise"),
    (PAIRS, {"max_eval_loss_rise": 1e9}, "promotion.max_eval_loss_rise"),
    (THUMBS, {"metric": "eval_loss", "max_eval_loss_rise": 0.5}, "promotion.max_eval_loss_rise"),
    (RATED, {"max_eval_loss_rise": 0.5}, "promotion.max_eval_loss_rise"),  # eval_loss, the default
    (RATED, {"metric": "preference_accuracy"}, "promotion.metric"),  # the model's own sft runs cannot score it
])
def test_a_metric_the_methods_gate_does_not_score_is_refused_naming_it(doc, promotion, field):
    with pytest.raises(SpecError) as caught:
        parse_model({**doc, "promotion": promotion})
    assert caught.value.field == field


def test_refusals_say_why():
    with pytest.raises(SpecError, match="metric eval_loss already keeps a candidate whose held-out loss rose at all"):
        parse_model({**RATED, "promotion": {"max_eval_loss_rise": 0.5}})
    with pytest.raises(SpecError, match="its feedback runs are judged by the same metric"):
        parse_model({**RATED, "promotion": {"metric": "reward_margin"}})


# --- the scores against trl's ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_the_gate_gives_trls_own_rewards_for_an_adapter_against_the_base(db, tiny_model_path, limits, tmp_path,
                                                                          method):
    """trl's evaluation computes the same implicit rewards against the base (the adapter disabled): its accuracy and
    margin on the held-out rows are the gate's, which scores them from the checkpoint alone on a base of its own (in
    one batch: trl averages each batch's means)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.arguments import TRL
    from training.checkpoints import upload
    from training.methods import held_out
    from training.promotion import GateModel, judge_preferences

    if method == "dpo":
        rows = [{"prompt": f"what is {n} plus one", "chosen": "ahoy", "rejected": f"no {n}"} for n in range(6)]
    else:
        rows = [{"prompt": f"what is {n} plus one", "completion": f"ahoy {n}", "label": n % 2 == 0} for n in range(6)]
    config_class, trainer_class = TRL[method]
    config = config_class(output_dir=str(tmp_path / "out"), per_device_eval_batch_size=6, report_to="none",
                          use_cpu=True, bf16=False, max_length=64, beta=0.5)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    trainer = trainer_class(model=AutoModelForCausalLM.from_pretrained(tiny_model_path), args=config,
                            train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows),
                            processing_class=AutoTokenizer.from_pretrained(tiny_model_path), peft_config=lora)
    spec = parse_model({**(PAIRS if method == "dpo" else THUMBS), "model_name_or_path": tiny_model_path}, limits)
    held = held_out(trainer, spec)
    assert held.rows == 6 and held.beta == 0.5
    trainer.model.save_pretrained(tmp_path / "adapter")
    evaluated = trainer.evaluate()
    gate = GateModel(spec, limits)
    reference = gate.reference(held)
    base = gate.base_scores(held.sft)
    scored = gate.preferences(tmp_path / "adapter", "candidate", held, reference)
    assert gate.base_scores(held.sft) == base  # the adapters disabled, as before one was loaded
    assert math.isfinite(scored["eval_loss"]) and scored["eval_loss"] != base["eval_loss"]
    # A first run records the base's SFT scores beside its own; so does one whose serving checkpoint is gone.
    stored = upload(db, tmp_path / "adapter", model_id="m", run=2, step=3)
    gone = {"run": 1, "step": 1, "files_id": ObjectId()}
    for n, (serving, reason) in enumerate([(None, "no earlier checkpoint serves"),
                                           (gone, "the serving checkpoint cannot be loaded")]):
        decision = judge_preferences(db, spec, stored, serving, held, tmp_path / f"work{n}", limits)
        assert decision["promoted"] and decision["reason"].startswith(reason), decision
        assert decision["scores"]["base"] == pytest.approx(base)
        assert decision["scores"]["candidate"] == pytest.approx(scored, rel=1e-5)
    if method == "dpo":
        assert scored["preference_accuracy"] == pytest.approx(evaluated["eval_rewards/accuracies"])
        assert scored["reward_margin"] == pytest.approx(evaluated["eval_rewards/margins"], rel=1e-4)
    else:  # KTO logs the mean reward of each label
        assert scored["reward_margin"] == pytest.approx(
            evaluated["eval_rewards/chosen"] - evaluated["eval_rewards/rejected"], rel=1e-4)


def test_a_first_runs_gate_promotes_it_even_when_its_scores_cannot_be_measured(db, tiny_model_path, limits, tmp_path):
    """With nothing serving the scores decide nothing: a run that trained to its end is never failed by them (here its
    checkpoint is gone from GridFS). Against a serving checkpoint the same failure is the run's."""
    from training.promotion import judge_preferences

    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 5, 6]])  # one pair: its chosen row, then its rejected one
    held = HeldOut("dpo", [{"input_ids": ids, "attention_mask": torch.ones_like(ids),
                            "completion_mask": torch.tensor([[0, 0, 1, 1]] * 2)}], [], beta=0.1)
    spec = parse_model({**PAIRS, "model_name_or_path": tiny_model_path}, limits)
    gone = {"run": 2, "step": 3, "files_id": ObjectId()}
    decision = judge_preferences(db, spec, gone, None, held, tmp_path, limits)
    assert decision["promoted"] and "scores" not in decision and decision["pairs"] == 1
    assert decision["reason"].startswith("no earlier checkpoint serves; its scores could not be measured "
                                         "(CheckpointRefused: checkpoint {run: 2, step: 3} of model 'm'"), decision
    with pytest.raises(LookupError):
        judge_preferences(db, spec, gone, {"run": 1, "step": 1}, held, tmp_path, limits)
