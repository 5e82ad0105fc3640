import click
from rich.console import Console

from listener.cli.errors import remember_uri
from listener.cli.options import uri_option


@click.command()
@uri_option
@click.option("--db", default="mongotune_demo", show_default=True, help="Database for the demo (dropped first).")
@click.option("--model", "model_path", default=None,
              help="Model folder or hub id; defaults to the offline SmolLM2-135M-Instruct.")
def demo(uri, db, model_path):
    """Run the whole loop: sample data, a model document, LoRA training, and answered requests."""
    from listener.demo import run_demo
    from listener.embedded import EmbeddedServer, home
    from training.offline import smollm2_path

    console = Console()
    try:
        model_path = model_path or str(smollm2_path(log=console.print))
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    if uri:
        remember_uri(uri)  # so a connection error names it, as every other command's does
        raise SystemExit(run_demo(uri, db, model_path, home(), console))
    with console.status("starting the embedded MongoDB-compatible server..."):
        server = EmbeddedServer().start()
    console.print(f"embedded server at {server.uri_for(db)} (data in {server.folder})")
    try:
        code = run_demo(server.uri, db, model_path, home(), console)
    finally:
        server.stop()
    raise SystemExit(code)
