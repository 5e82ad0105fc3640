"""Supervising one training child: start it, keep its lease, watch for cancel, record how it ended.

The child is its own process (`training.child.run`, started by `listener.forks`), so a crash, an
out-of-memory kill or a CUDA error ends the job, not the daemon. The supervisor is a bounded loop:
wait -> renew the lease -> check cancel and the wall-clock cap -> kill past the grace period.
Whatever the database says meanwhile, the supervisor returns only once the child has exited, so a
training slot is never freed while its child still runs.
"""

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path

from bson import json_util
from pymongo.errors import PyMongoError

from listener import gangs
from listener.forks import Forks, Started
from listener.gpus import cuda_env
from listener.leases import NODE_LOST, STATE_FIELDS, renew, requeue
from listener.records import BadRecord, ModelState, Renewed, parse
from listener.settings import ALIVE_BEATS, Settings
from listener.status import MODEL_TRANSITIONS, Status, transition
from training import defaults, ids, lineage
from training.defaults import ORDERLY_EXITS, ChildExit

log = logging.getLogger(__name__)

def log_path(settings: Settings, db_name: str, model_id, run: int, node: int = 0) -> Path:
    """One file per database, model, run and node after the first; distinct for ids that read alike ("a/b", "a_b",
    1, "1")."""
    suffix = f"-node{node}" if node else ""
    return settings.job_logs / f"{db_name}.{ids.file_name(model_id)}-run{run}{suffix}.log"  # no "." in a db name


def trim_log(path: Path, max_bytes: int) -> None:
    """Keep a job log under `max_bytes`: the child appends, so cutting the file keeps its newest half.

    A log not there yet is nothing to trim: a child opens its own as it starts."""
    try:
        if path.stat().st_size <= max_bytes:
            return
        with open(path, "r+b") as f:
            f.seek(-(max_bytes // 2), os.SEEK_END)
            tail = f.read()
            f.seek(0)
            f.truncate()
            f.write(b"[... earlier lines trimmed: the log is capped by MONGOTUNE_MAX_LOG_BYTES ...]\n" + tail)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("cannot trim %s: %s", path.name, exc)


def _crash_error(code: int, path: Path) -> dict:
    if code < 0:
        name = signal.Signals(-code).name
        why = f"the training process was killed by {name}" + (" (often: out of memory)" if name == "SIGKILL" else "")
    else:
        why = f"the training process exited with code {code}"
    return {"type": "training_crashed", "message": f"{why}; the listener's job log {path.name} says more"}


async def stop_child(process: Started, grace_s: float) -> None:
    """SIGTERM (the child saves a checkpoint), then SIGKILL past `grace_s`; returns once it has exited."""
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), grace_s)
        except TimeoutError:
            process.kill()
            await process.wait()


def _keeper(models, settings: Settings, model_id, owner: str, node: gangs.Node | None):
    """How this daemon keeps its hold on the run: the lease, or a member's entry in the gang (`listener.gangs`)."""
    if node is not None and node.rank > 0:
        return lambda projection=None: gangs.renew(models, model_id, node.rank, owner, settings.lease_s,
                                                   Status.RUNNING, projection)
    return lambda projection=None: renew(models, model_id, owner, settings.lease_s, projection)


