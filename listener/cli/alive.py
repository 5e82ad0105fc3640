"""Whether any daemon serves a database, from the heartbeats daemons record in `_listener`."""

import datetime as dt
import time
from collections.abc import Callable

from listener.cli.status import live_daemons
from listener.records import BadRecord, Lease, parse
from listener.status import Status
from training import defaults


def no_daemon(database) -> str | None:
    """None while a daemon's heartbeat is recent; else the line that says so and what to do."""
    if live_daemons(database):
        return None
    return (f"no daemon is alive on database {database.name!r} (no recent heartbeat in {defaults.LISTENER}): "
            f"start one with `listener start --db {database.name}`")


def waiting_note(database, heartbeat_s: float) -> Callable[[dict], str | None]:
    """For a wait on a model document: what the daemons mean for it now, None while one works on it.

    The wait polls the document several times a second; the heartbeats are read again only once a
    heartbeat interval, since they change no faster.
    """
    read_at, alive = -float("inf"), 0

    def count() -> int:
        nonlocal read_at, alive
        if time.monotonic() - read_at >= heartbeat_s:
            read_at, alive = time.monotonic(), len(live_daemons(database))
        return alive

    def note(document: dict) -> str | None:
        status = document.get("status") or Status.PENDING.value
        if status == Status.PENDING:
            n = count()
            return (f"waiting for a daemon to claim it ({n} alive)" if n else
                    f"waiting for a daemon (none alive: start one with `listener start --db {database.name}`)")
        if status == Status.RUNNING and lease_expired(document):
            n = count()
            return ("the daemon running it stopped; " +
                    (f"one of the {n} alive will resume it" if n else "another will resume it when one starts"))
        return None

    return note


def lease_expired(document: dict) -> bool:
    """Whether the model's lease (typed as the daemon reads it) has run out; False when it has none."""
    try:
        expires = parse(Lease, document.get("lease")).expires_at
    except BadRecord:
        return False
    return (expires if expires.tzinfo else expires.replace(tzinfo=dt.timezone.utc)) < defaults.now()
