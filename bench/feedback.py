"""Feedback: one DPO run from ratings written on served answers, through the database, against the plain trl script.

A model is trained once (SFT on the pirate prompt-response samples) so that an adapter serves; `RATINGS` of the
train fold's prompts are requested through `_requests` and answered by the daemon, then each answer is rated as a
user would with a driver, `feedback: {rating: -1, better: <the sample's pirate answer>}`. The model's `feedback:
{method: "dpo", every: RATINGS}` starts one run at the last rating; mongotune is timed from that write to
`succeeded` (the daemons' count every `retrain_check_s`, the run and its promotion gate included). The gate's scores
come from the run's entry: preference accuracy and reward margin on the held-out pairs, and the forgetting guard's
eval loss on the model's own held-out documents, for the candidate and the serving (SFT) checkpoint, with the
decision. The baseline is `bench.baseline_dpo` on the pairs the run trained on (the same read and split), with the
same trainer arguments, timed from launch to exit; seconds per step are each trainer's `train_runtime` over its
steps. The run starts from the serving adapter against a frozen copy of it (trl's reference for a run from an
adapter), the script from a fresh adapter against the base (as `bench.dpo`'s), so mongotune's reference pass runs a
LoRA adapter too. One run a side, mongotune's first (the pairs are known once it has read them). Not part of `make
bench`: `python -m bench --only feedback` (about 4 minutes on 2 CPUs with SmolLM2-135M).
"""

from pathlib import Path

from bench import dpo, serving, training
from bench.common import Context, Row, step
from bench.trainer_log import rewards
from listener.processes import wait_until
from training import defaults, feedback
from training.config import parse_model
from training.limits import Limits

MODEL_ID = "feedback"
SAMPLES = "pirate_prompt_response"  # text prompts and pirate answers: the served answers and the pairs stay text
PAIRS_COLLECTION = "feedback_pairs"  # the pairs the run trained on, for the script
RATINGS = 40
VALID_FRACTION = 0.25  # of the ratings, held out for the gate: 10 pairs, the fewest that make a held-out fold
# The DPO bench's arguments, less `beta`, which an sft model's trainer refuses (trl's default is the same 0.1); its
# own SFT run trains with them too.
JOB = {"trainer": {k: v for k, v in dpo.JOB["trainer"].items() if k != "beta"}, "lora": dpo.JOB["lora"]}
# An sft model's gate judges its feedback runs by an SFT metric (`promotion.metric` may name preference_accuracy or
# reward_margin only on a dpo or kto model); its entry records the preference scores all the same.
PROMOTION = {"metric": "eval_loss"}


def model_document(model_path: str) -> dict:
    return {"_id": MODEL_ID, "model_name_or_path": model_path,
            "data": {"collection": SAMPLES, "key": ["prompt", "response"], "valid_fraction": VALID_FRACTION},
            "trainer": training.trainer_fields(JOB), "feedback": {"method": "dpo", "every": RATINGS},
            "promotion": PROMOTION}


def asked(ctx: Context) -> list[tuple[dict, dict]]:
    """The first `RATINGS` sample prompts of the train fold, each with the daemon's answer from the serving adapter."""
    samples = list(ctx.db[SAMPLES].find({"_fold": "train"}, sort=[("_id", 1)], limit=RATINGS))
    with step(ctx.console, f"{RATINGS} requests answered by the serving adapter"):
        answers = serving.ask(ctx.db, [s["prompt"] for s in samples], MODEL_ID)
    return list(zip(answers, samples))


def rate(ctx: Context, answer: dict, sample: dict) -> None:
    """An answer rated worse than the sample's own, as a user's driver writes it."""
    ctx.db[defaults.REQUESTS].update_one({"_id": answer["_id"], "status": "done"},
                                         {"$set": {"feedback": {"rating": -1, "better": sample["response"]}}})


