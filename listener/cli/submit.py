import json
from pathlib import Path

import click
import yaml
from bson import json_util
from rich.console import Console

from listener.cli.alive import no_daemon, waiting_note
from listener.cli.errors import stopped_following
from listener.cli.options import connection_options, open_database, operator_settings
from listener.definitions import Busy, insert_model, replace_model, replaced
from listener.follow import follow_training
from listener.status import Status
from training import defaults
from training.config import parse_model
from training.inert import MAX_LINE_CHARS, inert

# A folder in `model_name_or_path` names a path on the daemon's host, which this one may not be: that check
# is the daemon's; names, types, bounds and the hub allowlist are checked here as the daemon checks them.
ANY_FOLDER = {"model_roots": (Path("/"),), "private_roots": ()}


def read_definition(path: Path) -> dict:
    """A model document from a JSON (MongoDB extended JSON) or YAML file; extended JSON works in YAML too."""
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            return json_util.loads(json.dumps(yaml.safe_load(text), default=str))
        return json_util.loads(text)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "YAML" if path.suffix.lower() in (".yaml", ".yml") else "JSON"
        raise click.BadParameter(f"not {kind}: {' '.join(str(exc).split())}", param_hint="DEFINITION") from None


@click.command()
@connection_options
@click.argument("definition", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--follow/--no-follow", default=True, show_default=True, help="Show progress until training ends.")
@click.option("--replace", is_flag=True, help="A model with this _id exists: make this definition its next run "
              "(its runs and checkpoints stay; the run records what changed).")
def submit(uri, db, definition, follow, replace):
    """Insert a model document from a JSON or YAML file, checked first with the daemon's own parser.

    Refused, with nothing inserted, while no daemon is alive on the database: start one first. To
    correct a model already submitted, edit the file and submit it again with --replace.

    \b
    Examples:
      listener submit model.yaml --db mydb
      listener submit model.yaml --db mydb --replace
    """
    settings = operator_settings(uri=uri, db=db)
    document = read_definition(definition)
    parse_model(document, settings.limits.model_copy(update=ANY_FOLDER))
    database = open_database(uri, db)
    idle = no_daemon(database)
    if idle:  # checked first: a model inserted now would wait unseen, and a second submit would find its _id taken
        raise click.ClickException(f"{idle}, then submit again; nothing was inserted")
    models = database[defaults.MODELS]
    where = f"{database.name}.{defaults.MODELS}"
    if replace and "_id" in document:
        try:
            stored, changed = replace_model(models, document)
        except Busy as exc:
            raise click.ClickException(str(exc)) from None
        model_id, done = stored["_id"], replaced(stored, changed, where)
    else:
        model_id = insert_model(models, document)
        done = f"inserted model {model_id!r} into {where}"
    with stopped_following(model_id):  # from here on a Ctrl-C leaves a model in the database that trains
        console = Console()
        console.print(inert(done, MAX_LINE_CHARS), soft_wrap=True)
        if not follow:
            return
        note = waiting_note(database, settings.heartbeat_s)
        result = follow_training(console, models, model_id, timeout_s=7 * 24 * 3600, note=note)
    error = result.get("error") if isinstance(result.get("error"), dict) else {}
    console.print(inert(f"{result['status']}" + (f": {error.get('message')}" if error else ""), MAX_LINE_CHARS))
    raise SystemExit(0 if result["status"] == Status.SUCCEEDED else 1)
