"""Showing a person what the database says as a document changes: the client side of the loop."""

from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from listener.processes import wait_until
from listener.status import FINAL, Status


def finished(document: dict) -> bool:
    return document.get("status") in {status.value for status in FINAL}


def wait_for(collection, doc_id, until, timeout_s: float = 120.0, on_change=None, poll_s: float = 0.25) -> dict:
    """Poll one document until `until(document)`; `on_change` sees every state on the way.

    The one wait on a document: the CLI, the Python API and the tests all use it. TimeoutError
    names the document and its last state.
    """
    last = None

    def check():
        nonlocal last
        last = collection.find_one({"_id": doc_id})
        if on_change:
            on_change(last)
        return last if last and until(last) else None

    try:
        return wait_until(check, timeout_s, f"{collection.name} {doc_id!r} finishing", poll_s)
    except TimeoutError:
        raise TimeoutError(f"{collection.name} {doc_id!r} not done after {timeout_s:.0f} s; last state: {last}") from None


def follow_training(console: Console, models, model_id, timeout_s: float,
                    note: Callable[[dict], str | None] | None = None) -> dict:
    """A progress bar (step, loss, ETA) fed by the model document until its training ends.

    `note(document)` says what the wait depends on (e.g. whether a daemon is alive) and takes the
    bar's description while it has something to say. Output that is not redrawn live (a pipe, a
    file) gets each new description as a plain line instead, when it happens.
    """
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TextColumn("ETA {task.fields[eta]}"), TimeElapsedColumn()]
    plain = not (console.is_terminal or console.is_jupyter)
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("waiting for a daemon", total=None, loss="-", eta="-")
        shown = None

        def show(document):
            nonlocal shown
            if not document:
                return
            progress = document.get("progress") if isinstance(document.get("progress"), dict) else {}
            line = (note(document) if note else None) or _stage(document, progress)
            if line and line != shown:
                shown = line
                bar.update(task, description=line)
                if plain:
                    console.print(line, highlight=False, soft_wrap=True)
            if progress.get("total_steps"):
                loss, eta = progress.get("loss"), progress.get("eta_s")
                bar.update(task, total=progress["total_steps"], completed=progress["step"],
                           loss="-" if loss is None else f"{loss:.3f}", eta="-" if eta is None else f"{eta:.0f}s")

        return wait_for(models, model_id, finished, timeout_s, show)


def _stage(document: dict, progress: dict) -> str | None:
    if document.get("status") != Status.RUNNING:
        return None
    return "training" if progress.get("total_steps") else "loading model and data"
