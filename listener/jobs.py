"""Supervising one training child: start it, keep its lease, watch for cancel, record how it ended.

The child is its own interpreter (`python -m training.run`), so a crash, an out-of-memory kill
or a CUDA error ends the job, not the daemon. The supervisor is a bounded loop:
wait -> renew the lease -> check cancel -> kill past the grace period.
"""

import asyncio
import hashlib
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path

from bson import json_util
from pymongo.errors import PyMongoError

from listener import defaults
from listener.leases import renew
from listener.status import MODEL_TRANSITIONS, Status, transition

log = logging.getLogger("mongotune.listener")


def log_path(log_dir: Path, document: dict) -> Path:
    """Readable, and distinct for ids that read alike ("a/b" and "a_b")."""
    raw = json_util.dumps(document["_id"])
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", str(document["_id"]))[:80]
    suffix = "" if raw == f'"{safe}"' else "-" + hashlib.sha1(raw.encode()).hexdigest()[:8]
    return log_dir / f"{safe}{suffix}-run{document['run']}.log"


def _crash_error(code: int, path: Path) -> dict:
    if code < 0:
        name = signal.Signals(-code).name
        why = f"the training process was killed by {name}" + (" (often: out of memory)" if name == "SIGKILL" else "")
    else:
        why = f"the training process exited with code {code}"
    try:
        tail = path.read_text(errors="replace")[-defaults.ERROR_TAIL_CHARS:]
    except OSError:
        tail = ""
    return {"type": "TrainingCrashed", "message": f"{why}; its log is {path} on the listener's host", "log_tail": tail}


async def _stop_child(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), defaults.CHILD_KILL_GRACE_S)
        except TimeoutError:
            process.kill()
            await process.wait()


async def supervise(db, uri: str, document: dict, owner: str, log_dir: Path) -> Status:
    """Run one claimed training to its end and write its final status; returns that status."""
    models = db[defaults.MODELS]
    model_id = document["_id"]
    path = log_path(log_dir, document)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, defaults.ENV_URI: uri, defaults.ENV_DAEMON_PID: str(os.getpid()),
           defaults.ENV_LEASE_OWNER: owner, "PYTHONUNBUFFERED": "1"}
    with open(path, "ab") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "training.run", json_util.dumps(model_id), "--db", db.name,
            stdout=out, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL, env=env,
            start_new_session=True,  # a Ctrl-C meant for the daemon must not kill the child mid-save
        )
    log.info("training %r run %d started (pid %d, log %s)", model_id, document["run"], process.pid, path)
    try:
        if not await _watch_child(models, model_id, owner, process):
            return Status.RUNNING
    except asyncio.CancelledError:
        await _stop_child(process)
        raise
    return await _finish(models, model_id, owner, process.returncode, path)


async def _watch_child(models, model_id, owner: str, process) -> bool:
    """Wait for the child while keeping its lease; False if the lease was lost and the child stopped."""
    cancel_seen, renewed, logged_step = None, time.monotonic(), None
    while process.returncode is None:
        try:
            await asyncio.wait_for(process.wait(), defaults.LEASE_S / 4)
            break
        except TimeoutError:
            pass
        try:
            current = await renew(models, model_id, owner, {"cancel": 1, "progress": 1})
            if current is None:
                log.warning("lost the lease on %r; stopping its training", model_id)
                await _stop_child(process)
                return False
            renewed = time.monotonic()
        except PyMongoError as exc:
            if time.monotonic() - renewed > defaults.LEASE_S:  # another daemon may own it by now
                log.warning("could not renew the lease on %r for %.0f s (%s); stopping its training", model_id,
                            defaults.LEASE_S, type(exc).__name__)
                await _stop_child(process)
                return False
            continue
        logged_step = _log_progress(model_id, current.get("progress"), logged_step)
        if current.get("cancel"):
            cancel_seen = cancel_seen or time.monotonic()
            if time.monotonic() - cancel_seen > defaults.CHILD_KILL_GRACE_S:
                await _stop_child(process)
    return True


def _log_progress(model_id, progress: dict | None, last_step: int | None) -> int | None:
    """One line per lease renewal while the step moves on; returns the step logged."""
    if not progress or not progress.get("total_steps") or progress["step"] == last_step:
        return last_step
    loss, eta = progress.get("loss"), progress.get("eta_s")
    log.info("training %r: step %d/%d%s%s", model_id, progress["step"], progress["total_steps"],
             "" if loss is None else f", loss {loss:.4f}", "" if eta is None else f", ETA {eta:.0f} s")
    return progress["step"]


async def _finish(models, model_id, owner: str, code: int, path: Path) -> Status:
    if code == defaults.EXIT_LEASE_LOST:
        log.warning("training %r stopped: another daemon holds its lease now", model_id)
        return Status.RUNNING
    current = await models.find_one({"_id": model_id}, {"error": 1, "cancel": 1})
    if code == defaults.EXIT_OK:
        new, fields = Status.SUCCEEDED, {}
    elif code == defaults.EXIT_CANCELLED or (current or {}).get("cancel"):
        new, fields = Status.CANCELLED, {}  # `cancel` is honoured and cleared, so a retrain is not cancelled again
    elif code == defaults.EXIT_STOPPED:
        new, fields = Status.PENDING, {}
    elif code == defaults.EXIT_INVALID and (current or {}).get("error"):
        new, fields = Status.FAILED, {}
    else:
        new, fields = Status.FAILED, {"error": (current or {}).get("error") or _crash_error(code, path)}
    await transition(models, model_id, Status.RUNNING, new, MODEL_TRANSITIONS,
                     match={"lease.owner": owner}, fields=fields, unset=("lease", "cancel"))
    log.info("training %r ended %s (exit code %d)", model_id, new.value, code)
    return new
