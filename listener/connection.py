"""Finding the database: URI and name resolution, credential redaction, the replica-set check."""

import os
import re
from urllib.parse import unquote

from pymongo import AsyncMongoClient
from pymongo.errors import OperationFailure, PyMongoError

from training import defaults


class ConnectionProblem(RuntimeError):
    pass


AUTHENTICATION_FAILED = 18  # the server's code for a wrong user, password, authSource or mechanism


def authentication_failed(exc: BaseException, uri: str) -> str | None:
    """One line for a refused login, or None for any other error.

    pymongo's text for it ends with the server's whole reply, signature bytes and all, and the server
    does not say which part was wrong (by design): name the user and where the password comes from,
    never the password.
    """
    if not (isinstance(exc, OperationFailure) and exc.code == AUTHENTICATION_FAILED):
        return None
    _, userinfo, _, _ = _split(uri)
    user = unquote(userinfo.partition(":")[0])
    return (f"MongoDB at {redact(uri)} refused the login: authentication failed"
            f"{f' for user {user!r}' if user else ''}; check the "
            "password (and authSource) in --uri or MONGOTUNE_URI, or in the file `listener start --uri-file` reads")


# URI options shown in logs as they are; every other option's value is masked, since some carry secrets
# (authMechanismProperties, tlsCertificateKeyFilePassword, ...) and new ones may.
SHOWN_OPTIONS = frozenset({
    "replicaset", "directconnection", "tls", "ssl", "authsource", "authmechanism", "readpreference", "w",
    "retrywrites", "retryreads", "appname", "serverselectiontimeoutms", "connecttimeoutms", "sockettimeoutms",
    "maxpoolsize", "minpoolsize", "journal", "readconcernlevel", "compressors", "loadbalanced", "srvmaxhosts",
    "heartbeatfrequencyms", "localthresholdms", "maxidletimems", "waitqueuetimeoutms", "timeoutms",
})


def _mask_option(option: str) -> str:
    name, eq, _ = option.partition("=")
    return option if not eq or name.lower() in SHOWN_OPTIONS else f"{name}=***"


def has_password(uri: str) -> bool:
    _, userinfo, _, _ = _split(uri)
    return ":" in userinfo


def _split(uri: str) -> tuple[str, str, str, str]:
    """scheme, user info, hosts and path, query: split by hand so a raw '@' in a password is handled."""
    scheme, separator, rest = uri.partition("://")
    if not separator:  # a typo such as "mongodb//host": no scheme at all
        scheme, rest = "", uri
    rest, _, query = rest.partition("?")
    userinfo, at, hosts = rest.rpartition("@")
    return scheme, userinfo if at else "", hosts if at else rest, query


def redact(uri: str) -> str:
    """The URI with passwords and secret options replaced, safe for logs and documents."""
    scheme, userinfo, hosts, query = _split(uri)
    if userinfo:
        user, colon, _ = userinfo.partition(":")
        hosts = f"{user}{':***' if colon else ''}@{hosts}"
    options = "&".join(_mask_option(option) for option in query.split("&")) if query else ""
    return (f"{scheme}://" if scheme else "") + hosts + (f"?{options}" if options else "")


def timeouts(uri: str, default_s: float) -> dict:
    """`serverSelectionTimeoutMS` for a client: the URI's own when it names one, else `default_s`."""
    _, _, _, query = _split(uri)
    named = {option.partition("=")[0].lower() for option in query.split("&")}
    return {} if "serverselectiontimeoutms" in named else {"serverSelectionTimeoutMS": int(default_s * 1000)}


def reason(exc: Exception) -> str:
    """Why a server could not be reached, in one line: the per-host errors without pymongo's topology dump."""
    text = re.sub(r",? Timeout: [\d.]+s, Topology Description: .*", "", str(exc), flags=re.S)
    return " ".join(re.sub(r" \(configured timeouts: [^)]*\)", "", text).split())


def database_name(uri: str, db: str | None) -> str:
    """`--db` first, then the URI's path, then MONGOTUNE_DB, then the default. Needs no DNS lookup."""
    if db:
        return db
    _, _, hosts, _ = _split(uri)
    _, slash, path = hosts.partition("/")
    return unquote(path) if slash and path else os.environ.get(defaults.ENV_DB) or defaults.DEFAULT_DB


async def connect(uri: str, timeout_s: float = 10.0, role: str | None = None) -> AsyncMongoClient:
    """A client to a deployment that has change streams, or a ConnectionProblem saying what is wrong.

    `role` names a client the daemon keeps beside its main one (in the server's `appname`): each client
    has a pool of its own, `maxPoolSize` connections whatever the others hold.
    """
    appname = "mongotune-listener" + (f"-{role}" if role else "")
    try:
        client = AsyncMongoClient(uri, **timeouts(uri, timeout_s), appname=appname, **defaults.CODEC)
    except (PyMongoError, ValueError) as exc:
        raise ConnectionProblem(f"cannot use the URI {redact(uri)}: {exc}") from None
    try:
        hello = await client.admin.command("hello")
    except Exception as exc:
        await client.close()
        raise ConnectionProblem(authentication_failed(exc, uri)
                                or f"cannot reach MongoDB at {redact(uri)}: {reason(exc)}") from None
    if not hello.get("setName") and hello.get("msg") != "isdbgrid":
        await client.close()
        raise ConnectionProblem(
            f"{redact(uri)} is a standalone server, but the listener needs change streams, which only a replica "
            "set or a sharded cluster has: start mongod with --replSet rs0 and run rs.initiate() once "
            "(a one-node replica set is enough), or run `listener start` without --uri for the embedded server"
        )
    return client
