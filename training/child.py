"""The training child: one per job, started by the daemon (`listener.forks`), its job as an argument.

The daemon starts one per job so that a crash or an out-of-memory here never takes it down; on a
host without GPUs it is forked from a process that has imported the training libraries already
(`training.preload`), so it starts training at once. `run` is that entry point. Ranks of a job of
several processes are torchrun's: `python -m training.child MODEL_ID --db NAME`, their job read from
their agent's file (`main`). The child writes progress, metrics, checkpoints and `error`; the daemon
alone writes `status`, reading the outcome from the exit code.
"""

import argparse
import contextlib
import functools
import gc
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

from bson import json_util
from pymongo import MongoClient

from training import (checkpoints, defaults, feedback, forgetting, ids, lifeline, lineage, methods, packing, padding,
                      promotion, ranks, starting)
from training.config import ModelSpec, SpecError, parse_model
from training.errors import public_message, said
from training.inert import inert_logging
from training.limits import Limits
from training.progress import fence

log = logging.getLogger(__name__)


def _resume_point(db, document: dict, work: Path, spec: ModelSpec, limits: Limits = Limits()) -> str | None:
    """The run's newest stored checkpoint, unpacked, when this run was interrupted before.

    It is found by its GridFS metadata (exactly this model and run), never through `checkpoints`,
    which users can write, and unpacked as a resume archive: safetensors, JSON and the states the
    trainer reads with `torch.load(weights_only=True)`, and DeepSpeed's, read under `_loads`.
    """
    if not isinstance(document.get("attempts"), int) or document["attempts"] < 2:
        return None  # a fresh claim: files of an earlier model with this id and run number are not ours to resume
    last = checkpoints.latest(db, spec.id, document.get("run"))
    if last is None:
        return None
    log.info("resuming run %d from its checkpoint at step %d", last.run, last.step)
    folder = work / "resume" / f"checkpoint-{last.step}"
    return str(checkpoints.download(db, last.files_id, folder, kind="resume", max_bytes=limits.max_checkpoint_bytes))


def _check_gpus(spec: ModelSpec, torch) -> None:
    """The GPUs the daemon gave this job (CUDA_VISIBLE_DEVICES) are there, one per process.

    On a CPU host a job of up to one GPU trains on the CPU, in as many processes as it asks for.
    """
    wanted, have = spec.trainer.num_gpus, torch.cuda.device_count()
    if wanted > 1 and have < wanted:
        raise SpecError("trainer.num_gpus", f"asks for {wanted} GPUs; this listener's host has {have}")
    count = ranks.processes(spec.trainer)
    if have and wanted and count != min(wanted, have):
        raise SpecError("trainer.num_processes", f"{count} processes on {min(wanted, have)} GPUs: on GPUs a job "
                        "runs one process per GPU; leave num_processes out or make it equal to num_gpus")


def _loads(spec: ModelSpec):
    """DeepSpeed reads its states from a resumed checkpoint with `torch.load(weights_only=False)`: in
    its runs every load is forced weights-only (`checkpoints.weights_only_loads`)."""
    return checkpoints.weights_only_loads() if spec.trainer.deepspeed is not None else contextlib.nullcontext()


def _single_process_group() -> None:
    """DeepSpeed wants a process group even on one device; outside a launcher, be rank 0 of 1."""
    if "RANK" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ranks.free_port()), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1")


