"""What every benchmark shares: the running daemon, timed steps, and the results table.

Each benchmark module gets a `Context` and returns `Row`s; only `__main__` prints and saves them,
so the modules measure and nothing else.
"""

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from listener.processes import registered, start_listener, stop

DAEMON_START_TIMEOUT_S = 60.0


@dataclass
class Context:
    console: Console
    db: object  # pymongo Database on the bench's own server
    uri: str
    home: Path  # scratch folder, removed at the end
    model_path: str  # the base model both sides load


@dataclass
class Row:
    """One comparison; `ratio` is always mongotune / baseline, whatever the unit."""

    name: str
    unit: str
    mongotune: float
    baseline: float
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.mongotune / self.baseline if self.baseline else float("nan")

    def as_json(self) -> dict:
        return {"name": self.name, "unit": self.unit, "mongotune": self.mongotune, "baseline": self.baseline,
                "ratio": self.ratio, "note": self.note}


class Timer:
    seconds: float = float("nan")


@contextmanager
def step(console: Console, label: str) -> Iterator[Timer]:
    """Spin while the block runs, then log its duration; the timer holds it for the caller to report."""
    timer = Timer()
    started = time.perf_counter()
    with console.status(f"{label}..."):
        yield timer
    timer.seconds = time.perf_counter() - started
    console.log(f"{label}... {timer.seconds:.1f} s")


@contextmanager
def running_daemon(ctx: Context, name: str = "bench") -> Iterator[subprocess.Popen]:
    """A real `listener start` process, ready (registered) before the block; always stopped after it."""
    log_path = ctx.home / f"{name}-daemon.log"
    # its own home below the scratch folder: a daemon refuses models inside its home, and the tiny one is built there
    process = start_listener(ctx.uri, ctx.db.name, name, log_path, home=ctx.home / "listener",
                             args=("--model-root", str(Path(ctx.model_path).parent)))
    try:
        try:
            registered(ctx.db, process, DAEMON_START_TIMEOUT_S)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}:\n{log_path.read_text(errors='replace')[-3000:]}") from None
        yield process
    finally:
        stop(process)


def table(rows: list[Row], title: str) -> Table:
    out = Table(title=title, caption="ratio = mongotune / baseline: for s lower is better, "
                                     "for req/s and MB/s higher is better")
    for column, justify in (("benchmark", "left"), ("unit", "left"), ("mongotune", "right"), ("baseline", "right"),
                            ("ratio", "right"), ("note", "left")):
        out.add_column(column, justify=justify)
    for row in rows:
        out.add_row(row.name, row.unit, _number(row.mongotune), _number(row.baseline), f"{row.ratio:.2f}", row.note)
    return out


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
