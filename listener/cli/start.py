import socket

import click

from listener import defaults
from listener.cli.options import connection_options, setup_logging
from listener.connection import ConnectionProblem


@click.command()
@connection_options
@click.option("--name", default=socket.gethostname, show_default="host name",
              help="This daemon's name; its resume tokens are kept under it, so keep it across restarts.")
@click.option("--max-jobs", default=defaults.MAX_TRAINING_JOBS, show_default=True, type=click.IntRange(1, 64),
              help="Trainings this daemon runs at once.")
@click.option("--validators/--no-validators", default=True, show_default=True,
              help="Install $jsonSchema validators so bad inserts are refused at write time.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def start(uri, db, name, max_jobs, validators, verbose):
    """Watch the database: train pending models and answer pending requests until stopped."""
    from listener.daemon import serve

    setup_logging(verbose)
    try:
        serve(uri, db, name=name, max_jobs=max_jobs, validators=validators)
    except (ConnectionProblem, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
