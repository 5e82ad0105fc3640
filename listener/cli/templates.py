"""`export-template` and `apply`: model templates (a reusable model definition), not `data.template`."""

from pathlib import Path

import click
import yaml
from bson import ObjectId
from pymongo import MongoClient

from listener import model_templates as templates
from listener.definitions import insert_model
from listener.cli.options import (connection_options, find_model, open_database, operator_settings,
                                  resolve)
from training import defaults
from training.config import SpecError, parse_model
from training.hints import shown

DEFAULTS = ", ".join(f"{name}={path}" for name, path in templates.DEFAULT_VARIABLES.items())


def _database(uri, db):
    uri, name = resolve(uri, db)
    return MongoClient(uri)[name], name


@click.command("export-template", epilog="""
\b
Example:
  listener export-template pirate ./pirate-template --var collection=data.collection \\
      --var model=model_name_or_path --var steps=trainer.max_steps
""")
@connection_options
@click.argument("model")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--var", "variables", multiple=True, metavar="NAME=FIELD",
              help=f"Turn the value at a dotted FIELD into variable NAME (repeatable; default: {DEFAULTS}).")
def export_template(uri, db, model, folder, variables):
    """Write MODEL's definition as a model template in FOLDER (template.yaml and variables.yaml).

    A model template is a whole model definition to reuse (`listener apply`); it is not
    `data.template`, which formats each training example. Only the fields a user sets are written;
    status, metrics, checkpoints and everything else the listener writes stay behind.
    """
    try:
        chosen = dict(templates.parse_assignment(v) for v in variables) or templates.DEFAULT_VARIABLES
        database, _ = _database(uri, db)
        document = find_model(database[defaults.MODELS], model)
        template, described = templates.export(document, chosen)
        templates.write(folder, template, described)
    except templates.TemplateProblem as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {folder}: {exc.strerror or exc}") from None
    click.echo(f"wrote {folder / templates.TEMPLATE_FILE} with variables {', '.join(described)}")


@click.command(epilog="""
\b
Example:
  listener apply ./pirate-template --set collection=support_chat \\
      --set model=HuggingFaceTB/SmolLM2-135M-Instruct --id support
""")
@connection_options
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--set", "assignments", multiple=True, metavar="NAME=VALUE", help="A variable's value (repeatable).")
@click.option("--id", "model_id", metavar="ID", help="The new model's _id (default: a new ObjectId).")
@click.option("--dry-run", is_flag=True, help="Check the data it would train on and print the filled-in definition "
                                              "instead of inserting it.")
def apply(uri, db, folder, assignments, model_id, dry_run):
    """Fill in the model template in FOLDER and insert it into `_models` as a new model.

    The variables come from --set, else from the defaults in variables.yaml. The result is parsed
    with the daemon's own parser and the operator's caps (MONGOTUNE_* settings) before it is inserted.
    (A model template is a whole definition; `data.template` formats training examples.)
    """
    try:
        template, variables = templates.read(folder)
        given = dict(templates.parse_assignment(a) for a in assignments)
        document = {"_id": model_id or ObjectId(), **templates.apply(template, variables, given)}
        limits = operator_settings().limits
        spec = parse_model(document, limits)
    except templates.TemplateProblem as exc:
        raise click.ClickException(str(exc)) from None
    except SpecError as exc:
        raise click.ClickException(f"the filled-in template is not a valid model: {exc}") from None
    if dry_run:
        selected = _check_data(open_database(uri, db), spec, limits)
        click.echo(yaml.safe_dump({**document, "_id": str(document["_id"])}, sort_keys=False, allow_unicode=True))
        click.echo(f"checked the data: {selected} selected document(s) in collection {shown(spec.data.collection)} "
                   "have the fields it names; nothing was inserted", err=True)
        return
    database, name = _database(uri, db)
    insert_model(database[defaults.MODELS], document)
    click.echo(f"inserted model {document['_id']!r} into {name}.{defaults.MODELS}")


def _check_data(database, spec, limits) -> int:
    """The training's first checks on `spec.data` (the collection has the selected documents, with the fields
    named): how many documents it selects, or the one line the training would fail with."""
    from training.methods import check_documents

    try:
        return check_documents(database, spec, limits)
    except SpecError as exc:
        raise click.ClickException(f"the data it would train on does not fit: {exc}") from None
