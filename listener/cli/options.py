"""Options shared by every command that talks to a database."""

import logging

import click
from rich.logging import RichHandler

from training import defaults

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


def operator_settings(assignments: tuple[str, ...] = (), **options):
    """The one Settings object for this command: options over environment over defaults; one line if bad."""
    from listener.settings import Settings, SettingsError, from_text
    from training.limits import Limits

    limits = {}
    for assignment in assignments:
        name, eq, value = assignment.partition("=")
        name = name.strip().replace("-", "_")
        if not eq or (name not in Settings.model_fields and name not in Limits.model_fields) or name == "limits":
            raise click.BadParameter(f"{assignment!r}: use NAME=VALUE with a setting's name, e.g. max_steps=5000",
                                     param_hint="--set")
        model, target = (Limits, limits) if name in Limits.model_fields else (Settings, options)
        target[name] = from_text(model, name, value)
    moved = {k: options.pop(k) for k in list(options) if k in Limits.model_fields}
    limits.update({k: v for k, v in moved.items() if v not in (None, ())})
    try:
        return Settings.load({**options, "limits": limits})
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


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
