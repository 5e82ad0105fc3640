"""Options shared by every command that talks to a database."""

import logging

import click
from bson import json_util
from bson.errors import BSONError
from pymongo.errors import PyMongoError
from rich.logging import RichHandler

from listener.definitions import id_text
from training import defaults, ids
from training.hints import closest_model_id, shown
from training.inert import inert, inert_logging

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


def exact_id(text: str):
    """The `_id` that extended JSON gives exactly ('{"$oid": "..."}', '{"$numberInt": "7"}'): how a command line names
    a model or a request whose `_id` is not a string. ValueError when it is not one."""
    try:
        return ids.check(json_util.loads(text))
    except (ValueError, BSONError) as exc:  # BadId too
        raise ValueError(str(exc)) from None


class ModelId(click.ParamType):
    """A model's `_id`: the text as a string, or extended JSON for other types (`exact_id`)."""

    name = "MODEL"

    def convert(self, value, param, ctx):
        if not isinstance(value, str) or not value.startswith("{"):
            return value
        try:
            return exact_id(value)
        except ValueError as exc:
            self.fail(f"{value!r} is not a model id: {exc}", param, ctx)


model_argument = click.argument("model", type=ModelId())


def open_database(uri: str | None, db: str | None, timeout_s: float = 5.0):
    """The database a command works on; the client honours the URI's own timeouts and closes with the command."""
    from pymongo import MongoClient

    from listener.cli.errors import bad_uri
    from listener.connection import redact, timeouts

    uri, name = resolve(uri, db)
    try:
        client = MongoClient(uri, **timeouts(uri, timeout_s), appname="mongotune-cli", **defaults.CODEC)
    except (PyMongoError, ValueError) as exc:  # pymongo says ValueError for some URIs, e.g. a port past 65535
        raise click.ClickException(bad_uri(redact(uri), exc)) from None
    click.get_current_context().call_on_close(client.close)
    return client[name]


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


def setup_logging(verbose: bool = False, log_format: str = "text") -> None:
    """Rich lines for people; with `log_format="json"`, one JSON object per line on stderr for log shippers."""
    handler = RichHandler(show_path=False, rich_tracebacks=True)
    if log_format == "json":
        from listener.jsonlog import JsonFormatter

        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[handler], force=True)
    inert_logging()
    for noisy in ("pymongo", "apscheduler", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def resolve(uri: str | None, db: str | None) -> tuple[str, str]:
    """The URI and database a command should use: the embedded server when no URI is given."""
    from listener.cli.errors import remember_uri
    from listener.connection import database_name
    from listener.embedded import EmbeddedServer

    if not uri:
        server = EmbeddedServer()
        if not server.running_pid():
            raise click.ClickException("no --uri given and this home's embedded server is not running: start it "
                                       "with `listener server start` (or `listener start`), or pass --uri")
        uri = server.uri
    remember_uri(uri)
    return uri, database_name(uri, db)


def find_model(models, model_id, projection: dict | None = None) -> dict:
    """The model document, or one line saying it is not there: "did you mean" the closest `_id` there is, or where to
    look. Every command that takes a model id looks it up here."""
    document = models.find_one({"_id": ids.eq(model_id)}, projection)
    if document is None:
        close = closest_model_id(models, model_id)
        named = shown(close) if isinstance(close, str) else inert(id_text(close), 200)
        hint = f"did you mean {named}?" if close is not None else "`listener status` lists them"
        raise click.ClickException(f"no model with _id {model_id!r} in {models.database.name}.{models.name}: "
                                   f"{hint}")
    return document


