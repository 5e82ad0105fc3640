import click
from rich.console import Console

from listener.cli.alive import waiting_note
from listener.cli.errors import stopped_following
from listener.cli.options import connection_options, find_model, model_argument, open_database, operator_settings
from listener.follow import count, eval_loss, event_line, events_of, finished, follow_training, number, preference
from listener.status import Status
from training import defaults
from training.inert import inert

FOLLOW_S = 7 * 24 * 3600  # as long as a person keeps watching


def summary(document: dict) -> str:
    """One line: status, run, step, losses and ETA, as the document says now."""
    progress = document.get("progress") if isinstance(document.get("progress"), dict) else {}
    loss, step = eval_loss(document)
    parts = [f"status {inert(document.get('status') or 'pending')}", f"run {inert(document.get('run', 0))}"]
    if progress:
        parts += [f"step {count(progress.get('step')) or 0}/{count(progress.get('total_steps')) or '?'}",
                  f"loss {number(progress.get('loss'))}"]
        if not finished(document):  # an ended run's last estimate is not time left
            parts.append(f"ETA {number(progress.get('eta_s'), 3)} s")
    if loss is not None:
        parts.append(f"eval loss {number(loss)} (step {number(count(step))})")
    rewards = preference(document)
    if rewards:
        parts.append(inert(rewards))
    error = document.get("error") if isinstance(document.get("error"), dict) else None
    if error:
        parts.append(f"error {inert(error.get('type'))}: {inert(error.get('message'))}")
    return ", ".join(parts)


@click.command()
@connection_options
@model_argument
@click.option("-f", "--follow", "keep_following", is_flag=True,
              help="Show a progress bar and new events until the model's training ends.")
@click.option("-n", "--events", "count", default=20, show_default=True, type=click.IntRange(min=0),
              help="How many of the newest events to show (without --follow).")
def logs(uri, db, model, keep_following, count):
    """Show MODEL's status, progress, loss, eval loss, ETA, a preference run's rewards and events, from its document.

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
    find_model(models, model, {"_id": 1})
    note = waiting_note(database, settings.heartbeat_s)
    with stopped_following(model):
        document = follow_training(console, models, model, timeout_s=FOLLOW_S, note=note)
    console.print(summary(document), highlight=False)
    raise SystemExit(0 if document.get("status") == Status.SUCCEEDED else 1)
