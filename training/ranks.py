"""Several training processes for one job, started by torchrun (`torch.distributed.run`).

With `trainer.num_processes` above one, the training child becomes torchrun's agent in its own
process (so the daemon supervises, signals and outlives the same pid as for one process) and
torchrun starts the ranks: on a host without GPUs forked from the agent, which has torch,
transformers, peft and trl imported already (a fresh interpreter spends about seven seconds of a CPU
on them, per rank); with GPUs each is `python -m training.child` again, since CUDA must not be
initialised in a process that forks. What holds for one process holds for the group:

- The URI never enters an environment or a command line: the agent writes the daemon's launch
  line to a 0600 file in its own work folder (named by its pid, so housekeeping knows it), the
  ranks read it, and rank 0 deletes it once every rank has.
- Rank 0 alone writes progress, metrics and checkpoints; every rank writes `error` when it fails,
  only if none is set yet, so the job fails with the first rank's error.
- Every rank stops at the same step: cancel (seen by rank 0) and SIGTERM (which torchrun forwards
  to every rank) are agreed on with an all-reduce at every step end and log, then all ranks save
  one checkpoint together and stop.
- The agent dies with the daemon and every rank with the agent (PR_SET_PDEATHSIG, and the parent
  check at each step), so a SIGKILLed daemon leaves nothing training.
- Every rank records its exit code for the agent, which exits with its first rank's: torchrun's own exit
  code says only whether some worker failed, and a rank with none recorded died outright.

A job of several nodes (`trainer.num_nodes`, agreed by the daemons in `listener.gangs`) is the same on each node's
host with `--nnodes N --node-rank i`, node 0's endpoint and the run's rendezvous id, given by the daemon (never by
the document): static rendezvous, node 0's agent hosting the store, so global rank 0 (the one that writes) is on
node 0. Each node's agent starts and supervises only its own ranks, in its own work folder; at each save the other
nodes' parts of the checkpoint (ZeRO states, RNG states) reach rank 0 over the process group (`training.shards`), so
the one stored checkpoint holds every rank's.
"""

import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from training import defaults, shards
from training.limits import Limits

log = logging.getLogger(__name__)

ENV_LAUNCH = "MONGOTUNE_LAUNCH_FILE"  # set for a rank: the file holding the daemon's launch line
ENV_PARENT_PID = "MONGOTUNE_PARENT_PID"  # set for a rank: the torchrun agent it must not outlive
LAUNCH_FILE = "launch.json"
EXIT_FILE = "exit-code"  # `exit-code.<rank>`, each rank's; its node's first rank's is the node's (the job's on node 0)
PEER_GRACE_S = 2.0  # how long a failing rank waits to exit, so that torchrun sees a peer that died outright first
RENDEZVOUS_TIMEOUT_S = 120  # how long a node's agent waits for the others at the rendezvous
EXIT_BARRIER_S = 15  # how long node 0's agent, its ranks done, waits for the other nodes' agents to be done too


