import click
from rich.console import Console
from rich.table import Table

from listener.cli.options import connection_options, find_model, model_argument, open_database
from training import checkpoints as stored
from training import defaults
from training.inert import inert

SHOWN = ("loss", "eval_loss", "eval_perplexity", "eval_mean_token_accuracy")


def rows(document: dict) -> list[tuple]:
    """One row per listed checkpoint: run, step, the metrics that matter, size, and whether it serves `best`."""
    best = document.get("best_checkpoint") if isinstance(document.get("best_checkpoint"), dict) else {}
    out = []
    for c in stored.listed(document.get("checkpoints")):
        metrics = c.get("metrics") if isinstance(c.get("metrics"), dict) else {}
        serves = (c["run"], c["step"]) == (best.get("run"), best.get("step"))
        size = c.get("size")
        out.append((c["run"], c["step"], *(metrics.get(name) for name in SHOWN),
                    f"{size / 1e6:.1f} MB" if isinstance(size, (int, float)) else "", serves))
    return out


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else ""


@click.command("checkpoints")
@connection_options
@model_argument
def checkpoints(uri, db, model):
    """List MODEL's stored checkpoints: run, step, metrics, size, and which one serves `best`.

    \b
    Example:
      listener checkpoints my-model --db mydb
    """
    document = find_model(open_database(uri, db)[defaults.MODELS], model,
                          {"checkpoints": 1, "best_checkpoint": 1, "run": 1})
    table = Table(title=f"checkpoints of {inert(repr(model))}")
    for column in ("run", "step", *SHOWN, "size", "serves"):
        table.add_column(column, justify="left" if column == "serves" else "right")
    for run, step, *metrics, size, serves in rows(document):
        table.add_row(str(run), str(step), *(_number(m) for m in metrics), size, "best" if serves else "")
    if not table.rows:
        raise click.ClickException(f"model {model!r} has no stored checkpoint yet")
    Console().print(table)
