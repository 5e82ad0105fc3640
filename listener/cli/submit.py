from pathlib import Path

import click
from bson import json_util
from pymongo import MongoClient
from rich.console import Console

from listener.cli.options import connection_options, resolve
from listener.follow import follow_training
from training import defaults


@click.command()
@connection_options
@click.argument("definition", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--follow/--no-follow", default=True, show_default=True, help="Show progress until training ends.")
def submit(uri, db, definition, follow):
    """Insert a model document from a JSON file (MongoDB extended JSON), as any driver would."""
    try:
        document = json_util.loads(definition.read_text())
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="DEFINITION") from None
    uri, name = resolve(uri, db)
    models = MongoClient(uri)[name][defaults.MODELS]
    model_id = models.insert_one(document).inserted_id
    console = Console()
    console.print(f"inserted model {model_id!r} into {name}.{defaults.MODELS}")
    if follow:
        result = follow_training(console, models, model_id, timeout_s=7 * 24 * 3600)
        console.print(f"{result['status']}" + (f": {result['error']['message']}" if result.get("error") else ""))
        raise SystemExit(0 if result["status"] == "succeeded" else 1)