def feedback_run(ctx: Context) -> dict:
    """Every answer rated; from the last rating to the feedback run's `succeeded`: the seconds, the trainer's
    runtime, steps and rewards, and from the run's entry its phases, its gate's decision and what it read."""
    models = ctx.db[defaults.MODELS]
    *earlier, last = asked(ctx)
    training.idle(training.processes(ctx)[0])
    for answer, sample in earlier:
        rate(ctx, answer, sample)
    with step(ctx.console, "feedback run via mongotune (last rating to succeeded)") as timer:
        rate(ctx, *last)
        done = wait_until(lambda: models.find_one({"_id": MODEL_ID, "run": {"$gte": 2},
                                                   "status": {"$in": training.FINISHED}}),
                          training.TIMEOUT_S, "the feedback run", poll_s=0.25)
    entry = done["runs"][-1]
    if entry.get("outcome") != "succeeded" or entry.get("trigger") != "feedback":
        raise RuntimeError(f"run {entry['number']} ({entry.get('trigger')}) ended {entry.get('outcome')}: "
                           f"{done.get('error') or entry.get('nothing_to_train')}")
    if "scores" not in entry.get("promotion", {}):
        raise RuntimeError(f"the gate measured nothing: {entry.get('promotion')}")
    logged = rewards([m for m in done["metrics"] if m.get("run") == entry["number"]])
    return {"seconds": timer.seconds, **logged, "phases": entry.get("phases", {}), "promotion": entry["promotion"],
            "read": entry["feedback"]}


def trained_pairs(ctx: Context) -> int:
    """The pairs the run trained on, read and split as it read them, into `PAIRS_COLLECTION` for the script."""
    limits = Limits(model_roots=(Path(ctx.model_path).parent,))  # the bench daemon's: the defaults, and this root
    spec = parse_model(model_document(ctx.model_path), limits)
    train = feedback.folds(feedback.rated_requests(ctx.db, spec, limits), spec, limits)[0]
    ctx.db[PAIRS_COLLECTION].drop()
    ctx.db[PAIRS_COLLECTION].insert_many(train)
    return len(train)


def gate_rows(promotion: dict) -> list[Row]:
    """The gate's scores of the candidate (mongotune's column) against the serving checkpoint (the baseline's)."""
    candidate, serving_scores = promotion["scores"]["candidate"], promotion["scores"]["serving"]
    decision = "promoted" if promotion["promoted"] else "kept"
    held = f"{promotion['pairs']} held-out pairs; candidate | serving (SFT) checkpoint, not the script"
    return [
        Row("feedback gate: preference accuracy", "", candidate["preference_accuracy"],
            serving_scores["preference_accuracy"], held),
        Row("feedback gate: reward margin", "", candidate["reward_margin"], serving_scores["reward_margin"], held),
        Row("feedback gate: eval loss (forgetting guard)", "loss", candidate["eval_loss"], serving_scores["eval_loss"],
            f"{promotion['documents']} documents ({promotion['forgetting_on']['source']}); {decision} by "
            f"{promotion['metric']}: {promotion['reason']}"),
    ]


def timing_rows(ours: dict, theirs: dict, trained: int) -> list[Row]:
    held_out, before_child = ours["promotion"]["pairs"], ours["seconds"] - training.in_process(ours)
    return [
        Row("feedback: last rating to succeeded", "s", ours["seconds"], theirs["seconds"],
            f"script: launch to exit; {RATINGS} ratings, {ours['read']['pairs']} pairs ({trained} trained, {held_out} "
            f"held out); {before_child:.1f} s to the training child (the count every retrain_check_s, claim, start), "
            f"then {training.phases_note([ours])} (end: the gate)"),
        Row("feedback: train_runtime", "s", ours["train_runtime"], theirs["train_runtime"],
            f"{ours['steps']} | {theirs['steps']} steps"),
    ]


def run(ctx: Context) -> list[Row]:
    training.through_daemon(ctx, model_document(ctx.model_path), "SFT")  # the adapter that serves and is rated
    ours = feedback_run(ctx)
    trained = trained_pairs(ctx)
    theirs = training.through_script(ctx, "bench.baseline_dpo", PAIRS_COLLECTION, JOB, ctx.home / "feedback-baseline",
                                     "feedback DPO")
    return [*timing_rows(ours, theirs, trained), *dpo.trainer_rows("feedback", [ours], [theirs]),
            *gate_rows(ours["promotion"])]
