import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from listener.cli.alive import no_daemon
from listener.cli.options import connection_options, find_model, model_argument, open_database, operator_settings
from listener.follow import finished
from listener.status import Status
from training import defaults, ids


def _number(value, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def eval_loss(document: dict):
    """The newest eval loss among the document's metrics, with its step; (None, None) before the first eval."""
    metrics = document.get("metrics") if isinstance(document.get("metrics"), list) else []
    for entry in reversed(metrics):
        if isinstance(entry, dict) and "eval_loss" in entry:
            return entry["eval_loss"], entry.get("step")
    return None, None


def summary(document: dict) -> str:
    """One line: status, run, step, losses and ETA, as the document says now."""
    progress = document.get("progress") if isinstance(document.get("progress"), dict) else {}
    loss, step = eval_loss(document)
    parts = [f"status {document.get('status') or 'pending'}", f"run {document.get('run', 0)}"]
    if progress:
        parts += [f"step {progress.get('step', 0)}/{progress.get('total_steps', '?')}",
                  f"loss {_number(progress.get('loss'))}", f"ETA {_number(progress.get('eta_s'), 3)} s"]
    if loss is not None:
        parts.append(f"eval loss {_number(loss)} (step {step})")
    error = document.get("error") if isinstance(document.get("error"), dict) else None
    if error:
        parts.append(f"error {error.get('type')}: {error.get('message')}")
    return ", ".join(parts)


def events_of(document: dict) -> list[dict]:
    found = document.get("events") if isinstance(document.get("events"), list) else []
    return [e for e in found if isinstance(e, dict)]


def event_line(event: dict) -> str:
    at = event.get("at")
    when = at.strftime("%Y-%m-%d %H:%M:%S") if hasattr(at, "strftime") else str(at)
    details = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("at", "kind") and v is not None)
    return f"{when}  {event.get('kind', '?'):<18} {details}".rstrip()


class Follower:
    """A progress bar and the new events, redrawn from each full document the change stream delivers."""

    def __init__(self, console: Console, waiting: str | None):
        self.seen: set[str] = set()
        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TextColumn("eval {task.fields[eval]}"),
                            TextColumn("ETA {task.fields[eta]}"), TimeElapsedColumn(), console=console)
        self.task = self.bar.add_task(waiting or Status.PENDING.value, total=None, loss="-", eval="-", eta="-")

    def show(self, document: dict) -> None:
        for event in events_of(document):
            if ids.key(event) not in self.seen:
                self.seen.add(ids.key(event))
                self.bar.console.print(event_line(event), highlight=False)
        progress = document.get("progress") if isinstance(document.get("progress"), dict) else {}
        status = document.get("status") or Status.PENDING.value
        fields = {"description": status if status != Status.RUNNING or progress else "loading model and data"}
        if isinstance(progress.get("total_steps"), int):
            eta = progress.get("eta_s")
            fields.update(total=progress["total_steps"], completed=progress.get("step") or 0,
                          loss=_number(progress.get("loss")), eval=_number(eval_loss(document)[0]),
                          eta="-" if not isinstance(eta, (int, float)) else f"{eta:.0f}s")
        if status != Status.PENDING or progress:
            self.bar.update(self.task, **fields)


def follow(console: Console, models, model_id, waiting: str | None) -> dict:
    """Watch one document's change stream until its status is final; the last state.

    The stream is opened before the first read, so no change between the two is missed.
    """
    changes = models.watch([{"$match": {"documentKey._id": ids.eq(model_id)}}], full_document="updateLookup",
                           max_await_time_ms=1000)
    follower = Follower(console, waiting)
    with changes, follower.bar:
        document = find_model(models, model_id)
        while True:
            follower.show(document)
            if finished(document):
                return document
            change = changes.next()
            if change.get("operationType") == "delete":
                raise click.ClickException(f"model {model_id!r} was deleted")
            document = change.get("fullDocument") or find_model(models, model_id)


@click.command()
@connection_options
@model_argument
@click.option("-f", "--follow", "keep_following", is_flag=True,
              help="Show a progress bar and new events until the model's training ends.")
@click.option("-n", "--events", "count", default=20, show_default=True, type=click.IntRange(min=0),
              help="How many of the newest events to show (without --follow).")
def logs(uri, db, model, keep_following, count):
    """Show MODEL's status, progress, loss, eval loss, ETA and events, read from its document.

    Works from any host that reaches the database; --follow is driven by a change stream.

    \b
    Examples:
      listener logs my-model --db mydb
      listener logs my-model --db mydb --follow
    """
    settings = operator_settings(uri=uri, db=db)
    database = open_database(uri, db)
    models = database[defaults.MODELS]
    console = Console()
    if not keep_following:
        document = find_model(models, model)
        for event in events_of(document)[-count:] if count else []:
            console.print(event_line(event), highlight=False)
        console.print(summary(document), highlight=False)
        return
    idle = no_daemon(database, settings.heartbeat_s)
    document = follow(console, models, model, f"pending: {idle}" if idle else None)
    console.print(summary(document), highlight=False)
    raise SystemExit(0 if document.get("status") == Status.SUCCEEDED else 1)
