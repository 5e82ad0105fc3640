"""Every command fails in one line: the exceptions a user can cause, mapped once for all commands.

`Group.invoke` turns what reaches it into a `click.ClickException` (one line, exit 1) that says
what went wrong and what to do; `listener --verbose COMMAND` shows the traceback instead.
"""

from contextlib import contextmanager

import click
from bson import json_util
from pymongo.errors import ConfigurationError, ConnectionFailure, OperationFailure, PyMongoError

from listener.connection import authentication_failed, reason, redact
from listener.definitions import id_text
from listener.follow import Gone
from listener.settings import SettingsError
from listener.status import DOCUMENT_VALIDATION_FAILURE
from training.config import SpecError
from training.inert import MAX_LINE_CHARS, inert

URI_KEY = "mongotune.uri"  # ctx.meta entry: the URI a command resolved, for messages about it


def remember_uri(uri: str) -> None:
    """Record the URI in use, so a connection error can name it (redacted)."""
    context = click.get_current_context(silent=True)
    if context is not None:
        context.meta[URI_KEY] = uri


def one_line(exc: BaseException, uri: str | None) -> str:
    """What to tell a person about `exc`: what went wrong, then what to do."""
    where = redact(uri) if uri else "the server"
    if isinstance(exc, SpecError):
        return f"refused before anything was written: {exc}"
    if isinstance(exc, SettingsError):
        return str(exc)
    if isinstance(exc, ConfigurationError):
        return bad_uri(where, exc)
    if isinstance(exc, ConnectionFailure):
        return (f"cannot reach MongoDB at {where}: {reason(exc)}; check the host and port and that the server "
                "runs (the URI's serverSelectionTimeoutMS sets how long to try)")
    if isinstance(exc, OperationFailure) and exc.code == DOCUMENT_VALIDATION_FAILURE:
        return ("the server's $jsonSchema validator refused the document"
                f"{refused_field(exc.details)}; the daemon's operator sets its bounds: change the document")
    refused_login = authentication_failed(exc, uri or "")
    if refused_login:
        return refused_login
    if isinstance(exc, PyMongoError):
        return f"MongoDB at {where} refused: {' '.join(str(exc).split())[:300]}"
    if isinstance(exc, TimeoutError | OSError | Gone):
        return " ".join(str(exc).split()) or type(exc).__name__
    return (f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())[:300]} "
            "(run `listener --verbose ...` for the traceback)")


@contextmanager
def stopped_following(model_id):
    """Ctrl-C while following a model stops the watching only: say so in one line, as a shell's 130.

    Without this a person sees click's bare "Aborted!" and may think the training was stopped too;
    the daemon goes on whatever this process does, and `listener cancel` is how to stop it.
    """
    try:
        yield
    except (KeyboardInterrupt, click.Abort):
        shown = inert(id_text(model_id))  # as a person types it back into the commands named
        click.echo(f"stopped following {inert(repr(model_id))}; its training goes on in the daemon "
                   f"(`listener cancel {shown}` cancels it, `listener logs {shown} --follow` follows it again)",
                   err=True)
        raise click.exceptions.Exit(130) from None


def bad_uri(shown_uri: str, exc: Exception) -> str:
    return f"cannot use the URI {shown_uri}: {exc}; a URI looks like mongodb://host:27017/mydb?replicaSet=rs0"


def refused_field(details: dict | None) -> str:
    """Where a `$jsonSchema` refusal points, as ' at trainer.max_steps ({"maximum": 10}, got 50)'; empty if unsaid."""
    def leaves(node, path):
        if isinstance(node, list):
            for value in node:
                yield from leaves(value, path)
        elif isinstance(node, dict):
            path = (*path, str(node["propertyName"])) if "propertyName" in node else path
            if "specifiedAs" in node:
                yield path, node
            for value in node.values():
                yield from leaves(value, path)

    found = next(leaves((details or {}).get("errInfo"), ()), None)
    if found is None:
        return ""
    path, rule = found
    got = f", got {rule['consideredValue']!r}" if "consideredValue" in rule else ""
    return f" at {'.'.join(path) or 'its top level'} ({json_util.dumps(rule['specifiedAs'])}{got})"


class Group(click.Group):
    """A click group whose commands fail in one line, or with a traceback under `--verbose`."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            exc.ctx = None  # a usage error is shown without the usage block: one line, whose message names the option
            exc.message = inert(exc.message, MAX_LINE_CHARS)  # messages quote documents
            raise
        except (click.exceptions.Exit, click.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            if ctx.params.get("verbose"):
                raise
            raise click.ClickException(inert(one_line(exc, ctx.meta.get(URI_KEY)), MAX_LINE_CHARS)) from None
