"""The embedded development server: SecantusDB run as a separate process, never imported.

It is GPL-2.0-only, so it stays behind a process boundary. It presents itself as a one-node
replica set, which gives change streams with no MongoDB to install. Its data lives in a
per-user folder, so models and checkpoints survive a restart.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from pymongo import MongoClient

from training import defaults

INSTALL_HINT = "pip install 'mongotune[embedded]' (or pass --uri to use your own MongoDB replica set)"


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


def _binary() -> str:
    beside = Path(sys.executable).parent / "secantusd-py"
    found = str(beside) if beside.exists() else shutil.which("secantusd-py")
    if not found:
        raise RuntimeError(f"the embedded server is not installed: {INSTALL_HINT}")
    return found


class EmbeddedServer:
    """Start the server, or reuse one already answering on the port; stop only what we started."""

    def __init__(self, folder: Path | None = None, port: int = defaults.EMBEDDED_PORT, *, memory: bool = False,
                 standalone: bool = False):
        """`standalone` presents it as a plain server with no change streams, as some deployments are."""
        self.folder = Path(folder or home() / "embedded")
        self.port = port
        self.memory = memory
        self.standalone = standalone
        self.process: subprocess.Popen | None = None
        self.uri = f"mongodb://127.0.0.1:{port}/" + ("" if standalone else f"?replicaSet={defaults.EMBEDDED_REPLICA_SET}")
        self.log_path = self.folder / "server.log"

    def answering(self) -> bool:
        client = MongoClient(self.uri, serverSelectionTimeoutMS=500, directConnection=True)
        try:
            set_name = client.admin.command("hello").get("setName")
            return set_name is None if self.standalone else set_name == defaults.EMBEDDED_REPLICA_SET
        except Exception:
            return False
        finally:
            client.close()

    def start(self) -> "EmbeddedServer":
        if self.answering():
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        storage = ":memory:" if self.memory else str(self.folder / "data")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [_binary(), "--host", "127.0.0.1", "--port", str(self.port), "--storage-path", storage,
                 *(["--standalone"] if self.standalone else [])],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.folder,
                start_new_session=True,
            )
        deadline = time.monotonic() + defaults.EMBEDDED_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.answering():
                return self
            if self.process.poll() is not None:
                self.process = None
                if self.answering():  # another process started it first
                    return self
                raise RuntimeError(f"the embedded server exited at start; see {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the embedded server did not answer within {defaults.EMBEDDED_START_TIMEOUT_S:.0f} s; "
                           f"see {self.log_path}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
