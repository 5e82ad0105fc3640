from pathlib import Path

import click

from listener.cli.options import connection_options, find_model, model_argument, open_database
from listener.plot import NoMetrics, draw
from training import defaults


@click.command(epilog="\b\nExample:\n  listener plot pirate -o pirate-loss.png --width 1200 --height 700")
@connection_options
@model_argument
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="The PNG file to write.")
@click.option("--width", default=1000, show_default=True, type=click.IntRange(200, 10_000), help="Pixels.")
@click.option("--height", default=600, show_default=True, type=click.IntRange(150, 10_000), help="Pixels.")
def plot(uri, db, model, output, width, height):
    """Plot MODEL's training and eval loss against step, one colour per run, into a PNG (matplotlib)."""
    document = find_model(open_database(uri, db)[defaults.MODELS], model)
    try:
        draw(document, output, width, height)
    except NoMetrics as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {output}: {exc.strerror or exc}") from None
    click.echo(f"wrote {output} ({width}x{height})")
