"""The training child: `python -m training.run MODEL_ID --db NAME`, the URI and limits on stdin.

The daemon starts one per job so that a crash or an out-of-memory here never takes it down.
The child writes progress, metrics, checkpoints and `error`; the daemon alone writes `status`,
reading the outcome from the exit code.
"""

import argparse
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import sys
from pathlib import Path

from bson import json_util
from pymongo import MongoClient

from training import checkpoints, defaults, ids
from training.config import ModelSpec, SpecError, parse_model
from training.errors import public_message
from training.limits import Limits
from training.progress import fence

log = logging.getLogger("mongotune.training")


def _resume_point(db, document: dict, work: Path, spec: ModelSpec, limits: Limits = Limits()) -> str | None:
    """The run's newest stored checkpoint, unpacked, when this run was interrupted before.

    It is found by its GridFS metadata (exactly this model and run), never through `checkpoints`,
    which users can write, and unpacked as a resume archive: safetensors, JSON and the states the
    trainer reads with `torch.load(weights_only=True)`.
    """
    if not isinstance(document.get("attempts"), int) or document["attempts"] < 2:
        return None  # a fresh claim: files of an earlier model with this id and run number are not ours to resume
    last = checkpoints.latest(db, spec.id, document.get("run"))
    if last is None:
        return None
    if spec.trainer.deepspeed is not None:
        log.warning("DeepSpeed keeps its optimizer state in pickles, which are never stored; run %d starts over",
                    last.run)
        return None
    log.info("resuming run %d from its checkpoint at step %d", last.run, last.step)
    folder = work / "resume" / f"checkpoint-{last.step}"
    return str(checkpoints.download(db, last.files_id, folder, kind="resume", max_bytes=limits.max_checkpoint_bytes))


def _check_gpus(spec: ModelSpec, torch) -> None:
    wanted, have = spec.trainer.num_gpus, torch.cuda.device_count()
    if wanted > 1 and have < wanted:
        raise SpecError("trainer.num_gpus", f"asks for {wanted} GPUs; this listener's host has {have}")


def _single_process_group() -> None:
    """DeepSpeed wants a process group even on one device; outside a launcher, be rank 0 of 1."""
    if "RANK" not in os.environ:
        with socket.socket() as sock:  # a port free now, for this process alone
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1")


def train(db, document: dict, work: Path, daemon: int, limits: Limits) -> int:
    import torch
    from peft import prepare_model_for_kbit_training
    from trl import SFTTrainer

    from training.arguments import lora_config, sft_config
    from training.dataset import build_datasets
    from training.models import check_model, load_checked_model, load_tokenizer
    from training.progress import MongoProgress

    spec = parse_model(document, limits)
    _check_gpus(spec, torch)
    check_model(spec, limits)
    if spec.trainer.deepspeed is not None:
        _single_process_group()
    train_set, valid_set = build_datasets(db, spec.data, limits)
    log.info("dataset: %d training and %d validation examples", len(train_set), len(valid_set or []))
    config = sft_config(spec.trainer, str(work / "output"), has_eval=valid_set is not None,
                        use_cpu=not torch.cuda.is_available(), keep=limits.max_checkpoints)
    tokenizer = load_tokenizer(spec, limits)
    model = load_checked_model(spec, limits)
    if spec.trainer.bits:
        model = prepare_model_for_kbit_training(model)
    progress = MongoProgress(db, spec.id, document["run"], keep=config.save_total_limit, daemon=daemon,
                             owner=os.environ.get(defaults.ENV_LEASE_OWNER), limits=limits)
    signal.signal(signal.SIGTERM, lambda *_: setattr(progress, "stop_requested", True))
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=train_set, eval_dataset=valid_set,
        processing_class=tokenizer, peft_config=lora_config(spec.trainer), callbacks=[progress],
    )
    trainer.train(resume_from_checkpoint=_resume_point(db, document, work, spec, limits))
    if progress.stop_requested:
        return defaults.ChildExit.STOPPED
    return defaults.ChildExit.CANCELLED if progress.cancelled else defaults.ChildExit.OK


def die_with_daemon() -> int:
    """The daemon's pid; on Linux the kernel also kills this process the moment the daemon dies.

    Without this a child orphaned by a SIGKILLed daemon would train on beside the run's next owner.
    """
    daemon = int(os.environ.get(defaults.ENV_DAEMON_PID, os.getppid()))
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: MongoProgress still notices the orphaning at the next step
    if os.getppid() != daemon:
        log.error("the daemon that started this training is already gone")
        sys.exit(defaults.ChildExit.ORPHANED)
    return daemon


def read_launch() -> dict:
    """The daemon's one line on stdin: the URI (never in the environment, which every descendant
    would inherit), the operator's limits and the work folder."""
    launch = json.loads(sys.stdin.readline())
    return {"uri": launch["uri"], "limits": Limits.model_validate(launch["limits"]), "work": Path(launch["work"])}


def failure(exc: Exception) -> dict:
    """The document's `error` for an exception: what to change, without host paths."""
    if isinstance(exc, SpecError):
        return exc.as_error()
    if isinstance(exc, checkpoints.LimitExceeded):
        return {"type": "limit_exceeded", "field": exc.field, "message": str(exc)}
    message = public_message(str(exc) or type(exc).__name__)
    if "out of memory" in message.lower():
        return {"type": "out_of_memory", "message": message + (
            " (lower trainer.per_device_train_batch_size or trainer.max_seq_length, raise "
            "trainer.gradient_accumulation_steps, or load the base in 4 bits with trainer.bits: 4)")}
    return {"type": "training_failed", "message": f"{type(exc).__name__}: {message}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.run")
    parser.add_argument("model_id", help="the model document's _id as extended JSON")
    parser.add_argument("--db", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    daemon = die_with_daemon()
    launch = read_launch()
    model_id = json_util.loads(args.model_id)
    client = MongoClient(launch["uri"], **defaults.CODEC)
    db = client[args.db]
    document = db[defaults.MODELS].find_one({"_id": ids.eq(model_id)})
    if document is None or not isinstance(document.get("run"), int):
        log.error("model %r is not claimed for training", model_id)
        return defaults.ChildExit.FAILED
    match = fence(model_id, document["run"], os.environ.get(defaults.ENV_LEASE_OWNER))
    work = launch["work"] / f"{os.getpid()}"
    try:
        work.mkdir(parents=True, exist_ok=True)
        return train(db, document, work, daemon, launch["limits"])
    except Exception as exc:
        log.exception("training failed")
        db[defaults.MODELS].update_one(match, {"$set": {"error": failure(exc)}})
        return defaults.ChildExit.INVALID if isinstance(exc, SpecError) else defaults.ChildExit.FAILED
    finally:
        shutil.rmtree(work, ignore_errors=True)
        client.close()


if __name__ == "__main__":
    sys.exit(main())
