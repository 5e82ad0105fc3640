"""Training children and serving workers start from one process per daemon that has imported torch,
transformers, peft and trl once (`listener.forks`), and none of them outlives its daemon."""

import os
import re
import signal
from pathlib import Path

import pytest

from listener.demo import load_samples
from listener.forks import Forks
from tests import documents
from tests.conftest import finished, wait_for
from tests.test_recovery import assert_gone
from tests.test_serving import served_model
from training import defaults


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def logged_pid(daemon, pattern: str) -> int:
    return int(re.search(pattern, daemon.log()).group(1))


def test_workers_and_children_fork_from_one_preloaded_process_that_dies_with_the_daemon(db, start_daemon,
                                                                                         tiny_model_path):
    load_samples(db)
    daemon = start_daemon("forking")
    db[defaults.MODELS].insert_one(served_model("served", tiny_model_path))
    db[defaults.REQUESTS].insert_one(documents.request("asked", "served", checkpoint="base"))
    assert wait_for(db[defaults.REQUESTS], "asked", finished)["status"] == "done"
    worker = logged_pid(daemon, r"serving worker started \(pid (\d+)\)")
    server = parent(worker)
    assert "multiprocessing.forkserver" in Path(f"/proc/{server}/cmdline").read_text()
    assert parent(server) == daemon.process.pid
    assert "training.preload" in Path(f"/proc/{server}/cmdline").read_text()

    model = documents.model("long", tiny_model_path)
    model["trainer"].update(max_steps=400, save_steps=10_000)
    db[defaults.MODELS].insert_one(model)
    wait_for(db[defaults.MODELS], "long", lambda d: (d.get("progress") or {}).get("step", 0) >= 1, timeout_s=120)
    child = logged_pid(daemon, r"training 'long' run 1 started \(pid (\d+)")
    assert parent(child) == server, "the training child was forked from the same process as the worker"

    assert "trust_remote_code" not in daemon.log(), "no 4-bit kernel warning where nothing uses 4 bits"

    daemon.stop(signal.SIGKILL)
    for pid in (child, worker, server):
        assert_gone(pid, timeout=60)


@pytest.mark.parametrize("code", [0, 3])
def test_a_spawned_process_reports_its_exit_code(code):
    """The GPU hosts' way (a fresh interpreter per process) gives the daemon what the fork server's does."""
    import asyncio

    async def scenario() -> int:
        started = await Forks(gpus=True).start("sys:exit", code)
        return await started.wait()

    assert asyncio.run(scenario()) == code


def test_a_started_process_can_be_stopped_and_waited_for_twice():
    import asyncio

    async def scenario() -> tuple:
        started = await Forks(gpus=True).start("time:sleep", 60)
        assert started.returncode is None
        started.terminate()
        first, second = await asyncio.gather(started.wait(), started.wait())
        started.kill()  # after its exit: nothing to signal, no error
        return first, second, started.returncode

    assert asyncio.run(scenario()) == (-signal.SIGTERM,) * 3


def _adopt_once_orphaned(out: str) -> None:
    """A child forked while its daemon lives that reaches `lifeline.adopt` only after the daemon (and so its fork
    server) died: the window between the fork and the parent-death signal, made wide."""
    import os
    import time

    from training import lifeline

    server = os.getppid()
    Path(out).write_text("waiting")
    while os.getppid() == server:
        time.sleep(0.05)
    try:
        lifeline.adopt({})
    except SystemExit as exc:
        Path(out).write_text(f"exited {exc.code}")
        raise
    Path(out).write_text("survived")


DAEMON_FORKING = """
import asyncio, sys
from listener.forks import Forks

async def main():
    await Forks(gpus=False).start("tests.test_forks:_adopt_once_orphaned", sys.argv[1])
    await asyncio.sleep(600)

if __name__ == "__main__":
    asyncio.run(main())
"""


# a real daemon process and its fork server's imports: seconds
@pytest.mark.slow
def test_a_child_whose_daemon_died_before_it_asked_to_die_with_it_exits(tmp_path):
    """Its parent is the fork server: once that died, the child's parent is init, and comparing the parent pid
    before and after asking for the parent-death signal sees no change, so it would train on as an orphan."""
    import subprocess
    import sys

    from listener.processes import wait_until

    script, out = tmp_path / "daemon.py", tmp_path / "out"
    script.write_text(DAEMON_FORKING)
    root = Path(__file__).parent.parent  # where the child imports this module from, as `tests.test_forks`
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    daemon = subprocess.Popen([sys.executable, str(script), str(out)], cwd=root, env=env)
    try:
        wait_until(lambda: out.exists() and out.read_text() == "waiting", 120, "the forked child")
    finally:
        daemon.kill()
        daemon.wait()
    wait_until(lambda: out.read_text() != "waiting", 60, "the orphaned child's adopt")
    assert out.read_text() == f"exited {defaults.ChildExit.ORPHANED}"
