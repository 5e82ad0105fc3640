from pathlib import Path

import click
from rich.console import Console

from listener.cli.options import connection_options, find_model, model_argument, open_database, operator_settings
from training import defaults
from training.checkpoints import CheckpointRefused
from training.config import SpecError


def checkpoint_ref(text: str):
    """"best", "latest" or RUN:STEP as the `{run, step}` a request would name."""
    if text in ("best", "latest"):
        return text
    run, _, step = text.partition(":")
    if not (run.isdigit() and step.isdigit()):
        raise click.BadParameter("use best, latest or RUN:STEP such as 1:45", param_hint="--checkpoint")
    return {"run": int(run), "step": int(step)}


@click.command("export")
@connection_options
@model_argument
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--checkpoint", default="best", show_default=True, help='"best" (what serves), "latest" or RUN:STEP.')
@click.option("--adapter-only", is_flag=True, help="Write the LoRA adapter alone (load it with peft on the base).")
def export(uri, db, model, dest, checkpoint, adapter_only):
    """Write a checkpoint of MODEL into the new folder DEST, loadable with plain transformers.

    The adapter is merged into the base model and saved as safetensors with the tokenizer and a
    README.md model card listing every run. The base model loads under the operator's model roots
    (MONGOTUNE_MODEL_ROOTS), as for the daemon.

    \b
    Examples:
      listener export my-model ./my-model-merged --db mydb
      listener export my-model ./run2 --checkpoint 2:40 --adapter-only
    """
    from training.export import ExportError, export as write

    ref = checkpoint_ref(checkpoint)
    limits = operator_settings(uri=uri, db=db).limits
    database = open_database(uri, db)
    find_model(database[defaults.MODELS], model, {"_id": 1})
    console = Console(stderr=True)
    try:
        with console.status("exporting") as status:
            entry = write(database, model, ref, dest, limits, adapter_only, say=lambda text: status.update(text),
                          note=lambda text: click.echo(f"note: {text}", err=True))
    except (ExportError, SpecError, CheckpointRefused, LookupError) as exc:
        raise click.ClickException(str(exc)) from None
    kind = "adapter" if adapter_only else "merged model"
    click.echo(f"wrote the {kind} of {model!r} run {entry['run']} step {entry['step']} to {dest}")
