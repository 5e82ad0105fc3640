"""Training: one LoRA SFT job through a `_models` document and through a plain trl script.

Both train the same documents with the same settings, and each is timed as a user waits for it:
mongotune from the insert to `succeeded`, the script from launch to exit. Both evaluate once on the
valid fold at the last step, with trl's own evaluation, so the eval losses compare; the trainer's
`train_runtime` less that `eval_runtime` is the training phase, and each total splits into that,
the evaluation and everything around them (the job's phases come from its run's entry). The two run in
`PAIRS` pairs, which side goes first alternating, so a warm file cache or a busy neighbour favours
neither; every row is the median over the pairs, its note the spread. The job keeps the listener's
own defaults (LoRA dropout included), the script peft's and trl's.

CPU use is counted for every process involved: the daemon, its training child (with the ranks it
starts, counted once the daemon has reaped it) and the database server on mongotune's side; the
script on the other.
"""

import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from bench.common import Context, Row, step
from bench.trainer_log import summary
from listener.processes import wait_until
from training import checkpoints, defaults

MODEL_ID = "bench"
COLLECTION = "pirate_chat"
ROOT = Path(__file__).parents[1]  # the script runs as `-m bench.baseline_train` from here, so it imports `bench`
TIMEOUT_S = 600.0
JOB = {
    "filter": {},  # both folds: `_fold` splits them, "valid" for the evaluation at the end
    "trainer": {"max_steps": 30, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "max_length": 256,
                "logging_steps": 5},
    "lora": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},  # dropout: each side's default
}
PAIRS = 3
SEED = 42  # pair n trains with seed 42 + n on both sides, so the eval losses compare over orders, not one order
INSIDE_TRAIN = ("progress_writes", "checkpoint_uploads")  # phases of the job counted within its `train` phase
FINISHED = ("succeeded", "failed", "cancelled")


def trainer_fields(job: dict) -> dict:
    """A job's trainer and LoRA settings in a `_models` document's words (LoRA settings are `lora_*` trainer fields),
    saving once, at the last step."""
    trainer, lora = job["trainer"], job["lora"]
    return {**trainer, "save_steps": trainer["max_steps"], "lora_r": lora["r"], "lora_alpha": lora["lora_alpha"],
            "lora_target_modules": lora["target_modules"]}


def model_document(model_path: str, model_id=MODEL_ID, seed=SEED) -> dict:
    """`JOB` in the document's own words."""
    return {
        "_id": model_id, "model_name_or_path": model_path,
        "data": {"collection": COLLECTION, "key": "messages", "filter": JOB["filter"]},
        "trainer": {**trainer_fields(JOB), "seed": seed},
    }


def _cpu(process: psutil.Process) -> tuple[float, float]:
    """CPU seconds of a process itself, and of the children it has reaped."""
    times = process.cpu_times()
    return times.user + times.system, times.children_user + times.children_system


def processes(ctx: Context) -> tuple[psutil.Process, psutil.Process | None]:
    """The bench's daemon (from its heartbeat) and the database server (the process listening on the URI's port)."""
    record = ctx.db[defaults.LISTENER].find_one({"kind": "daemon"})
    port = ctx.uri.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[1].split("?")[0]
    server = next((p for p in psutil.process_iter(["cmdline"])
                   if "--port" in (p.info["cmdline"] or []) and port in p.info["cmdline"]), None)
    return psutil.Process(record["pid"]), server


