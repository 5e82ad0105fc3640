"""Showing a person what the database says as a document changes: the client side of the loop."""

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


def follow_training(console: Console, models, model_id, timeout_s: float, waiting: str | None = None) -> dict:
    """A progress bar (step, loss, ETA) fed by the model document until its training ends."""
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TextColumn("ETA {task.fields[eta]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(waiting or "waiting for a listener", total=None, loss="-", eta="-")

        def show(document):
            progress = (document or {}).get("progress") or {}
            if document and document.get("status") == Status.RUNNING and not progress:
                bar.update(task, description="loading model and data")
            if progress.get("total_steps"):
                loss, eta = progress.get("loss"), progress.get("eta_s")
                bar.update(task, description="training", total=progress["total_steps"], completed=progress["step"],
                           loss="-" if loss is None else f"{loss:.3f}", eta="-" if eta is None else f"{eta:.0f}s")

        return wait_for(models, model_id, finished, timeout_s, show)