async def supervise(db, settings: Settings, model_id, run: int, owner: str, forks: Forks,
                    devices: tuple[int, ...] | None = None, node: gangs.Node | None = None) -> Status:
    """Run one claimed training to its end and write its final status; returns that status.

    `devices`: the GPUs the daemon gave this job (`listener.gpus`); None on a CPU host. `node`: this daemon's node of
    a job of several; node 0 writes the status as for one node, any other only reports its node's exit."""
    path = log_path(settings, db.name, model_id, run, node.rank if node else 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    job = {"uri": settings.uri, "limits": settings.limits.model_dump(mode="json"), "work": str(settings.home / "work"),
           "model_id": json_util.dumps(model_id), "db": db.name, "log": str(path), "sent": time.time(),
           **({"node": node.launch()} if node else {})}
    env = {defaults.ENV_LEASE_OWNER: node.lease_owner if node else owner, **cuda_env(devices)}
    keep = _keeper(db[defaults.MODELS], settings, model_id, owner, node)
    starting = asyncio.ensure_future(forks.start("training.child:run", job, env))
    try:
        process = await _keeping_lease(keep, settings, starting)
    except OSError as exc:
        log.error("training %r could not start: %s", model_id, exc)
        error = {"type": "training_crashed", "message": f"the training process could not start ({exc.strerror or exc}); "
                                                        "the listener's log says more"}
        return await _end(db[defaults.MODELS], model_id, run, owner, Status.FAILED, {"error": error})
    log.info("training %r run %d started (pid %d, log %s)", model_id, run, process.pid, path.name)
    watch = _Watch(time.monotonic(), keep, run, db[defaults.LISTENER] if node and node.rank == 0 else None)
    try:
        outcome = await _watch_child(db[defaults.MODELS], settings, model_id, run, owner, process, path, watch)
    finally:
        await stop_child(process, settings.kill_grace_s)  # also on cancellation: the child never outlives this
    if node is not None and node.rank > 0:
        await gangs.report_exit(db[defaults.LISTENER], ids.key(model_id), run, owner, process.returncode)
        log.info("training %r: node %d ended (exit code %d)", model_id, node.rank, process.returncode)
        return Status.RUNNING  # node 0 decides the run's end
    # A lost member costs an attempt only when this node failed with it: ranks that saved and stopped together
    # (a member's daemon stopping, which takes its heartbeat with it) end as any stop does.
    if outcome is None and node is not None and process.returncode not in NOT_FAILURES:
        outcome = await _node_lost(db, settings, model_id, owner, watch.lost)
    if outcome is None:
        outcome = await _finish(db[defaults.MODELS], model_id, run, owner, process.returncode, path)
    return outcome


async def _node_lost(db, settings: Settings, model_id, owner: str, lost: list[int]) -> Status | None:
    """Node 0's node failed: when a member is lost (or is found lost within a heartbeat's expiry), hand the run back
    to resume once the gang forms again, an attempt counted; None when no member was lost (a failure of its own)."""
    models = db[defaults.MODELS]
    lost = lost or await gangs.lost_peers(models, db[defaults.LISTENER], model_id, ids.key(model_id),
                                          settings.lease_s + ALIVE_BEATS * settings.heartbeat_s)
    if not lost:
        return None
    log.warning("training %r: node(s) %s of its gang are lost; handing the run back", model_id, lost)
    document = await models.find_one({"_id": ids.eq(model_id), "lease.owner": {"$eq": owner}}, STATE_FIELDS)
    if document is None:
        return Status.RUNNING
    try:
        state = parse(ModelState, document)
    except BadRecord:  # a user overwrote its history or attempts: the run ends as one node's failure would
        return None
    done = await requeue(models, MODEL_TRANSITIONS, state, settings.max_attempts, NODE_LOST)
    return Status.RUNNING if done is None else Status(done["status"])


async def _keeping_lease(keep, settings: Settings, starting: asyncio.Future) -> Started:
    """The child once started, the lease renewed meanwhile: the first child of a daemon on a CPU host waits for
    the fork server's imports, seconds a short lease may not have. Cancelled meanwhile, the child is killed
    as soon as it exists: it has not trained yet."""
    try:
        while not (await asyncio.wait({starting}, timeout=settings.lease_s / 4))[0]:
            with contextlib.suppress(PyMongoError):
                await keep()
    except asyncio.CancelledError:
        starting.add_done_callback(_kill_started)
        raise
    return starting.result()


def _kill_started(starting: asyncio.Future) -> None:
    if not starting.cancelled() and starting.exception() is None:
        starting.result().kill()


async def _watch_child(models, settings: Settings, model_id, run: int, owner: str, process,
                       path: Path, watch: "_Watch") -> Status | None:
    """Wait for the child while keeping its lease; a status when the supervisor itself decided the end."""
    while process.returncode is None:
        try:
            await asyncio.wait_for(process.wait(), settings.lease_s / 4)
            break
        except TimeoutError:
            pass
        # In a thread: cutting a log near its cap reads and rewrites megabytes, never on the loop that renews leases.
        await asyncio.to_thread(trim_log, path, settings.max_log_bytes)
        try:
            decided = await _tick(models, settings, model_id, owner, process, watch)
        except PyMongoError as exc:
            decided = await _unreachable(settings, model_id, process, watch, exc)
        except Exception:  # a bug here must not leave the child unsupervised
            log.exception("supervising %r: unexpected error; still supervising", model_id)
            decided = None
        if decided is not None:
            return decided
    if watch.over_time:
        return await _fail_over_time(models, settings, model_id, run, owner)
    return None


class _Watch:
    def __init__(self, started: float, keep, run: int, listener=None):
        self.started = self.renewed = started
        self.keep = keep  # renews the hold on the run (`_keeper`)
        self.run = run
        self.listener = listener  # node 0 of a gang: where it judges its members
        self.lost: list[int] = []  # node 0: members found lost while training
        self.cancel_seen: float | None = None
        self.logged_step: int | None = None
        self.over_time = False


async def _tick(models, settings: Settings, model_id, owner: str, process, watch: _Watch) -> Status | None:
    current = await watch.keep({"cancel": 1, "progress": 1, "nodes": 1})
    if current is None:
        log.warning("lost the lease on %r; stopping its training", model_id)
        await stop_child(process, settings.kill_grace_s)
        return Status.RUNNING
    watch.renewed = time.monotonic()
    try:
        state = parse(Renewed, current)
    except BadRecord as exc:
        log.warning("training %r: unreadable progress or cancel (%s); still supervising", model_id, exc)
        return None
    watch.logged_step = _log_progress(model_id, state, watch.logged_step)
    if watch.listener is not None and not watch.lost:
        await _judge_members(current, model_id, process, watch)
    now = time.monotonic()
    if state.cancel:
        watch.cancel_seen = watch.cancel_seen or now
        if now - watch.cancel_seen > settings.kill_grace_s:
            await stop_child(process, settings.kill_grace_s)
    if not watch.over_time and now - watch.started > settings.max_run_s:
        log.warning("training %r passed the wall-clock cap of %.0f s; stopping it", model_id, settings.max_run_s)
        watch.over_time = True
        process.terminate()  # the child saves a checkpoint and exits; the run then fails naming the cap
    return None


async def _judge_members(current: dict, model_id, process, watch: _Watch) -> None:
    """Node 0: a member lost (its daemon gone, its entry expired) stops this node too; the run is then handed back."""
    try:
        verdict = await gangs.judge(watch.listener, ids.key(model_id), gangs.members(current), since=1,
                                    run=watch.run)
    except BadRecord:  # a user rewrote `nodes` as it ran: nothing to judge the members by
        return
    if lost := verdict.lost:
        log.warning("training %r: node(s) %s of its gang are lost; stopping this node", model_id, lost)
        watch.lost = lost
        process.terminate()


async def _unreachable(settings: Settings, model_id, process, watch: _Watch, exc: Exception) -> Status | None:
    if time.monotonic() - watch.renewed <= settings.lease_s:
        return None
    log.warning("could not renew the lease on %r for %.0f s (%s); stopping its training", model_id,
                settings.lease_s, type(exc).__name__)
    await stop_child(process, settings.kill_grace_s)
    return Status.RUNNING  # another daemon may own it by now


def _log_progress(model_id, state: Renewed, last_step: int | None) -> int | None:
    """One line per lease renewal while the step moves on; returns the step logged."""
    progress = state.progress
    if progress is None or not progress.total_steps or progress.step == last_step:
        return last_step
    log.info("training %r: step %d/%d%s%s", model_id, progress.step, progress.total_steps,
             "" if progress.loss is None else f", loss {progress.loss:.4f}",
             "" if progress.eta_s is None else f", ETA {progress.eta_s:.0f} s")
    return progress.step


async def _fail_over_time(models, settings: Settings, model_id, run: int, owner: str) -> Status:
    error = {"type": "limit_exceeded", "field": "trainer",
             "message": f"the run took longer than the operator's cap of {settings.max_run_s:.0f} s of wall-clock "
                        "time; its last checkpoint is kept. Train fewer steps (trainer.max_steps, "
                        "trainer.num_train_epochs), or the operator raises MONGOTUNE_MAX_RUN_S"}
    return await _end(models, model_id, run, owner, Status.FAILED, {"error": error})


async def _end(models, model_id, run: int, owner: str, new: Status, fields: dict, ran: str | None = None) -> Status:
    """The run's outcome on its `runs` entry first, then the status: whoever sees the run over sees its outcome.
    `ran`: the outcome (and the event's kind) when it is not the status's name (`RUN_OUTCOMES`).

    A run that ends also clears `trigger`, so that it never names the next run. Both writes need this daemon's
    lease: one that passed to another daemon (this one was paused past it) leaves the run, and its outcome, to
    that daemon, which resumes it; the status returned is then `running`."""
    await lineage.record_outcome(models, model_id, run, ran or new.value, owner)
    over = ("trigger",) if new.value in lineage.FINAL_OUTCOMES else ()
    moved = await transition(models, model_id, Status.RUNNING, new, MODEL_TRANSITIONS,
                             match={"lease.owner": {"$eq": owner}}, fields=fields,
                             unset=("lease", "cancel", "nodes", *over),
                             event={"kind": ran, "run": run} if ran else None)
    if moved is None:
        log.warning("training %r would have ended %s, but another daemon holds its lease now: it is that one's",
                    model_id, new.value)
        return Status.RUNNING
    return new


def _recorded_error(current: dict | None) -> dict | None:
    """The child's `error`, if it wrote one of the expected shape (the user may have written it too)."""
    error = (current or {}).get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str) and isinstance(error.get("type"), str):
        return error
    return None


