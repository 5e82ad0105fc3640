"""The whole loop on one machine: server, sample data, a model document, training, answers.

Everything goes through the database exactly as a user's own driver would: raw inserts into
`_models` and `_requests`, and a real `listener start` process doing the work.
"""

import time
from pathlib import Path

from pymongo import MongoClient
from rich.console import Console
from rich.table import Table

from listener.follow import finished, follow_training, wait_for
from listener.imports import SAMPLES, insert, sample_parts
from listener.processes import start_listener, stop
from listener.status import Status
from training import defaults

MODEL_ID = "pirate"
QUESTIONS = ["What is the capital of Italy?", "What is 12 plus 30?", "Name a colour of the sky."]


def load_samples(db) -> dict[str, int]:
    """Put the shipped sample datasets into collections of the same names, fresh each time."""
    counts = {}
    for part in sample_parts(SAMPLES, fold=None):
        db[part.name].drop()
        counts[part.name] = insert(db[part.name], part)
    return counts


def model_document(model_path: str) -> dict:
    return {
        "_id": MODEL_ID,
        "model_name_or_path": model_path,
        "data": {"collection": "pirate_chat", "key": "messages"},
        "trainer": {
            "num_train_epochs": 1, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
            "max_seq_length": 256, "logging_steps": 5, "eval_steps": 15, "save_steps": 15, "save_total_limit": 2,
            "use_lora": True, "lora_r": 8, "lora_alpha": 16,
        },
    }


def ask(requests, questions: list[str], checkpoint: str) -> list:
    ids = [requests.insert_one({"model": MODEL_ID, "input": [{"role": "user", "content": q}],
                                "params": {"max_new_tokens": 40}, "checkpoint": checkpoint}).inserted_id
           for q in questions]
    return ids


def run_demo(uri: str, db_name: str, model_path: str, home: Path, console: Console, timeout_s: float = 900) -> int:
    client = MongoClient(uri)
    db = client[db_name]
    started = time.monotonic()
    for name in (defaults.MODELS, defaults.REQUESTS, defaults.LISTENER, f"{defaults.CHECKPOINTS}.files",
                 f"{defaults.CHECKPOINTS}.chunks"):
        db[name].drop()
    counts = load_samples(db)
    console.print("sample data loaded: " + ", ".join(f"{n} ({c} documents)" for n, c in counts.items()))

    log_path = home / "demo-listener.log"
    root = ("--model-root", str(Path(model_path).parent)) if Path(model_path).is_dir() else ()
    daemon = start_listener(uri, db_name, "demo", log_path, args=root)
    console.print(f"listener started (pid {daemon.pid}, log {log_path})")
    try:
        db[defaults.MODELS].insert_one(model_document(model_path))
        console.print(f"inserted model document {MODEL_ID!r} into {defaults.MODELS}")
        model = follow_training(console, db[defaults.MODELS], MODEL_ID, timeout_s)
        if model["status"] != Status.SUCCEEDED:
            console.print(f"[red]training {model['status']}: {model.get('error')}")
            return 1
        show_checkpoints(console, model)
        tuned = ask(db[defaults.REQUESTS], QUESTIONS, "best")
        base = ask(db[defaults.REQUESTS], QUESTIONS, "base")
        with console.status("answering requests..."):
            answers = [wait_for(db[defaults.REQUESTS], i, finished, 300) for i in tuned + base]
        show_answers(console, answers[: len(QUESTIONS)], answers[len(QUESTIONS):])
    finally:
        stop(daemon)
    console.print(f"demo finished in {time.monotonic() - started:.0f} s; the model and its checkpoints stay in "
                  f"database {db_name!r}")
    return 0


def show_checkpoints(console: Console, model: dict) -> None:
    table = Table(title=f"checkpoints of {model['_id']!r} in GridFS ({defaults.CHECKPOINTS})")
    for column in ("run", "step", "train loss", "eval loss", "size"):
        table.add_column(column)
    best = model.get("best_checkpoint") or {}
    for c in model.get("checkpoints", []):
        m = c.get("metrics", {})
        mark = " (best)" if (c["run"], c["step"]) == (best.get("run"), best.get("step")) else ""
        table.add_row(str(c["run"]), f"{c['step']}{mark}", f"{m.get('loss', float('nan')):.3f}",
                      f"{m.get('eval_loss', float('nan')):.3f}", f"{c['size'] / 1e6:.1f} MB")
    console.print(table)


def _cell(request: dict) -> str:
    if request.get("status") != Status.DONE:
        return f"[red]{request.get('status')}: {request.get('error')}"
    return request.get("output") or "[dim](an empty answer)"


def show_answers(console: Console, tuned: list[dict], base: list[dict]) -> None:
    table = Table(title="the same prompts, before and after fine-tuning", show_lines=True)
    for column in ("prompt", "base model", "fine-tuned"):
        table.add_column(column, overflow="fold")
    for question, b, t in zip(QUESTIONS, base, tuned):
        table.add_row(question, _cell(b), _cell(t))
    console.print(table)
    latency = [d["latency_ms"] for d in tuned + base if "latency_ms" in d]
    if latency:
        console.print(f"request latency: {min(latency):.0f}-{max(latency):.0f} ms (includes loading the model once)")
