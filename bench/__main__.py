"""`python -m bench`: training, serving and checkpoint storage, each against a user's own baseline.

Everything runs in one process tree that this command owns: its own in-memory embedded server and
its own `listener start` daemon, both stopped at the end even on failure, so a run never touches a
user's data and any two runs start alike.
"""

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import tempfile
import time
import warnings
from contextlib import ExitStack
from pathlib import Path

from pymongo import MongoClient
from rich.console import Console

from bench import dpo, feedback, load, sampling, serving, storage, training
from bench.common import Context, Row, running_daemon, table
from listener.demo import load_samples
from listener.embedded import EmbeddedServer, free_port

RESULTS = Path(__file__).with_name("results") / "latest.json"
PARTS = ("training", "serving", "storage")  # `make bench`
ON_REQUEST = ("sampling", "load", "dpo", "feedback")  # long studies and the DPO comparisons, run only when named


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "tiny"),
                        help="smollm2 (the default): the offline SmolLM2-135M-Instruct (a few minutes on a CPU); "
                             "tiny: a tiny random model, to check the harness in under a minute, and the default "
                             "of `--only load`, which measures daemons and database rather than generation")
    parser.add_argument("--only", choices=PARTS + ON_REQUEST, action="append",
                        help="run only this benchmark (repeatable); without training, serving and storage use "
                             "one untimed training run through the daemon for their adapter; not run by default: "
                             "sampling (eval loss of length-grouped against random order over several seeds), "
                             "load (1, 2 and 3 daemons on one database, and daemons SIGKILLed under load), dpo "
                             "(a DPO job against the plain trl DPOTrainer script) and feedback (a DPO run from "
                             "ratings of served answers, with its promotion gate, against the same script)")
    args = parser.parse_args(argv)
    args.only = tuple(args.only or PARTS)
    args.model = args.model or ("tiny" if args.only == ("load",) else "smollm2")
    return args


def base_model(name: str, home: Path, console: Console) -> str:
    if name == "tiny":
        from training import tiny_model

        return str(tiny_model.build(home / "models" / "tiny"))
    from training.offline import smollm2_path

    return str(smollm2_path(log=console.log))


def machine() -> dict:
    """What the numbers depend on, saved beside them."""
    import peft
    import torch
    import transformers
    import trl

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "peft": peft.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def measure(console: Console, model: str, parts: tuple[str, ...] = PARTS) -> list[Row]:
    from transformers.utils import logging as transformers_logging

    # Progress bars and deprecation notices from the libraries would break the console's status lines.
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    home = Path(tempfile.mkdtemp(prefix="mongotune-bench-"))
    try:
        rows = _measure(console, model, parts, home)
    except BaseException:
        console.log(f"[red]the run failed: its folder is kept for its logs (the daemons' and their jobs'): {home}")
        raise
    shutil.rmtree(home, ignore_errors=True)
    return rows


def _measure(console: Console, model: str, parts: tuple[str, ...], home: Path) -> list[Row]:
    with ExitStack() as stack:
        server = stack.enter_context(EmbeddedServer(home / "server", port=free_port(), memory=True))
        client = stack.enter_context(MongoClient(server.uri))
        ctx = Context(console, client["bench"], server.uri, home, base_model(model, home, console))
        load_samples(ctx.db)
        if set(parts) - {"load"}:  # load starts its own daemons, and this one's work would count in its figures
            stack.enter_context(running_daemon(ctx))
        training_rows, adapter = training.run(ctx) if "training" in parts else ([], None)
        if adapter is None and {"serving", "storage"} & set(parts):
            adapter = training.adapter_only(ctx)
        return [*training_rows, *(serving.run(ctx) if "serving" in parts else []),
                *(storage.run(ctx, adapter) if "storage" in parts else []),
                *(sampling.run(ctx) if "sampling" in parts else []), *(load.run(ctx) if "load" in parts else []),
                *(dpo.run(ctx) if "dpo" in parts else []), *(feedback.run(ctx) if "feedback" in parts else [])]


def busy_cpus(console: Console) -> float:
    """How busy the CPUs are just before we start: other work on the machine skews every figure, so say so.

    A one-second sample (psutil comes with accelerate), not the load average, which lags by minutes.
    """
    import psutil

    busy = psutil.cpu_percent(interval=1.0)
    if busy > 20:
        console.log(f"[yellow]the CPUs are {busy:.0f}% busy before starting: other processes are running "
                    "and the timings will be noisy")
    return busy


def _exit_on_sigterm(signum, frame) -> None:
    """SIGTERM (`timeout`, a CI job cancelled) unwinds like Ctrl-C, so the server and daemons this run started are
    stopped; Python's default would end the process at once and leave them running."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = parse(argv)
    console = Console()
    busy = busy_cpus(console)
    started = time.perf_counter()
    parts = args.only
    rows = measure(console, args.model, parts)
    wall = time.perf_counter() - started
    console.print(table(rows, f"mongotune vs baseline ({args.model}, {os.cpu_count()} CPUs)"))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "model": args.model,
        "parts": parts,
        "wall_s": round(wall, 1), "machine": {**machine(), "cpu_busy_percent_at_start": busy},
        "rows": [row.as_json() for row in rows],
    }, indent=2) + "\n")
    console.log(f"all benchmarks in {wall:.0f} s; results written to {RESULTS}")


if __name__ == "__main__":
    main()
