import click

from listener.definitions import id_text
from listener.cli.options import connection_options, find_model, model_argument, open_database
from listener.follow import wait_for
from listener.status import Status
from training import checkpoints, defaults, ids


@click.command()
@connection_options
@model_argument
@click.option("-y", "--yes", is_flag=True, help="Delete without asking.")
@click.option("--force", is_flag=True, help="If MODEL is training: cancel it, wait until it stops, then delete.")
@click.option("--timeout", default=300.0, show_default=True, help="With --force: seconds to wait for the stop.")
def delete(uri, db, model, yes, force, timeout):
    """Delete MODEL's document and all its checkpoints in GridFS, after confirmation.

    \b
    Example:
      listener delete my-model --db mydb --yes
    """
    database = open_database(uri, db)
    models = database[defaults.MODELS]
    running = find_model(models, model, {"status": 1}).get("status") == Status.RUNNING.value
    if running and not force:
        raise click.ClickException(f"model {model!r} is training now: `listener cancel {id_text(model)}` first, "
                                   "or pass --force to cancel it and delete it once it stops")
    if not yes:
        click.confirm(f"delete model {model!r} and its checkpoints from {database.name}?", abort=True)
    if running:
        models.update_one({"_id": ids.eq(model)}, {"$set": {"cancel": True}})
        try:
            wait_for(models, model, lambda d: d.get("status") != Status.RUNNING.value, timeout)
        except TimeoutError:
            raise click.ClickException(f"model {model!r} still trains after {timeout:g} s; it is cancelled, "
                                       "so run this again once it stops") from None
    if models.delete_one({"_id": ids.eq(model), "status": {"$ne": Status.RUNNING.value}}).deleted_count == 0:
        raise click.ClickException(f"model {model!r} started training meanwhile; nothing was deleted")
    removed = checkpoints.delete_all(database, model)
    click.echo(f"deleted model {model!r} and {removed} checkpoint file(s) from {database.name}")
