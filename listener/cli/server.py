"""`listener server start|stop|status`: the embedded server of this home (MONGOTUNE_HOME), on its own.

A server started here is stopped only by `listener server stop`; daemons and mongosh sessions use it
meanwhile, and no daemon stops it at its exit.
"""

import click

from listener.cli.options import db_option


def _server():
    from listener.embedded import EmbeddedServer, home

    return EmbeddedServer(home() / "embedded")


def _uri(server, db: str | None) -> str:
    from listener.connection import database_name

    return server.uri_for(database_name(server.uri, db))


@click.group()
def server():
    """The embedded MongoDB-compatible server of this home (MONGOTUNE_HOME), for development.

    \b
    Example:
      listener server start && mongosh "$(listener server status --uri-only)"
    """


@server.command()
@db_option
def start(db):
    """Start this home's server unless it runs; print its URI (with the database) and pid.

    \b
    Example:
      MONGOTUNE_HOME=~/project-b listener server start   # another home, another port
    """
    found = _server()
    already = found.running_pid()
    try:
        found.start(started_by="listener server start")
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    pid = found.running_pid()
    if pid is None:
        raise click.ClickException(f"port {found.port} answers, but not as this home's server; "
                                   f"see {found.log_path}")
    click.echo(f"{_uri(found, db)} {pid}" + (" (already running)" if already else ""))


@server.command()
def stop():
    """Stop this home's server, whoever started it; daemons using it lose their database.

    \b
    Example:
      listener server stop
    """
    found = _server()
    pid = found.stop_running()
    if pid is None:
        click.echo(f"no server runs for {found.folder}")
        return
    click.echo(f"stopped the server (pid {pid}) at {_uri(found, None)}")


@server.command()
@db_option
@click.option("--uri-only", is_flag=True, help="Print only the URI, for scripts.")
def status(db, uri_only):
    """Say whether this home's server runs (exit 0) or not (exit 1), with its URI, pid and data folder.

    \b
    Example:
      mongosh "$(listener server status --uri-only --db mydb)"
    """
    found = _server()
    pid = found.running_pid()
    if uri_only:
        if pid is None:
            raise click.ClickException(f"no server runs for {found.folder}: start it with `listener server start`")
        click.echo(_uri(found, db))
        return
    if pid is None:
        click.echo(f"not running (port {found.port} is kept for {found.folder}); start it with `listener server start`",
                   err=True)
        raise SystemExit(1)
    record = found.record()
    click.echo(f"running: {_uri(found, db)} pid {pid}, started by {record.get('started_by') or 'unknown'}, "
               f"data in {found.folder}")
