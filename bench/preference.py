"""DPO: one LoRA DPO job through a `_models` document against the plain trl `DPOTrainer` script.

Both train the same pairs with the same arguments: the sample prompts, their pirate answer chosen over
the same answer without its pirate words. mongotune is timed from the insert to `succeeded`, the script
(`bench.baseline_dpo`) from launch to exit; seconds per step are each trainer's `train_runtime` over
its steps. `PAIRS` pairs, which side goes first alternating, each row the median. Not part of `make
bench`: `python -m bench --only dpo` (about 5 minutes on 2 CPUs with SmolLM2-135M).
"""

import json
import statistics
import subprocess
import sys

from bench import training
from bench.common import Context, Row, step
from listener.processes import wait_until
from training import defaults

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
    lora = JOB["lora"]
    return {"_id": model_id, "model_name_or_path": model_path, "method": "dpo",
            "data": {"collection": COLLECTION, "key": ["prompt", "chosen", "rejected"], "valid_fraction": 0.0},
            "trainer": {**JOB["trainer"], "save_steps": JOB["trainer"]["max_steps"], "lora_r": lora["r"],
                        "lora_alpha": lora["lora_alpha"], "lora_target_modules": lora["target_modules"]}}


def last(metrics: list[dict], name: str) -> float:
    return [m[name] for m in metrics if name in m][-1]


def via_mongotune(ctx: Context, model_id: str) -> dict:
    models = ctx.db[defaults.MODELS]
    training.idle(training.processes(ctx)[0])
    with step(ctx.console, f"DPO {model_id} via mongotune (insert to succeeded)") as timer:
        models.insert_one(model_document(ctx.model_path, model_id))
        document = wait_until(lambda: models.find_one({"_id": model_id, "status": {"$in": training.FINISHED}}),
                              training.TIMEOUT_S, "DPO via mongotune", poll_s=0.25)
    if document["status"] != "succeeded":
        raise RuntimeError(f"DPO via mongotune {document['status']}: {document.get('error')}")
    metrics = document["metrics"]
    return {"seconds": timer.seconds, "train_runtime": last(metrics, "train_runtime"),
            "accuracy": last(metrics, "rewards/accuracies"), "margin": last(metrics, "rewards/margins")}


def via_script(ctx: Context, number: int) -> dict:
    command = [sys.executable, "-m", "bench.baseline_dpo", "--uri", ctx.uri, "--db", ctx.db.name, "--collection",
               COLLECTION, "--model", ctx.model_path, "--output", str(ctx.home / f"dpo-baseline-{number}"),
               "--job", json.dumps(JOB)]
    training.idle(training.processes(ctx)[0])
    with step(ctx.console, "DPO via a plain trl script (launch to exit)") as timer:
        done = subprocess.run(command, capture_output=True, text=True, timeout=training.TIMEOUT_S, cwd=training.ROOT)
    (ctx.home / f"baseline-dpo-{number}.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise RuntimeError(f"the baseline DPO script failed:\n{done.stderr[-3000:]}")
    return {"seconds": timer.seconds, **json.loads(done.stdout.strip().splitlines()[-1])}


def run(ctx: Context) -> list[Row]:
    count = load_pairs(ctx)
    ours, theirs = [], []
    for number in range(PAIRS):
        if number % 2:  # every other pair, the script goes first
            theirs.append(via_script(ctx, number))
        ours.append(via_mongotune(ctx, f"dpo-{number}"))
        if not number % 2:
            theirs.append(via_script(ctx, number))
    steps = JOB["trainer"]["max_steps"]
    ratios = [o["seconds"] / t["seconds"] for o, t in zip(ours, theirs)]

    def row(name: str, unit: str, pick, note: str = "") -> Row:
        return Row(name, unit, statistics.median(map(pick, ours)), statistics.median(map(pick, theirs)), note)

    return [
        row("dpo: end to end", "s", lambda r: r["seconds"], f"whole-job ratio {statistics.median(ratios):.2f} "
            f"({min(ratios):.2f}–{max(ratios):.2f}) over {PAIRS} alternating pairs, {count} pairs, {steps} steps"),
        row("dpo: seconds per step", "s", lambda r: r["train_runtime"] / steps, "trainer's train_runtime / steps"),
        row(f"dpo: reward accuracy at step {steps}", "", lambda r: r["accuracy"]),
        row(f"dpo: reward margin at step {steps}", "", lambda r: r["margin"]),
    ]