def train(db, document: dict, work: Path, daemon: int, limits: Limits, sent: float = 0.0,
          nodes: list | None = None) -> int:
    import torch

    from training.arguments import lora_config, resolved_arguments, to_config
    from training.dataset import check_loss_options
    from training.models import check_model, load_checked_model, load_tokenizer
    from training.phases import Phases
    from training.progress import LogAtSaves, MongoProgress, NothingPastTheLastStep, Trained

    phases = Phases(sent)
    defined = parse_model(document, limits)  # the model's own method: a feedback run's guard reads its data
    spec, rated = feedback.run_spec(defined, document), lineage.from_feedback(document, defined)
    _check_gpus(spec, torch)
    check_model(spec, limits)
    phases.lap("check")
    if spec.trainer.deepspeed is not None:
        _single_process_group()
        if not torch.cuda.is_available():
            ranks.no_cpu_kernel_builds()
    tokenizer = functools.cache(lambda: load_tokenizer(spec, limits))  # loaded when first needed: SFT's after the data
    read_datasets = feedback.read_datasets if rated else methods.read_datasets
    train_set, valid_set, read = read_datasets(db, spec, limits, tokenizer)
    log.info("dataset: %d training and %d validation examples", len(train_set), len(valid_set or []))
    phases.lap("data")
    resolved = resolved_arguments(spec.trainer, str(work / "output"), has_eval=valid_set is not None,
                                  use_cpu=not torch.cuda.is_available(), keep=limits.max_checkpoints,
                                  method=spec.method)
    config = to_config(spec.method, padding.for_trl(resolved))
    if spec.trainer.deepspeed is not None and ranks.world()[1] > 1:
        ranks.join_deepspeed()
    check_loss_options(bool(resolved.get("assistant_only_loss")), train_set, tokenizer())
    model = _prepared(load_checked_model(spec, limits), spec, resolved)
    rank, world = ranks.world()
    model, started = starting.start_model(db, spec, document, model, work / f"rank{rank}", limits)  # ranks share work
    ranking = checkpoints.ranking(config.metric_for_best_model, config.greater_is_better)
    serving = promotion.serving_ref(document)
    progress = MongoProgress(db, spec.id, document["run"], keep=config.save_total_limit, daemon=daemon,
                             owner=os.environ.get(defaults.ENV_LEASE_OWNER), limits=limits, ranking=ranking,
                             hold_best=serving is not None) if rank == 0 else None
    phases.lap("model")
    if progress is not None:
        _begin_run(db, progress.match, document, spec, resolved, read, started, limits, nodes)
    callbacks = [*(ranks.callbacks(progress, daemon, limits) if world > 1 else [progress]), *_early_stopping(spec),
                 LogAtSaves(), NothingPastTheLastStep()]

    def stop(*_):  # save, stop, let any daemon resume the run
        for callback in callbacks:
            callback.stop_requested = True

    signal.signal(signal.SIGTERM, stop)
    if ranks.is_rank():
        ranks.forget_launch_file()
    trainer = methods.build_trainer(
        spec, limits, model=model, args=config, train_dataset=train_set, eval_dataset=valid_set,
        processing_class=tokenizer(), peft_config=None if started else lora_config(spec.trainer), callbacks=callbacks,
    )
    _check_steps(trainer, spec, len(train_set), read if rated else None)
    reference = methods.arrange(trainer, spec, resolved, started)
    if reference is not None and progress is not None:
        _record(db, progress, {"reference": reference})
    phases.lap("trainer")
    own = work / f"rank{rank}" if world > 1 else work  # each rank unpacks its own copy of a resumed checkpoint
    with _loads(spec):
        try:
            trainer.train(resume_from_checkpoint=_resume_point(db, document, own, spec, limits))
        except Trained as trained:  # interrupted after its last checkpoint: only the end of the run is left
            log.info("run %d already trained to its last step (%d); finishing it", document["run"], trained.step)
    phases.lap("train")
    if progress is None:
        return defaults.ChildExit.OK
    if progress.stop_requested:
        return defaults.ChildExit.STOPPED
    if progress.cancelled:
        return defaults.ChildExit.CANCELLED
    held_feedback = rated and valid_set is not None  # the gate scores ratings
    guard = forgetting.guard(db, defined, limits, tokenizer(), work / "guard") if held_feedback else None
    batches = methods.held_out(trainer, spec, guard)
    del trainer, model  # the gate loads the base once for both checkpoints: never beside the trained model
    gc.collect()
    promotion.conclude(db, progress.match, spec, document["run"], serving, batches, work, limits, ranking)
    phases.lap("end")
    _record_phases(db, progress, phases)
    return defaults.ChildExit.OK


