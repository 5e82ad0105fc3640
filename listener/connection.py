"""Finding the database: URI and name resolution, credential redaction, the replica-set check."""

import os
import re

from pymongo import AsyncMongoClient, uri_parser

from listener import defaults


class ConnectionProblem(RuntimeError):
    pass


def redact(uri: str) -> str:
    """The URI with any password replaced, safe for logs and documents."""
    return re.sub(r"(mongodb(?:\+srv)?://[^:/@]+):[^@]*@", r"\1:***@", uri)


def database_name(uri: str, db: str | None) -> str:
    """`--db` first, then the URI's path, then MONGOTUNE_DB, then the default."""
    if db:
        return db
    try:
        from_uri = uri_parser.parse_uri(uri, connect_timeout=1).get("database")
    except Exception:
        from_uri = None
    return from_uri or os.environ.get(defaults.ENV_DB) or defaults.DEFAULT_DB


async def connect(uri: str, timeout_s: float = 10.0) -> AsyncMongoClient:
    """A client to a deployment that has change streams, or a ConnectionProblem saying what is wrong."""
    client = AsyncMongoClient(uri, serverSelectionTimeoutMS=int(timeout_s * 1000), appname="mongotune-listener")
    try:
        hello = await client.admin.command("hello")
    except Exception as exc:
        await client.close()
        raise ConnectionProblem(f"cannot reach MongoDB at {redact(uri)}: {str(exc).split(',')[0]}") from None
    if not hello.get("setName") and hello.get("msg") != "isdbgrid":
        await client.close()
        raise ConnectionProblem(
            f"{redact(uri)} is a standalone server, but the listener needs change streams, which only a replica "
            "set or a sharded cluster has: start mongod with --replSet rs0 and run rs.initiate() once "
            "(a one-node replica set is enough), or run `listener start` without --uri for the embedded server"
        )
    return client
