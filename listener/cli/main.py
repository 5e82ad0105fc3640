import click

from listener.cli.cancel import cancel
from listener.cli.checkpoints import checkpoints
from listener.cli.delete import delete
from listener.cli.demo import demo
from listener.cli.errors import Group
from listener.cli.export import export
from listener.cli.feedback import feedback
from listener.cli.import_data import import_data
from listener.cli.logs import logs
from listener.cli.plot import plot
from listener.cli.predict import predict
from listener.cli.retrain import retrain
from listener.cli.server import server
from listener.cli.start import start
from listener.cli.status import status
from listener.cli.submit import submit
from listener.cli.templates import apply, export_template


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", is_flag=True, help="Show a traceback when a command fails, not just its one line.")
def cli(verbose):
    """mongotune: fine-tune and serve language models from documents in MongoDB."""


cli.add_command(start)
cli.add_command(status)
cli.add_command(submit)
cli.add_command(predict)
cli.add_command(logs)
cli.add_command(cancel)
cli.add_command(retrain)
cli.add_command(delete)
cli.add_command(demo)
cli.add_command(server)
cli.add_command(import_data)
cli.add_command(plot)
cli.add_command(export_template)
cli.add_command(apply)
cli.add_command(checkpoints)
cli.add_command(export)
cli.add_command(feedback)