def _check_steps(trainer, spec: ModelSpec, examples: int, rated: dict | None) -> None:
    """`methods.check_steps`; for a feedback run (`rated`: what it read) a run left without a step ends
    `NothingToTrain`: how many rows the trainer keeps (prompts that fill max_length dropped, fewer rows than a dropped
    last batch) is the raters' to decide, and a rater must not be able to fail the model."""
    try:
        methods.check_steps(trainer, spec, examples)
    except SpecError as exc:
        if rated is None:
            raise
        raise feedback.NothingToTrain(f"the {examples} rated answers read leave no step to train: {exc.message}",
                                      rated) from None


def _prepared(model, spec: ModelSpec, resolved: dict):
    """The checked model as the arguments need it: flat batches decided on it, and recorded in `resolved` as decided
    (the run's entry says whether batches were flat), packing checked, a quantized base made trainable."""
    if padding.flattened_here(resolved):
        given = spec.trainer.training_arguments()
        resolved["padding_free"] = padding.decide(model, asked="padding_free" in given)
        resolved.update(padding.sampling(resolved, given))
    if resolved.get("packing"):
        packing.check(model)
    if spec.trainer.bits:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    return model


def _begin_run(db, match: dict, document: dict, spec: ModelSpec, resolved: dict, read: dict, started, limits,
               nodes: list | None) -> None:
    """The run's `runs` entry, before the first step; `nodes`: a job of several nodes' hosts and devices."""
    from training.models import resolve_source

    if not lineage.start(db[defaults.MODELS], match, document, spec, resolved, read, started,
                         resolve_source(spec, limits), nodes):
        log.error("another daemon holds this run now (or its document is gone); stopping")
        sys.exit(defaults.ChildExit.LEASE_LOST)


def _record_phases(db, progress, phases) -> None:
    """The run's time by phase, with what its callbacks spent writing and uploading inside `train`."""
    seconds = {**phases.seconds, **progress.seconds()}
    log.info("phases (s): %s", " ".join(f"{k}={v}" for k, v in seconds.items()))
    _record(db, progress, {"phases": seconds})


def _record(db, progress, fields: dict) -> None:
    """`fields` on the run's entry."""
    update, filters = lineage.set_fields(progress.run, fields)
    db[defaults.MODELS].update_one(progress.match, update, array_filters=filters)


def _early_stopping(spec: ModelSpec) -> list:
    if not spec.trainer.early_stopping_patience:
        return []
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(early_stopping_patience=spec.trainer.early_stopping_patience)]


def parse_launch(launch: dict) -> dict:
    """The daemon's launch: the job, the URI (never in the environment, which every descendant would
    inherit), the operator's limits, the work folder and, for a job of several nodes, this one (`ranks.rendezvous`).
    A rank reads it from its agent's file."""
    return {"uri": launch["uri"], "limits": Limits.model_validate(launch["limits"]), "work": Path(launch["work"]),
            "model_id": launch.get("model_id"), "db": launch.get("db"), "log": launch.get("log"),
            "sent": launch.get("sent", 0.0), "node": launch.get("node"), "raw": launch}


def log_to(path: str) -> None:
    """From now on this process writes to its job's log (the daemon names it; the file is the daemon's)."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def failure(exc: Exception) -> dict:
    """The document's `error` for an exception: what to change, without host paths."""
    if isinstance(exc, SpecError):
        return exc.as_error()
    if isinstance(exc, checkpoints.LimitExceeded):
        return {"type": "limit_exceeded", "field": exc.field, "message": public_message(str(exc))}
    message = public_message(said(exc))
    if "out of memory" in message.lower():
        return {"type": "out_of_memory", "message": message + (
            " (lower trainer.per_device_train_batch_size or trainer.max_seq_length, raise "
            "trainer.gradient_accumulation_steps, or load the base in 4 bits with trainer.bits: 4)")}
    return {"type": "training_failed", "message": f"{type(exc).__name__}: {message}"}