def idle(daemon: psutil.Process, timeout_s: float = 60.0) -> None:
    """Until the daemon and its descendants (the training child it starts ahead, importing its libraries
    after a job) use under a tenth of a CPU: neither side of a pair is timed beside the other's leftovers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        tree = [daemon, *daemon.children(recursive=True)]
        before = sum(_busy(p) for p in tree)
        time.sleep(0.5)
        if sum(_busy(p) for p in tree) - before < 0.05:
            return


def _busy(process: psutil.Process) -> float:
    try:
        return _cpu(process)[0]
    except psutil.NoSuchProcess:
        return 0.0


def through_daemon(ctx: Context, document: dict, what: str) -> dict:
    """`document` inserted once the daemon is idle, timed from the insert to `succeeded`: the seconds, the CPU
    seconds of the daemon, its training child and the database server, and the finished document."""
    models = ctx.db[defaults.MODELS]
    daemon, server = processes(ctx)
    idle(daemon)
    before = _cpu(daemon), server and _cpu(server)
    with step(ctx.console, f"{what} {document['_id']} via mongotune (insert to succeeded)") as timer:
        models.insert_one(document)
        done = wait_until(lambda: models.find_one({"_id": document["_id"], "status": {"$in": FINISHED}}), TIMEOUT_S,
                          f"{what} via mongotune", poll_s=0.25)
    after = _cpu(daemon), server and _cpu(server)
    if done["status"] != "succeeded":
        raise RuntimeError(f"{what} via mongotune {done['status']}: {done.get('error')}")
    cpu = {"daemon": after[0][0] - before[0][0], "training child": after[0][1] - before[0][1],
           **({"database server": after[1][0] - before[1][0]} if server else {})}
    return {"seconds": timer.seconds, "cpu": cpu, "document": done}


def through_script(ctx: Context, script: str, collection: str, job: dict, output: Path, what: str) -> dict:
    """The plain script `script` (a module of `bench`) on `job` in its own process, timed from launch to exit: the
    seconds, its CPU seconds and what its last stdout line says (JSON); its output beside `output` as `.log`."""
    command = [sys.executable, "-m", script, "--uri", ctx.uri, "--db", ctx.db.name, "--collection", collection,
               "--model", ctx.model_path, "--output", str(output), "--job", json.dumps(job)]
    idle(processes(ctx)[0])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with step(ctx.console, f"{what} via a plain trl script (launch to exit)") as timer:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    output.with_name(f"{output.name}.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise RuntimeError(f"the baseline {what} script failed:\n{done.stderr[-3000:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"seconds": timer.seconds, "cpu": {"script": cpu}, **json.loads(done.stdout.strip().splitlines()[-1])}


def alternate(pairs: int, ours: Callable[[int], dict], theirs: Callable[[int], dict]) -> tuple[list, list]:
    """`ours(n)` and `theirs(n)` for each of `pairs` pairs, which goes first alternating, so a warm file cache or a
    busy neighbour favours neither side."""
    mine, other = [], []
    for number in range(pairs):
        if number % 2:  # every other pair, the script goes first
            other.append(theirs(number))
        mine.append(ours(number))
        if not number % 2:
            other.append(theirs(number))
    return mine, other


def via_mongotune(ctx: Context, model_id=MODEL_ID, seed=SEED) -> dict:
    ran = through_daemon(ctx, model_document(ctx.model_path, model_id, seed), "training")
    document = ran.pop("document")
    return {**ran, "phases": document["runs"][-1].get("phases", {}), **summary(document["metrics"])}


def via_script(ctx: Context, output: Path, seed=SEED, trainer: dict | None = None) -> dict:
    """`trainer`: arguments the script adds to the job's (`bench.sampling` sets the order)."""
    job = {**JOB, "trainer": {**JOB["trainer"], "seed": seed, **(trainer or {})}}
    return through_script(ctx, "bench.baseline_train", COLLECTION, job, output, "training")


def _median(values: list[float]) -> tuple[float, str]:
    """The median and the spread, as the row shows them."""
    return statistics.median(values), f"{min(values):.3g}–{max(values):.3g}"


def steps_s(result: dict) -> float:
    """The training phase: the trainer's loop less its evaluation."""
    return result["train_runtime"] - result["eval_runtime"]


