"""The embedded development server: SecantusDB run as a separate process, never imported.

It is GPL-2.0-only, so it stays behind a process boundary. It presents itself as a one-node
replica set, which gives change streams with no MongoDB to install. Its data lives in a
per-user folder, so models and checkpoints survive a restart.
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from pymongo import MongoClient

from listener.processes import stop, wait_until
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
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process, grace_s=15)
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
    print(server.uri, server.process.pid)


if __name__ == "__main__":
    main()
