import asyncio

import click
from pymongo import AsyncMongoClient

from listener.definitions import id_text
from listener.cli.options import connection_options, find_model, model_argument, open_database, resolve
from listener.connection import timeouts
from listener.status import FINAL, MODEL_TRANSITIONS, Status, transition
from training import defaults
from training.inert import MAX_LINE_CHARS, inert
from training.starting import next_start

TRIGGER = {"trigger": "user"}  # why the next run starts: on the document (for its `runs` entry) and the event


@click.command()
@connection_options
@model_argument
def retrain(uri, db, model):
    """Train MODEL again: a finished model (succeeded, failed or cancelled) goes back to `pending`.

    The next daemon starts a new run on the data as it is now, from the checkpoint serving `best` (from
    the base model with `retrain.from: base`); earlier runs' checkpoints stay.

    \b
    Example:
      listener retrain my-model --db mydb
    """
    uri, name = resolve(uri, db)
    database = open_database(uri, name)
    current = find_model(database[defaults.MODELS], model, {"status": 1, "run": 1, "progress": 1})
    status = current.get("status") or Status.PENDING.value
    if status == Status.RUNNING.value:
        raise click.ClickException(f"model {model!r} is training now (run {current.get('run')}): let it finish, or "
                                   f"`listener cancel {id_text(model)}` first")
    if status not in {s.value for s in FINAL}:
        raise click.ClickException(f"model {model!r} is {status}: it already waits for a daemon")
    moved = asyncio.run(_requeue(uri, name, model, Status(status)))
    if moved is None:
        raise click.ClickException(f"model {model!r} changed while this ran; look again with `listener status`")
    click.echo(inert(f"model {model!r} is pending again: {next_start(moved)}, when a daemon claims it", MAX_LINE_CHARS))


async def _requeue(uri: str, name: str, model, status: Status) -> dict | None:
    """The one status change, through `transition` as every status change goes; None if the status moved."""
    client = AsyncMongoClient(uri, **timeouts(uri, 5.0), **defaults.CODEC)
    try:
        return await transition(client[name][defaults.MODELS], model, status, Status.PENDING, MODEL_TRANSITIONS,
                                 fields=TRIGGER, unset=("cancel",), event=TRIGGER)
    finally:
        await client.close()