def in_process(result: dict) -> float:
    """The process's own time, phase by phase; the writes and uploads are inside `train` already."""
    return sum(v for k, v in result["phases"].items() if k not in INSIDE_TRAIN)


def phases_note(results: list[dict]) -> str:
    return ", ".join(f"{name} {statistics.median(r['phases'].get(name, 0.0) for r in results):.2f}"
                     for name in results[0]["phases"])


def _row(name: str, unit: str, ours: list[float], theirs: list[float], note: str = "") -> Row:
    (m, m_spread), (b, b_spread) = _median(ours), _median(theirs)
    return Row(name, unit, m, b, f"spread {m_spread} vs {b_spread}" + (f"; {note}" if note else ""))


def adapter_only(ctx: Context) -> Path:
    """One untimed training run through the daemon, for benchmarks that need the bench model but not its timing;
    its best checkpoint unpacked, as the adapter folder the storage benchmark copies."""
    via_mongotune(ctx)
    document = ctx.db[defaults.MODELS].find_one({"_id": MODEL_ID})
    return checkpoints.download(ctx.db, checkpoints.select(document, "best")["files_id"], ctx.home / "bench-adapter")


def run(ctx: Context) -> tuple[list[Row], Path]:
    """The rows, and the baseline's saved adapter folder (a real checkpoint for the storage benchmark)."""
    output = ctx.home / "baseline-adapter"
    ours, theirs = alternate(
        PAIRS, lambda n: via_mongotune(ctx, MODEL_ID if n == 0 else f"{MODEL_ID}-{n}", SEED + n),
        lambda n: via_script(ctx, output if n == 0 else ctx.home / f"baseline-{n}", SEED + n))
    steps = JOB["trainer"]["max_steps"]
    ratios = [o["seconds"] / t["seconds"] for o, t in zip(ours, theirs)]
    train_ratios = [steps_s(o) / steps_s(t) for o, t in zip(ours, theirs)]
    ratio, spread = _median(ratios)
    train_ratio, train_spread = _median(train_ratios)
    rows = [
        _row("training: end to end", "s", [r["seconds"] for r in ours], [r["seconds"] for r in theirs],
             f"whole-job ratio {ratio:.2f} ({spread}) over {PAIRS} pairs"),
        _row("training: training phase (loop less eval)", "s", [steps_s(r) for r in ours],
             [steps_s(r) for r in theirs], f"training-phase ratio {train_ratio:.2f} ({train_spread})"),
        _row("training: evaluation on the valid fold", "s", [r["eval_runtime"] for r in ours],
             [r["eval_runtime"] for r in theirs]),
        _row("training: seconds per step", "s", [steps_s(r) / steps for r in ours], [steps_s(r) / steps for r in theirs]),
        _row("training: trained tokens per second", "tok/s", [r["tokens"] / steps_s(r) for r in ours],
             [r["tokens"] / steps_s(r) for r in theirs]),
        _row("training: CPU, all processes", "cpu s", [sum(r["cpu"].values()) for r in ours],
             [sum(r["cpu"].values()) for r in theirs], "mongotune: " + ", ".join(
                 f"{k} {statistics.median(r['cpu'][k] for r in ours):.1f}" for k in ours[0]["cpu"])),
        _row(f"training: loss at step {steps}", "loss", [r["loss"] for r in ours], [r["loss"] for r in theirs]),
        _row("training: eval loss, valid fold", "loss", [r["eval_loss"] for r in ours], [r["eval_loss"] for r in theirs],
             "seeds {}-{}, one a pair; eval-loss ratio {:.3f}".format(SEED, SEED + PAIRS - 1, statistics.median(
                 r["eval_loss"] for r in ours) / statistics.median(r["eval_loss"] for r in theirs))),
        _row("training: phases in the process (mongotune | script)", "s", [in_process(r) for r in ours],
             [in_process(r) for r in theirs], f"{phases_note(ours)} | {phases_note(theirs)}"),
    ]
    return rows, output