def _logging(rank: str = "") -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s{rank} %(levelname)s %(message)s", stream=sys.stdout,
                        force=True)
    inert_logging()


def run(launch: dict, env: dict[str, str]) -> None:
    """The daemon's job, in a process `listener.forks` started: its log is the job's own from the first line."""
    parent = lifeline.adopt(env)
    log_to(launch["log"])
    _logging()
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        log.info("GPUs given by the listener: CUDA_VISIBLE_DEVICES=%s", os.environ["CUDA_VISIBLE_DEVICES"])
    launch = parse_launch(launch)
    sys.exit(_job(launch, json_util.loads(launch["model_id"]), launch["db"], parent, rank=False))


def main(argv: list[str] | None = None) -> int:
    """A rank of a job of several processes, started by torchrun on its agent's behalf."""
    parser = argparse.ArgumentParser(prog="python -m training.child")
    parser.add_argument("model_id", help="the document's _id as extended JSON")
    parser.add_argument("--db", required=True)
    args = parser.parse_args(argv)
    rank, world = ranks.world()
    _logging(f" rank{rank}")
    log.info("rank %d of %d: pid %d", rank, world, os.getpid())
    parent = int(os.environ[ranks.ENV_PARENT_PID])
    lifeline.die_with_parent()
    if os.getppid() != parent:
        log.error("the torchrun agent that started this rank is already gone")
        return defaults.ChildExit.ORPHANED
    launch = parse_launch(json.loads(ranks.read_launch_file()))
    return _job(launch, json_util.loads(args.model_id), args.db, parent, rank=True)


def forked_rank(argv: list[str]) -> None:
    """A rank forked from its agent (`ranks.launch` on a host without GPUs): `main`, as `python -m
    training.child` runs it, with the thread count torchrun gives each rank (OMP_NUM_THREADS, which this
    process's OpenMP read before torchrun set it)."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    sys.exit(main(argv))


def _job(launch: dict, model_id, db_name: str, parent: int, rank: bool) -> int:
    """Train the claimed model, or as a rank's agent start its ranks; the exit code tells the daemon how it ended."""
    client = MongoClient(launch["uri"], **defaults.CODEC)
    db = client[db_name]
    document = db[defaults.MODELS].find_one({"_id": ids.eq(model_id)})
    if document is None or not isinstance(document.get("run"), int):
        log.error("model %r is not claimed for training", model_id)
        client.close()
        return defaults.ChildExit.FAILED
    match = fence(model_id, document["run"], os.environ.get(defaults.ENV_LEASE_OWNER))
    work = launch["work"] if rank else launch["work"] / f"{os.getpid()}"  # ranks share their agent's, which it removes
    try:
        work.mkdir(parents=True, exist_ok=True)
        spec = parse_model(document, launch["limits"])
        count = 1 if rank else ranks.processes(spec.trainer)
        if count > 1 or (launch["node"] and not rank):
            import torch

            _check_gpus(spec, torch)
            return ranks.launch(db, match, work, launch["raw"], count, [launch["model_id"], "--db", db_name],
                                forked=None if torch.cuda.device_count() else forked_rank, node=launch["node"])
        code = train(db, document, work, parent, launch["limits"], launch["sent"],
                     (launch["node"] or {}).get("members"))
    except feedback.NothingToTrain as nothing:
        log.warning("nothing to train: %s", nothing)
        if ranks.world()[0] == 0:
            lineage.nothing_to_train(db[defaults.MODELS], match, document, nothing.read, str(nothing))
        code = defaults.ChildExit.NOTHING_TO_TRAIN
    except Exception as exc:
        log.exception("training failed")
        db[defaults.MODELS].update_one(ranks.error_match(match), {"$set": {"error": failure(exc)}})
        code = defaults.ChildExit.INVALID if isinstance(exc, SpecError) else defaults.ChildExit.FAILED
    finally:
        if not rank:
            shutil.rmtree(work, ignore_errors=True)
        client.close()
    return ranks.exit_code(work, code)


if __name__ == "__main__":
    sys.exit(main())
