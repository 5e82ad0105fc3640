"""Fixtures: a real change-stream server, a tiny real model, and real `listener start` processes.

Set MONGOTUNE_TEST_URI to run the same suite against a real MongoDB replica set.
"""

import os
import signal
import uuid
from pathlib import Path

# Side by side (`make test` runs a pytest-xdist worker per core and one more), each worker's torch, and
# that of every daemon, child and worker it starts, keeps to one thread, so workers share the cores
# instead of fighting (set before anything imports torch, which reads it once).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from pymongo import MongoClient

from listener.embedded import EmbeddedServer, free_port
from listener.follow import finished, wait_for  # noqa: F401  (the tests import them from here)
from listener.processes import start_listener, stop
from training import collector, defaults, tiny_model
from training.limits import Limits

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def server_uri(tmp_path_factory):
    """The change-stream server: MONGOTUNE_TEST_URI's, or an embedded one per pytest worker. Not one embedded server
    for all workers: each change stream on it reads every write of the whole server (FINDINGS.md), so the workers'
    daemons would each read every other worker's writes (a third of the suite's CPU when they shared one)."""
    if os.environ.get("MONGOTUNE_TEST_URI"):
        yield os.environ["MONGOTUNE_TEST_URI"]
        return
    server = EmbeddedServer(tmp_path_factory.mktemp("server"), port=free_port(), memory=True).start()
    yield server.uri
    server.stop()


@pytest.fixture
def standalone_uri(tmp_path):
    """A server that is not a replica set: no change streams."""
    with EmbeddedServer(tmp_path / "standalone", port=free_port(), memory=True, standalone=True) as server:
        yield server.uri


@pytest.fixture(scope="session")
def client(server_uri):
    client = MongoClient(server_uri)
    yield client
    client.close()


def settled(db, doc_id, timeout: float = 120) -> dict:
    """A request once finished, or as it is after `timeout` (so a test can say what it still is)."""
    try:
        return wait_for(db[defaults.REQUESTS], doc_id, finished, timeout_s=timeout)
    except TimeoutError:
        return db[defaults.REQUESTS].find_one({"_id": doc_id})


def fresh_database(client, prefix: str):
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    yield client[name]
    client.drop_database(name)


@pytest.fixture
def db(client):
    """A fresh database per test, dropped afterwards."""
    yield from fresh_database(client, "t")


