import click

from listener.cli.demo import demo
from listener.cli.start import start
from listener.cli.status import status


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """mongotune: fine-tune and serve language models from documents in MongoDB."""


cli.add_command(start)
cli.add_command(status)
cli.add_command(demo)
