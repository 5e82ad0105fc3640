"""The embedded development server: SecantusDB run as a separate process, never imported.

It is GPL-2.0-only, so it stays behind a process boundary. It presents itself as a one-node
replica set, which gives change streams with no MongoDB to install. Its data lives in a
per-user folder, so models and checkpoints survive a restart.

A home's server belongs to the home, not to whoever started it: its port is recorded in the
home (first derived from the home's path, moved only if another program holds it), only a
process working in the home's folder counts as its server, and no daemon stops it at exit;
`listener server stop` does.
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

from pymongo import MongoClient

from listener.processes import stop, wait_until
from training import defaults

INSTALL_HINT = "pip install 'mongotune[embedded]' (or pass --uri to use your own MongoDB replica set)"
RECORD = "server.json"  # in the server's folder: its port (kept across restarts), pid and who started it
PORT_SPREAD = 1000  # a home's first port: EMBEDDED_PORT plus a hash of its folder modulo this


def home() -> Path:
    """MONGOTUNE_HOME, else the per-user data folder."""
    if os.environ.get(defaults.ENV_HOME):
        return Path(os.environ[defaults.ENV_HOME])
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "mongotune"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def home_port(folder: Path) -> int:
    """The port a folder's server tries first: the same for the folder every time, likely another for another."""
    return defaults.EMBEDDED_PORT + zlib.crc32(str(Path(folder).resolve()).encode()) % PORT_SPREAD


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _freed(port: int, within_s: float = 5.0) -> bool:
    """Whether `port` can be bound now or within `within_s`: a server just stopped may hold its port a moment longer
    (its last connections closing), and a restart right after a stop should keep it."""
    try:
        return wait_until(lambda: _bindable(port), within_s, f"port {port} free", poll_s=0.2)
    except TimeoutError:
        return False


def _serves(pid, folder: Path) -> bool:
    """Whether `pid` is a server working in `folder`, so a pid reused by another program never counts."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        return (os.readlink(f"/proc/{pid}/cwd") == str(Path(folder).resolve())
                and b"secantusd" in Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return False


def _binary() -> str:
    beside = Path(sys.executable).parent / "secantusd-py"
    found = str(beside) if beside.exists() else shutil.which("secantusd-py")
    if not found:
        raise RuntimeError(f"the embedded server is not installed: {INSTALL_HINT}")
    return found


class EmbeddedServer:
    """Start the server, or reuse a running one; `stop` stops only what this object started.

    With no `port` the server is the folder's own (the home's `embedded/`): its port is recorded
    there and reused, and only the process working in that folder is reused. An explicit `port`
    (tests, CI) reuses whatever answers there.
    """

    def __init__(self, folder: Path | None = None, port: int | None = None, *, memory: bool = False,
                 standalone: bool = False, failpoints: bool = False):
        """`standalone` presents it as a plain server with no change streams, as some deployments are;
        `failpoints` accepts mongod's `configureFailPoint`, so that tests can fail a command on the wire."""
        self.folder = Path(folder or home() / "embedded")
        self.record_path = self.folder / RECORD
        self.bound = port is None
        recorded = self.record().get("port")
        self.port = port or (recorded if isinstance(recorded, int) else home_port(self.folder))
        self.memory = memory
        self.standalone = standalone
        self.failpoints = failpoints
        self.process: subprocess.Popen | None = None
        self.log_path = self.folder / "server.log"

    @property
    def uri(self) -> str:
        return self.uri_for("")

    def uri_for(self, db: str) -> str:
        """The URI with a database path: what people and mongosh are shown (without one mongosh uses `test`)."""
        query = "" if self.standalone else f"?replicaSet={defaults.EMBEDDED_REPLICA_SET}"
        return f"mongodb://127.0.0.1:{self.port}/{db}{query}"

    def record(self) -> dict:
        """What the folder says about its server: port, and while it runs pid, started_by, started_at."""
        try:
            found = json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    def _write_record(self, **running) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = self.record_path.with_suffix(f".{os.getpid()}.tmp")
        staging.write_text(json.dumps({"port": self.port, **running}))
        staging.replace(self.record_path)

    def running_pid(self) -> int | None:
        """The pid of the folder's own server when it runs and answers; None otherwise."""
        pid = self.record().get("pid")
        return pid if _serves(pid, self.folder) and self.answering() else None

    def answering(self) -> bool:
        client = MongoClient(self.uri, serverSelectionTimeoutMS=500, directConnection=True)
        try:
            set_name = client.admin.command("hello").get("setName")
            return set_name is None if self.standalone else set_name == defaults.EMBEDDED_REPLICA_SET
        except Exception:
            return False
        finally:
            client.close()

    def start(self, started_by: str = "") -> "EmbeddedServer":
        """Start the server unless it runs; `started_by` is recorded for `listener server status`."""
        if self.bound:
            if self.running_pid():
                return self
            if not _freed(self.port):  # another program, or another home's server, holds it: move for good
                self.port = free_port()
            self._write_record()
        elif self.answering():
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        storage = ":memory:" if self.memory else str(self.folder / "data")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [_binary(), "--host", "127.0.0.1", "--port", str(self.port), "--storage-path", storage,
                 *(["--standalone"] if self.standalone else []),
                 *(["--enable-test-commands"] if self.failpoints else [])],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.folder,
                start_new_session=True,
            )
        try:
            wait_until(lambda: self.process.poll() is not None or self.answering(),
                       defaults.EMBEDDED_START_TIMEOUT_S, "the embedded server's answer", poll_s=0.2)
        except TimeoutError as exc:
            self.stop()
            raise RuntimeError(f"{exc}; see {self.log_path}") from None
        if self.process.poll() is not None:
            self.process = None
            if not self.answering():  # unless another process started it first
                raise RuntimeError(f"the embedded server exited at start; see {self.log_path}:\n{self.log_tail()}")
        elif self.bound:
            self._write_record(pid=self.process.pid, started_by=started_by, started_at=time.time())
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process, grace_s=15)
            self.process = None
            if self.bound:
                self._write_record()

    def stop_running(self, grace_s: float = 15.0) -> int | None:
        """Stop the folder's own server whoever started it (`listener server stop`); its pid, or None if none ran."""
        pid = self.running_pid()
        if pid is None:
            return None
        with contextlib.suppress(ProcessLookupError):  # it may exit on its own meanwhile
            os.kill(pid, signal.SIGTERM)
            try:
                wait_until(lambda: not _serves(pid, self.folder), grace_s, "the embedded server's exit", poll_s=0.2)
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
        if self.process is not None and self.process.pid == pid:
            self.process.wait()
            self.process = None
        self._write_record()
        return pid

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """`python -m listener.embedded`: start a server that outlives this command; print its URI and pid.

    CI and scripts use it instead of a readiness loop of their own; stop the server with `kill PID`.
    """
    parser = argparse.ArgumentParser(prog="python -m listener.embedded", description=main.__doc__)
    parser.add_argument("--folder", type=Path, required=True, help="where its log (and data, unless --memory) go")
    parser.add_argument("--port", type=int, default=0, help="default: a free one")
    parser.add_argument("--memory", action="store_true", help="keep the data in memory only")
    args = parser.parse_args(argv)
    server = EmbeddedServer(args.folder, port=args.port or free_port(), memory=args.memory)
    try:
        server.start()
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None
    if server.process is None:
        raise SystemExit(f"a server already answers on port {server.port}")
    print(server.uri_for(defaults.DEFAULT_DB), server.process.pid)


if __name__ == "__main__":
    main()