# How a child's exit becomes the run's status, in one place. Two exceptions: `cancel: true` on the
# document wins over anything but success (the user asked it to stop), and a child that lost its lease leaves
# the status to the daemon that holds the run now. An exit not listed here (a crash, a signal) fails
# the run with the error the child wrote, or one naming its exit and its log.
OUTCOMES = {
    ChildExit.OK: Status.SUCCEEDED,
    ChildExit.CANCELLED: Status.CANCELLED,
    ChildExit.STOPPED: Status.PENDING,  # saved at SIGTERM: any daemon resumes it at once
    ChildExit.INVALID: Status.FAILED,
    ChildExit.FAILED: Status.FAILED,
    ChildExit.NOTHING_TO_TRAIN: Status.SUCCEEDED,  # a feedback run left without rows: the model serves as before
}
# A run's outcome on its entry where it is not the status's name.
RUN_OUTCOMES = {ChildExit.NOTHING_TO_TRAIN: lineage.NOTHING_TO_TRAIN}


NOT_FAILURES = (*ORDERLY_EXITS, ChildExit.LEASE_LOST)  # a node's exit that is no lost member's doing


def outcome(code: int, cancel_requested: bool) -> Status:
    status = OUTCOMES.get(code, Status.FAILED)
    return Status.CANCELLED if cancel_requested and status is not Status.SUCCEEDED else status


async def _finish(models, model_id, run: int, owner: str, code: int, path: Path) -> Status:
    if code == ChildExit.LEASE_LOST:
        log.warning("training %r stopped: another daemon holds its lease now", model_id)
        return Status.RUNNING
    current = await models.find_one({"_id": ids.eq(model_id)}, {"error": 1, "cancel": 1})
    new = outcome(code, (current or {}).get("cancel") is True)
    fields = {"error": _recorded_error(current) or _crash_error(code, path)} if new is Status.FAILED else {}
    ended = await _end(models, model_id, run, owner, new, fields, RUN_OUTCOMES.get(code))
    if ended is new:
        log.info("training %r ended %s (exit code %d)", model_id, new.value, code)
    return ended
