"""Options shared by every command that talks to a database."""

import logging

import click
from rich.logging import RichHandler

from listener import defaults

uri_option = click.option(
    "--uri", envvar=defaults.ENV_URI, default=None, metavar="URI",
    help=f"MongoDB replica set URI (or ${defaults.ENV_URI}); without one, the embedded server is used.",
)
db_option = click.option(
    "--db", default=None, metavar="NAME",
    help=f"Database name; defaults to the URI's path, then ${defaults.ENV_DB}, then '{defaults.DEFAULT_DB}'.",
)


def connection_options(command):
    return uri_option(db_option(command))


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(show_path=False, rich_tracebacks=True)])
    for noisy in ("pymongo", "apscheduler", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def resolve(uri: str | None, db: str | None) -> tuple[str, str]:
    """The URI and database a command should use: the embedded server when no URI is given."""
    from listener.connection import database_name
    from listener.embedded import EmbeddedServer

    if not uri:
        server = EmbeddedServer()
        if not server.answering():
            raise click.ClickException("no --uri given and the embedded server is not running: start it with "
                                       "`listener start`, or pass --uri")
        uri = server.uri
    return uri, database_name(uri, db)
