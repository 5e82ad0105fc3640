import click

from listener.cli.demo import demo
from listener.cli.predict import predict
from listener.cli.start import start
from listener.cli.status import status
from listener.cli.submit import submit


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """mongotune: fine-tune and serve language models from documents in MongoDB."""


cli.add_command(start)
cli.add_command(status)
cli.add_command(submit)
cli.add_command(predict)
cli.add_command(demo)