def free_port() -> int:
    """A port free now on the loopback, for a process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def world() -> tuple[int, int]:
    """This process's rank and the number of ranks (0 and 1 outside a launcher)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    """This process's rank on its node (its agent's first rank is 0)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_rank() -> bool:
    """Started by torchrun for a job (not the single child the daemon starts)."""
    return ENV_LAUNCH in os.environ


def processes(trainer) -> int:
    """`trainer.num_processes`, else one per GPU asked for, else one."""
    return trainer.num_processes or max(trainer.num_gpus, 1)


def read_launch_file() -> str:
    return Path(os.environ[ENV_LAUNCH]).read_text()


def error_match(match: dict) -> dict:
    """Where a rank may write `error`: the run's fence, and only while no rank has written one."""
    return {**match, "error": {"$exists": False}} if is_rank() else match


def _exit_file(work: Path, rank: int) -> Path:
    return work / f"{EXIT_FILE}.{rank}"


def exit_code(work: Path, code: int) -> int:
    """A rank's exit: every rank records its code (a rank without one died outright), its node's first rank's is
    the node's; an orderly end is 0 to torchrun.

    A failing rank waits a moment first: when a peer is killed outright the others fail at once on its
    broken connection, and on a host without GPUs torchrun reports only the first failure it polls."""
    if not is_rank():
        return code
    rank = world()[0]
    ended = code in defaults.ORDERLY_EXITS
    if not ended:
        time.sleep(PEER_GRACE_S)
    _exit_file(work, rank).write_text(str(int(code)))
    return 0 if ended else code


def rendezvous(node: dict | None) -> list[str]:
    """torchrun's options for where its agents meet: this host alone, or the daemons' gang (`node`: rank, count,
    node 0's addr and port, and the run's rendezvous id, which the static rendezvous prefixes its keys with: an
    agent of another run that reaches this endpoint waits on keys no agent of this one writes, and times out)."""
    if node is None:
        return ["--nnodes=1", "--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    return [f"--nnodes={node['count']}", f"--node-rank={node['rank']}", "--rdzv-backend=static",
            f"--master-addr={node['addr']}", f"--master-port={node['port']}",
            f"--rdzv-id={node['rendezvous']}", f"--rdzv-conf=timeout={RENDEZVOUS_TIMEOUT_S}"]


def launch(db, match: dict, work: Path, raw: dict, count: int, argv: list[str], forked: Callable | None,
           node: dict | None = None) -> int:
    """Be torchrun's agent for `count` ranks on this node: each forked from this process to run `forked(ARGV)`, or
    without `forked` each `python -m training.child ARGV`; the node's exit code.

    `raw` is the daemon's launch line; the ranks get it with this work folder as their shared one.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    path = work / LAUNCH_FILE
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(json.dumps({**raw, "work": str(work)}))
    os.environ.update({ENV_LAUNCH: str(path), ENV_PARENT_PID: str(os.getpid())})
    log.info("starting %d training processes through torchrun%s", count,
             f" as node {node['rank']} of {node['count']}" if node else "")
    failures = {}
    # torchrun's own command line and defaults (OMP_NUM_THREADS=1 per rank among them), whichever way ranks start
    config, entrypoint, args = config_from_args(parse_args([
        *rendezvous(node), f"--nproc-per-node={count}", "--max-restarts=0", "-m", "training.child", *argv]))
    if forked is not None:
        config.start_method, entrypoint, args = "fork", forked, [argv]
    if node is not None and node["rank"] == 0:
        _short_exit_barrier()
    try:
        elastic_launch(config, entrypoint)(*args)
    except ChildFailedError as exc:
        failures = exc.failures
    except Exception as exc:  # torchrun turns SIGTERM into an exception once the ranks are stopped
        log.info("torchrun stopped: %s", type(exc).__name__)
    finally:
        path.unlink(missing_ok=True)
    first_rank = node["rank"] * count if node else 0
    ours = range(first_rank, first_rank + count)
    if failures:
        _record_crash(db, match, failures, [r for r in ours if not _exit_file(work, r).exists()],
                      count * (node["count"] if node else 1))
    recorded = _exit_file(work, first_rank)
    if recorded.exists():
        return int(recorded.read_text())
    first = failures.get(first_rank)  # it left without recording: its own exit (lease lost, orphaned) is the node's
    return first.exitcode if first is not None and first.exitcode > 0 else defaults.ChildExit.FAILED


def _short_exit_barrier() -> None:
    """Node 0's agent hosts the rendezvous store and, its ranks done, waits at torchrun's exit barrier for every other
    node's agent: 300 s, not a launcher option. An agent stopped by SIGTERM (its daemon stopping) leaves without
    arriving, and the run would stay `running` that long after every rank stopped. The node's exit code comes from
    its exit file, never from the barrier; this agent process runs this one job alone."""
    from functools import partial

    from torch.distributed.launcher import api

    api.LocalElasticAgent = partial(api.LocalElasticAgent, exit_barrier_timeout=EXIT_BARRIER_S)


def _record_crash(db, match: dict, failures: dict, silent: list[int], count: int) -> None:
    """A rank that died outright (`silent`: it recorded no exit code) wrote nothing, and the others then
    failed on its broken connection: its death is the job's error. Otherwise each failed rank wrote its
    own, and the first one stays. torchrun may report only one failure, not necessarily the silent one's."""
    killed = sorted((rank, f.exitcode) for rank, f in failures.items()  # torchrun stops the others with SIGTERM
                    if f.exitcode < 0 and f.exitcode != -signal.SIGTERM)
    outright = [(rank, None) for rank in silent if rank not in failures]  # no exit code at all
    rank, exitcode = (killed + outright)[0] if killed or outright else \
        min(((r, f.exitcode) for r, f in failures.items()), key=lambda item: failures[item[0]].timestamp)
    if exitcode is None:
        why = "was killed by a signal (SIGKILL often means out of memory)"
    elif exitcode < 0:
        name = signal.Signals(-exitcode).name
        why = f"was killed by {name}" + (" (often: out of memory)" if name == "SIGKILL" else "")
    else:
        why = f"exited with code {exitcode}"
    error = {"type": "training_crashed", "message": f"training process rank {rank} of {count} {why}; "
             "the listener's job log says more"}
    where = match if exitcode is None or exitcode < 0 else {**match, "error": {"$exists": False}}
    db[defaults.MODELS].update_one(where, {"$set": {"error": error}})


def callbacks(progress, parent: int, limits: Limits) -> list:
    """The trainer callbacks of a rank: rank 0's `progress` between the two that keep ranks in step."""
    from transformers import TrainerCallback

    class SavedEverywhere(TrainerCallback):
        """Every rank has written its part of a checkpoint (its RNG state, its ZeRO states) before rank 0 uploads
        it; across nodes, the other nodes' parts reach rank 0's folder first (`training.shards`)."""

        def on_save(self, args, state, control, **kwargs):
            import torch.distributed as dist

            dist.barrier()
            if shards.several_nodes():
                shards.collect(Path(args.output_dir) / f"checkpoint-{state.global_step}", limits)

    class Agreement(TrainerCallback):
        """All ranks take the same stop decision at the same points, or the next collective would hang."""

        def __init__(self):
            self.stop_requested = False  # set by this rank's SIGTERM handler

        def _agree(self, control) -> None:
            import torch
            import torch.distributed as dist

            flags = torch.tensor([float(self.stop_requested), float(bool(progress and progress.cancelled)),
                                  float(control.should_training_stop)])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stop, cancelled, stopping = (bool(f) for f in flags.tolist())
            if progress is not None:
                progress.stop_requested = progress.stop_requested or stop
            if stop or cancelled or stopping:
                control.should_training_stop = True
                control.should_save = control.should_save or stop or cancelled

        def on_step_end(self, args, state, control, **kwargs):
            if os.getppid() != parent:
                log.error("the torchrun agent of this rank is gone; exiting")
                os._exit(defaults.ChildExit.ORPHANED)
            self._agree(control)

        def on_log(self, args, state, control, logs=None, **kwargs):
            self._agree(control)

    return [SavedEverywhere(), *([progress] if progress is not None else []), Agreement()]


def no_cpu_kernel_builds() -> None:
    """On a host without a GPU, DeepSpeed's communication backend probes every op it knows (compiler runs in each
    rank) and builds its shared-memory all-reduce kernel with the host's C++ compiler the first time in each
    environment: about a minute of CPU, and a compiler the host must have, for an optimisation of CPU
    inference. Its answer is read for that kernel alone (deepspeed 0.19, `comm.torch.build_shm_op`): an empty
    answer keeps torch's own gloo all-reduce, which ZeRO on a CPU uses anyway."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {}


def join_deepspeed() -> None:
    """DeepSpeed's own view of the process group the trainer's arguments opened; without it ZeRO-3's
    `zero.Init` at model load counts one rank and refuses the batch size computed for all of them."""
    import deepspeed

    deepspeed.init_distributed()


def forget_launch_file() -> None:
    """Each node's first rank, once the process group is up (every rank has read the file): remove the URI from disk."""
    import torch.distributed as dist

    dist.barrier()
    if local_rank() == 0:
        Path(os.environ[ENV_LAUNCH]).unlink(missing_ok=True)

