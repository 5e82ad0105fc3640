"""Showing a person what the database says as a document changes: the client side of the loop.

Two ways to wait, one for each need: `wait_for` polls one document until a condition holds (the
CLI's quiet waits, the Python API, the tests); `follow_training` shows a model's training as it
happens (progress bar, loss, eval loss, ETA, new events), driven by the document's change stream
from any host. `submit`, `logs --follow`, the demo and `Client.wait` all show training through it.
"""

import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from listener.processes import wait_until
from listener.status import FINAL, Status
from training import checkpoints, ids
from training.inert import MAX_LINE_CHARS, inert

Note = Callable[[dict], str | None]  # what the wait depends on now (is a daemon alive?), or None
PLAIN_EVERY_S = 10.0  # output that is not a terminal: the figures of a moving bar at most this often


class Gone(LookupError):
    """The model followed is not there: never inserted, or deleted while followed."""


def finished(document: dict) -> bool:
    return document.get("status") in {status.value for status in FINAL}


def wait_for(collection, doc_id, until, timeout_s: float = 120.0, on_change=None, poll_s: float = 0.25) -> dict:
    """Poll one document until `until(document)`; `on_change` sees every state on the way.

    TimeoutError names the document and its last state.
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


def number(value, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def count(value) -> int | None:
    """A step count as a document holds it: a non-negative integer, else None (users can write `progress`)."""
    return value if checkpoints.counted(value) else None


def newest_metric(document: dict, names) -> dict | None:
    """The newest entry of the document's metrics holding any of `names`; None before the first (a writer may put
    anything in `metrics`: entries that are not objects are passed over)."""
    metrics = document.get("metrics") if isinstance(document.get("metrics"), list) else []
    return next((entry for entry in reversed(metrics)
                 if isinstance(entry, dict) and any(name in entry for name in names)), None)


def eval_loss(document: dict):
    """The newest eval loss among the document's metrics, with its step; (None, None) before the first eval."""
    entry = newest_metric(document, ("eval_loss",))
    return (entry["eval_loss"], entry.get("step")) if entry else (None, None)


# The preference trainers' reward metrics (`method` dpo or kto), as logged, and the words they are shown with.
PREFERENCE = (("rewards/chosen", "chosen"), ("rewards/rejected", "rejected"), ("rewards/accuracies", "accuracy"),
              ("rewards/margins", "margin"))


def preference(document: dict) -> str:
    """The newest logged rewards of a preference run, in words ('rewards: chosen 0.3 ... (step 12)'); '' for none."""
    entry = newest_metric(document, [name for name, _ in PREFERENCE])
    if entry is None:
        return ""
    shown = " ".join(f"{word} {number(entry[name])}" for name, word in PREFERENCE if name in entry)
    return f"rewards: {shown} (step {number(count(entry.get('step')))})"


def events_of(document: dict) -> list[dict]:
    found = document.get("events") if isinstance(document.get("events"), list) else []
    return [e for e in found if isinstance(e, dict)]


def event_line(event: dict) -> str:
    at = event.get("at")
    when = at.strftime("%Y-%m-%d %H:%M:%S") if hasattr(at, "strftime") else inert(at)
    details = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("at", "kind") and v is not None)
    return f"{when}  {inert(event.get('kind', '?')):<18} {inert(details, MAX_LINE_CHARS)}".rstrip()


def _stage(document: dict, progress: dict) -> str:
    status = document.get("status") or Status.PENDING.value
    if status == Status.PENDING:
        return "waiting for a daemon"
    if status == Status.RUNNING:
        return "training" if count(progress.get("total_steps")) else "loading model and data"
    step, total = count(progress.get("step")), count(progress.get("total_steps"))
    return f"{status} at step {step or 0}/{total}" if total else status


class EndingSpinner(SpinnerColumn):
    """A spinner that stops once the run has ended, however it ended (`task.finished` is only a full bar:
    a cancelled or failed run's bar never fills, and a spinner there says it still works)."""

    def render(self, task):
        return self.finished_text if task.fields.get("ended") else super().render(task)


