import click

from listener.definitions import id_text
from listener.cli.options import connection_options, find_model, model_argument, open_database
from listener.status import FINAL, Status
from training import defaults, ids
from training.inert import MAX_LINE_CHARS, inert


@click.command()
@connection_options
@model_argument
def cancel(uri, db, model):
    """Stop MODEL: a running training saves a checkpoint and ends `cancelled`; a pending one never starts.

    Sets `cancel: true` on the document, as mongosh or any driver could; the daemon does the rest.

    \b
    Example:
      listener cancel my-model --db mydb
    """
    models = open_database(uri, db)[defaults.MODELS]
    active = [None, Status.PENDING.value, Status.RUNNING.value]
    before = models.find_one_and_update({"_id": ids.eq(model), "status": {"$in": active}}, {"$set": {"cancel": True}},
                                        projection={"status": 1})
    if before is None:
        status = find_model(models, model, {"status": 1}).get("status")
        if status in {s.value for s in FINAL}:
            raise click.ClickException(f"model {model!r} is already {status}; nothing to cancel")
        raise click.ClickException(f"model {model!r} has status {status!r}, which no daemon works on")
    was = before.get("status") or Status.PENDING.value
    then = "stops after saving a checkpoint" if was == Status.RUNNING.value else "is cancelled by the next daemon"
    click.echo(inert(f"cancel requested: model {model!r} ({was}) {then}; `listener logs {id_text(model)} --follow` "
                     "shows it", MAX_LINE_CHARS))
