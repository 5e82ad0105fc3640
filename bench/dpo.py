"""DPO: one LoRA DPO job through a `_models` document against the plain trl `DPOTrainer` script.

Both train the same pairs with the same arguments: the sample prompts, their pirate answer chosen over
the same answer without its pirate words. mongotune is timed from the insert to `succeeded`, the script
(`bench.baseline_dpo`) from launch to exit; seconds per step are each trainer's `train_runtime` over
its steps. `PAIRS` pairs, which side goes first alternating, each row the median. Not part of `make
bench`: `python -m bench --only dpo` (about 5 minutes on 2 CPUs with SmolLM2-135M).
"""

import statistics

from bench import training
from bench.common import Context, Row
from bench.trainer_log import rewards

COLLECTION = "pirate_pairs"
PAIRS = 3
JOB = {
    "trainer": {"max_steps": 8, "per_device_train_batch_size": 2, "learning_rate": 5e-5, "max_length": 128,
                "logging_steps": 1, "beta": 0.1, "seed": 42},
    "lora": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
}
PIRATE = ("Ahoy, matey! ", " Arr!")


def plain(answer: str) -> str:
    for words in PIRATE:
        answer = answer.replace(words, "")
    return answer


def load_pairs(ctx: Context) -> int:
    """The pairs both sides train on, from the sample prompt-response documents of the train fold."""
    samples = ctx.db["pirate_prompt_response"].find({"_fold": "train"}, sort=[("_id", 1)])
    pairs = [{"prompt": d["prompt"], "chosen": d["response"], "rejected": plain(d["response"])} for d in samples]
    ctx.db[COLLECTION].drop()
    ctx.db[COLLECTION].insert_many([p for p in pairs if p["chosen"] != p["rejected"]])
    return ctx.db[COLLECTION].count_documents({})


def model_document(model_path: str, model_id: str) -> dict:
    return {"_id": model_id, "model_name_or_path": model_path, "method": "dpo",
            "data": {"collection": COLLECTION, "key": ["prompt", "chosen", "rejected"], "valid_fraction": 0.0},
            "trainer": training.trainer_fields(JOB)}


def via_mongotune(ctx: Context, model_id: str) -> dict:
    ran = training.through_daemon(ctx, model_document(ctx.model_path, model_id), "DPO")
    return {"seconds": ran["seconds"], **rewards(ran["document"]["metrics"])}


def via_script(ctx: Context, number: int) -> dict:
    return training.through_script(ctx, "bench.baseline_dpo", COLLECTION, JOB, ctx.home / f"dpo-baseline-{number}",
                                   "DPO")


def run(ctx: Context) -> list[Row]:
    count = load_pairs(ctx)
    ours, theirs = training.alternate(PAIRS, lambda n: via_mongotune(ctx, f"dpo-{n}"), lambda n: via_script(ctx, n))
    steps = JOB["trainer"]["max_steps"]
    ratios = [o["seconds"] / t["seconds"] for o, t in zip(ours, theirs)]
    return [
        _median_row("dpo: end to end", "s", ours, theirs, lambda r: r["seconds"],
                    f"whole-job ratio {statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f}) over "
                    f"{PAIRS} alternating pairs, {count} pairs, {steps} steps"),
        *trainer_rows("dpo", ours, theirs),
    ]


def trainer_rows(part: str, ours: list[dict], theirs: list[dict]) -> list[Row]:
    """Each side's seconds per step and last logged rewards (`trainer_log.rewards`), the median over its jobs."""
    steps = ours[0]["steps"]
    return [
        _median_row(f"{part}: seconds per step", "s", ours, theirs, lambda r: r["train_runtime"] / r["steps"],
                    "trainer's train_runtime / steps"),
        _median_row(f"{part}: reward accuracy at step {steps}", "", ours, theirs, lambda r: r["accuracy"]),
        _median_row(f"{part}: reward margin at step {steps}", "", ours, theirs, lambda r: r["margin"]),
    ]


def _median_row(name: str, unit: str, ours: list[dict], theirs: list[dict], pick, note: str = "") -> Row:
    return Row(name, unit, statistics.median(map(pick, ours)), statistics.median(map(pick, theirs)), note)
