from pathlib import Path

import click
from pymongo import MongoClient

from listener.cli.options import connection_options, resolve
from listener.plot import NoMetrics, draw
from training import defaults, ids


@click.command(epilog="\b\nExample:\n  listener plot pirate -o pirate-loss.png --width 1200 --height 700")
@connection_options
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="The PNG file to write.")
@click.option("--width", default=1000, show_default=True, type=click.IntRange(200, 10_000), help="Pixels.")
@click.option("--height", default=600, show_default=True, type=click.IntRange(150, 10_000), help="Pixels.")
def plot(uri, db, model, output, width, height):
    """Plot MODEL's training and eval loss against step, one colour per run, into a PNG (matplotlib)."""
    uri, name = resolve(uri, db)
    document = MongoClient(uri)[name][defaults.MODELS].find_one({"_id": ids.eq(model)})
    if document is None:
        raise click.ClickException(f"no model {model!r} in {name}.{defaults.MODELS}")
    try:
        draw(document, output, width, height)
    except NoMetrics as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {output}: {exc.strerror or exc}") from None
    click.echo(f"wrote {output} ({width}x{height})")
