"""Training: one LoRA SFT job through a `_models` document and through a plain trl script.

Both train the same documents with the same settings, and each is timed as a user waits for it:
mongotune from the insert to `succeeded`, the script from launch to exit. The trainer's own
`train_runtime` splits each total into the training loop and everything around it. mongotune runs
first, so whatever a warm file cache is worth goes to the baseline.
"""

import json
import subprocess
import sys
from pathlib import Path

from bench.common import Context, Row, step
from listener.processes import wait_until
from training import defaults

MODEL_ID = "bench"
COLLECTION = "pirate_chat"
SCRIPT = Path(__file__).with_name("baseline_train.py")
TIMEOUT_S = 600.0
JOB = {
    "filter": {"_fold": "train"},  # the training fold only, so neither side evaluates
    "trainer": {"max_steps": 20, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "max_length": 256,
                "logging_steps": 5},
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"},
}
FINISHED = ("succeeded", "failed", "cancelled")


def model_document(model_path: str) -> dict:
    """`JOB` in the document's own words: LoRA settings are `lora_*` trainer fields."""
    lora = JOB["lora"]
    return {
        "_id": MODEL_ID, "model_name_or_path": model_path,
        "data": {"collection": COLLECTION, "key": "messages", "filter": JOB["filter"]},
        "trainer": {**JOB["trainer"], "save_steps": JOB["trainer"]["max_steps"],  # one save, at the end
                    "lora_r": lora["r"], "lora_alpha": lora["lora_alpha"], "lora_dropout": lora["lora_dropout"],
                    "lora_target_modules": lora["target_modules"]},
    }


def via_mongotune(ctx: Context) -> dict:
    models = ctx.db[defaults.MODELS]
    with step(ctx.console, "training via mongotune (insert to succeeded)") as timer:
        models.insert_one(model_document(ctx.model_path))
        document = wait_until(lambda: models.find_one({"_id": MODEL_ID, "status": {"$in": FINISHED}}), TIMEOUT_S,
                              "training via mongotune", interval_s=0.25)
    if document["status"] != "succeeded":
        raise RuntimeError(f"training via mongotune {document['status']}: {document.get('error')}")
    metrics = document["metrics"]
    return {"seconds": timer.seconds, "loss": [m["loss"] for m in metrics if "loss" in m][-1],
            "train_runtime": next(m["train_runtime"] for m in metrics if "train_runtime" in m)}


def via_script(ctx: Context, output: Path) -> dict:
    command = [sys.executable, str(SCRIPT), "--uri", ctx.uri, "--db", ctx.db.name, "--collection", COLLECTION,
               "--model", ctx.model_path, "--output", str(output), "--job", json.dumps(JOB)]
    with step(ctx.console, "training via a plain trl script (launch to exit)") as timer:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    (ctx.home / "baseline-train.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise RuntimeError(f"the baseline training script failed:\n{done.stderr[-3000:]}")
    return {"seconds": timer.seconds, **json.loads(done.stdout.strip().splitlines()[-1])}


def run(ctx: Context) -> tuple[list[Row], Path]:
    """The rows, and the baseline's saved adapter folder (a real checkpoint for the storage benchmark)."""
    output = ctx.home / "baseline-adapter"
    ours, theirs = via_mongotune(ctx), via_script(ctx, output)
    around = {side: r["seconds"] - r["train_runtime"] for side, r in (("ours", ours), ("theirs", theirs))}
    steps = JOB["trainer"]["max_steps"]
    rows = [
        Row("training: end to end", "s", ours["seconds"], theirs["seconds"],
            f"overhead {ours['seconds'] - theirs['seconds']:+.1f} s"),
        Row("training: inside trainer.train()", "s", ours["train_runtime"], theirs["train_runtime"],
            f"outside it: {around['ours']:.1f} s vs {around['theirs']:.1f} s"),
        Row(f"training: loss at step {steps}", "loss", ours["loss"], theirs["loss"]),
    ]
    return rows, output