class Follower:
    """A progress bar and the model's new events, redrawn from each state of its document.

    `note(document)` takes the bar's description while it has something to say. Output that is not
    redrawn live (a pipe, a file) gets each new description as a plain line instead, when it happens,
    and the bar's step, loss and ETA as a line every `PLAIN_EVERY_S` while they change (and at the end).
    """

    def __init__(self, console: Console, note: Note | None = None):
        self.note = note
        self.seen: set[str] = set()
        self.shown: str | None = None
        self.plain = not (console.is_terminal or console.is_jupyter)
        self.step_shown, self.step_shown_at = None, -float("inf")
        self.bar = Progress(EndingSpinner(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TextColumn("eval {task.fields[eval]}"),
                            TextColumn("{task.fields[eta]}"), TimeElapsedColumn(), TextColumn("{task.fields[rewards]}"),
                            console=console)
        self.task = self.bar.add_task("waiting for a daemon", total=None, loss="-", eval="-", eta="ETA -", rewards="",
                                      ended=False)

    def show(self, document: dict) -> None:
        for event in events_of(document):
            if ids.key(event) not in self.seen:
                self.seen.add(ids.key(event))
                self.bar.console.print(event_line(event), highlight=False)
        progress = document.get("progress") if isinstance(document.get("progress"), dict) else {}
        ended = finished(document)
        line = inert((self.note(document) if self.note and not ended else None) or _stage(document, progress))
        if line != self.shown:
            self.shown = line
            self.bar.update(self.task, description=line)
            if self.plain:
                self.bar.console.print(line, highlight=False, soft_wrap=True)
        total = count(progress.get("total_steps"))
        if total:
            eta = progress.get("eta_s")
            step = min(count(progress.get("step")) or 0, total)
            fields = {"loss": number(progress.get("loss")), "eval": number(eval_loss(document)[0]),
                      "eta": "ETA -" if not isinstance(eta, (int, float)) else f"ETA {eta:.0f}s",
                      "rewards": inert(preference(document))}
            self.bar.update(self.task, total=total, completed=step, **fields)
            if self.plain and not ended:  # an ended run's last line says where it ended
                self._plain_step(step, total, fields)
        if ended:  # an ended run has no time left to estimate, and its clock stops where it ended
            self.bar.update(self.task, eta="", ended=True)
            self.bar.stop_task(self.task)


    def _plain_step(self, step: int, total: int, fields: dict) -> None:
        """A line with the bar's figures, when the step moved and a while has passed (or it reached the total)."""
        if step == self.step_shown or (step < total and time.monotonic() - self.step_shown_at < PLAIN_EVERY_S):
            return
        self.step_shown, self.step_shown_at = step, time.monotonic()
        line = f"step {step}/{total}  loss {fields['loss']}  eval {fields['eval']}  {fields['eta']}  {fields['rewards']}"
        self.bar.console.print(line.rstrip(), highlight=False, soft_wrap=True)


def follow_training(console: Console, models, model_id, timeout_s: float, note: Note | None = None) -> dict:
    """Show a model's training until its status is final; its last state.

    The change stream is opened before the first read, so no change between the two is missed; it
    wakes at least once a second, so `note` stays current while nothing changes.
    """
    deadline = time.monotonic() + timeout_s
    changes = models.watch([{"$match": {"documentKey._id": ids.eq(model_id)}}], full_document="updateLookup",
                           max_await_time_ms=1000)
    follower = Follower(console, note)
    with changes:
        document = _read(models, model_id)
        follower.show(document)  # before the bar's first frame, which would otherwise show a placeholder
        with follower.bar:
            while not finished(document):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"model {model_id!r} still {document.get('status')} after {timeout_s:.0f} s")
                change = changes.try_next()
                if change is not None and change.get("operationType") == "delete":
                    raise Gone(f"model {model_id!r} was deleted")
                if change is not None:
                    document = change.get("fullDocument") or _read(models, model_id)
                follower.show(document)  # also when nothing changed: the note may have
    return document


def _read(models, model_id) -> dict:
    document = models.find_one({"_id": ids.eq(model_id)})
    if document is None:
        raise Gone(f"no model with _id {model_id!r} in {models.database.name}.{models.name}: "
                   "`listener status` lists them")
    return document