@pytest.fixture(scope="module")
def module_db(client):
    """One database for a module's tests, which each use their own model and request ids in it."""
    yield from fresh_database(client, "m")


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    """Where test models live: the operator's model root for every daemon the tests start."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model_path(model_root) -> str:
    return str(tiny_model.build(model_root / "tiny"))


@pytest.fixture(scope="session")
def limits(model_root) -> Limits:
    """The default caps, with the test model root allowed."""
    return Limits(model_roots=(model_root,))


class DaemonProcess:
    """A real `listener start` process on the test database."""

    def __init__(self, uri: str | None, db_name: str, home: Path, name: str, max_jobs: int = 2,
                 env: dict | None = None, args: tuple = (), model_root: Path | None = None, cwd: Path | None = None):
        self.home = home
        self.log_path = home / f"{name}.log"
        roots = {"MONGOTUNE_MODEL_ROOTS": str(model_root)} if model_root else {}
        self.process = start_listener(uri, db_name, name, self.log_path, home=home,
                                      env={**roots, **(env or {})},
                                      args=("--max-jobs", str(max_jobs), *args), cwd=cwd)

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int | None:
        if sig == signal.SIGTERM:
            return stop(self.process, grace_s=timeout)
        self.process.send_signal(sig)
        return self.process.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def start_daemon(server_uri, db, tmp_path, request, model_root):
    started: list[DaemonProcess] = []

    def start(name: str | None = None, max_jobs: int = 2, env: dict | None = None, args: tuple = (),
              cwd: Path | None = None) -> DaemonProcess:
        daemon = DaemonProcess(server_uri, db.name, tmp_path, name or f"d{len(started)}", max_jobs, env, args,
                               model_root, cwd)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        for daemon in started:
            print(f"--- log of {daemon.log_path.name} ---\n{daemon.log()[-6000:]}")


@pytest.fixture(scope="module")
def module_daemon(server_uri, module_db, tmp_path_factory, model_root, request):
    """One daemon on `module_db` for a whole module, for tests that neither stop it nor need settings of
    their own (a module's `DAEMON_ENV` gives the operator's settings it needs): it saves each test a daemon, a
    serving worker and often a training. Its tests run on one
    pytest-xdist worker (`pytest_collection_modifyitems`, `--dist loadgroup`)."""
    daemon = DaemonProcess(server_uri, module_db.name, tmp_path_factory.mktemp("daemon"), "shared", 4,
                           env=getattr(request.module, "DAEMON_ENV", None), model_root=model_root)
    failed = request.session.testsfailed
    yield daemon
    daemon.stop()
    if request.session.testsfailed > failed:
        print(f"--- log of the daemon shared by {request.module.__name__} ---\n{daemon.log()[-6000:]}")


@pytest.fixture(scope="module")
def module_samples(module_db):
    """The sample datasets loaded once into `module_db`, for the module's tests that train on them."""
    from listener.demo import load_samples

    load_samples(module_db)
    return module_db


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: a worker per core and one more, which runs while the others wait on a lease, a poll or a
    process start (one worker per core left a 2-core machine a quarter idle)."""
    return (os.cpu_count() or 1) + 1


# A test using one of these starts real processes or trains a model: seconds, not milliseconds.
SLOW_FIXTURES = {"start_daemon", "module_daemon", "tiny_model_path", "standalone_uri"}
# The tests that take a minute or more of a worker in `make test` (its `--durations`), by node id prefix, longest
# first: they go first, in this order, so that none starts late and runs on alone after the others have finished.
LONGEST = ("tests/test_two_users.py", "tests/test_multiprocess.py", "tests/test_nodes.py", "tests/test_fuzz.py",
           "tests/test_robustness.py", "tests/test_outage.py", "tests/test_deepspeed.py",
           "tests/test_first_hour_noise.py::test_the_demos_first_model_conversion_draws_no_tqdm_bars")
# The fast tier's longest modules (in-process daemons waiting on their timers), first among the fast tests for the same
# reason: `make test-fast` ends when its last worker does.
LONGEST_FAST = ("tests/test_gangs.py", "tests/test_retrain_streams.py", "tests/test_collection_answers.py")


@pytest.hookimpl(wrapper=True)
def pytest_collection(session):
    """Collecting imports torch, transformers and trl in every worker (test modules import them): with the collector
    paused meanwhile (`training.collector`), that costs each worker about 5 CPU-s rather than 8, and no later
    collection in a test walks it again."""
    with collector.paused():
        return (yield)


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if "module_daemon" in getattr(item, "fixturenames", ()):
            # One pytest-xdist worker runs all of a module's tests on its daemon (`--dist loadgroup`): spread
            # over the workers, each would start a daemon and a fork server of its own, seconds of CPU each.
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    # The longest first, then the other slow tests: side by side, the many short ones then fill the workers up
    # evenly at the end instead of one worker finishing the last long test alone.
    items.sort(key=lambda item: (_rank(item.nodeid, LONGEST), item.get_closest_marker("slow") is None,
                                 _rank(item.nodeid, LONGEST_FAST)))


def _rank(nodeid: str, longest: tuple[str, ...]) -> int:
    """The place of the test's prefix in `longest`; after all of them for any other test."""
    return next((n for n, prefix in enumerate(longest) if nodeid.startswith(prefix)), len(longest))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def job_log(home: Path, run: int = 1) -> str:
    """The training child's log of the (only) model trained with this home."""
    found = sorted((home / "logs").glob(f"*-run{run}.log"))
    assert found, "the daemon keeps one log per training run"
    return found[-1].read_text(errors="replace")
