"""`python -m bench.gpu`: fine-tunes on a GPU host through the real daemon, with what each costs.

Three runs of a 0.5-1B model (default Qwen/Qwen2.5-0.5B-Instruct; `--model` for another hub id or
folder) on the project's own documents (the README's paragraphs and every module's docstring): a bf16
LoRA, a QLoRA with the base in 4 bits, and, on a host with two GPUs or more, the bf16 LoRA on two
GPUs (two ranks through torchrun). Each prints trained tokens per second, peak GPU memory (sampled
from nvidia-smi, so it includes the CUDA context), model FLOPs utilisation (6 x parameters x tokens/s
over the card's dense bf16 peak) and the card. Not part of the tests or CI: on a host without a GPU
it exits with one line.
"""

import argparse
import ast
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLLECTION = "project_docs"
# Dense bf16 peak FLOP/s by card name (vendor datasheets, without sparsity); MFU is left out for others.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12,
             "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12}
TRAINER = {"max_steps": 60, "per_device_train_batch_size": 8, "max_length": 512, "learning_rate": 2e-4,
           "logging_steps": 10, "save_steps": 60, "bf16": True}
RUNS = {"bf16 LoRA, 1 GPU": {"num_gpus": 1}, "QLoRA 4-bit, 1 GPU": {"num_gpus": 1, "bits": 4},
        "bf16 LoRA, 2 GPUs": {"num_gpus": 2}}


def documents() -> list[dict]:
    """The README's paragraphs and the docstrings of the project's modules, one document each."""
    texts = [p.strip() for p in (ROOT / "README.md").read_text().split("\n\n") if len(p.strip()) > 200]
    for path in sorted([*ROOT.glob("listener/**/*.py"), *ROOT.glob("training/*.py")]):
        docstring = ast.get_docstring(ast.parse(path.read_text()))
        if docstring and len(docstring) > 200:
            texts.append(f"{path.relative_to(ROOT)}: {docstring}")
    return [{"text": text} for text in texts]


class PeakMemory:
    """The highest memory nvidia-smi reports on any GPU while the block runs, in GiB."""

    def __enter__(self):
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.5):
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout
            self.peak = max([self.peak, *(float(v) / 1024 for v in out.split())])

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_one(db, model: str, model_id: str, trainer: dict) -> dict:
    from listener.follow import finished, wait_for
    from training import defaults

    models = db[defaults.MODELS]
    models.insert_one({"_id": model_id, "model_name_or_path": model, "data": {"collection": COLLECTION},
                       "trainer": {**TRAINER, **trainer}})
    with PeakMemory() as memory:
        done = wait_for(models, model_id, finished, 3600, poll_s=1.0)
    if done["status"] != "succeeded":
        raise RuntimeError(f"{model_id} {done['status']}: {done.get('error')}")
    metrics = done["metrics"]
    runtime = next(m["train_runtime"] for m in metrics if "train_runtime" in m)
    tokens = max(m.get("num_tokens", 0) for m in metrics)
    return {"tokens_per_s": tokens / runtime, "peak_gib": memory.peak, "runtime_s": runtime}


def parameters(model: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="a hub id or a local folder")
    args = parser.parse_args(argv)
    import torch

    count = torch.cuda.device_count()
    if not count:
        print("bench.gpu: no GPU on this host; nothing to measure")
        return 0
    from pymongo import MongoClient

    from listener.embedded import EmbeddedServer, free_port
    from listener.processes import registered, start_listener, stop

    card = torch.cuda.get_device_name(0)
    peak = next((flops for name, flops in PEAK_BF16.items() if name in card), None)
    n = parameters(args.model)
    with tempfile.TemporaryDirectory(prefix="mongotune-gpu-") as scratch, ExitStack() as stack:
        home = Path(scratch)
        server = stack.enter_context(EmbeddedServer(home / "server", port=free_port(), memory=True))
        db = stack.enter_context(MongoClient(server.uri))["gpu"]
        db[COLLECTION].insert_many(documents())
        roots = ("--model-root", str(Path(args.model).parent)) if Path(args.model).is_dir() else ()
        daemon = start_listener(server.uri, db.name, "gpu", home / "daemon.log", home=home / "listener",
                                args=("--max-jobs", "1", *roots))
        stack.callback(stop, daemon)
        registered(db, daemon, 120)
        print(f"{card} x{count}, {args.model} ({n / 1e9:.2f} B parameters), {db[COLLECTION].count_documents({})} "
              "documents")
        for number, (label, trainer) in enumerate(RUNS.items()):
            if trainer["num_gpus"] > count:
                print(f"{label}: skipped, this host has {count} GPU")
                continue
            started = time.perf_counter()
            r = run_one(db, args.model, f"gpu-{number}", trainer)
            mfu = f"{6 * n * r['tokens_per_s'] / (peak * trainer['num_gpus']):.1%}" if peak else "n/a (unknown card)"
            print(f"{label}: {r['tokens_per_s']:,.0f} tokens/s, peak GPU memory {r['peak_gib']:.1f} GiB, MFU {mfu}, "
                  f"training {r['runtime_s']:.0f} s of {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
