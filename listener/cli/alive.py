"""Whether any daemon serves a database, from the heartbeats daemons record in `_listener`."""

from listener.cli.status import live_daemons
from training import defaults


def no_daemon(database, heartbeat_s: float) -> str | None:
    """None while a daemon's heartbeat is recent; else the line that says so and what to do."""
    if live_daemons(database, heartbeat_s):
        return None
    return (f"no daemon is alive on database {database.name!r} (no heartbeat in {defaults.LISTENER} for "
            f"{3 * heartbeat_s:.0f} s): start one with `listener start --db {database.name}`")
