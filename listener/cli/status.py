from typing import Any

import bson
import click
from bson.raw_bson import RawBSONDocument
from pymongo.errors import OperationFailure
from rich.console import Console
from rich.table import Table

from listener import health
from listener.cli.options import connection_options, open_database, operator_settings
from listener.records import BadRecord, DaemonRecord, decoded, only, parse, raw, raw_id
from listener.status import BY_STATUS, Status
from listener.leases import alive
from training import defaults
from training.config import MAX_DEPTH, SpecError
from training.inert import MAX_LINE_CHARS, inert


def version_line(versions: dict[str, str]) -> str:
    """What a daemon runs with: the versions its runs record in `runs[].versions`."""
    return "versions: " + ", ".join(f"{name} {version}" for name, version in versions.items())


def live_daemons(db) -> list[DaemonRecord]:
    """Daemons alive by their own heartbeats (`leases.alive`), as they describe themselves (for display only)."""
    found = []
    for record in db[defaults.LISTENER].find(alive()):
        try:
            found.append(parse(DaemonRecord, record))
        except BadRecord:
            continue
    return found


@click.command()
@connection_options
@click.option("--check", is_flag=True,
              help="Print one line; exit 0 if a daemon of this home (MONGOTUNE_HOME) is alive and reached its "
                   "database lately, 1 if not. Reads only what the daemon itself wrote on this host.")
@click.option("--name", default=None, envvar="MONGOTUNE_NAME",
              help="With --check: that daemon only (or $MONGOTUNE_NAME, as the daemon itself reads it).")
def status(uri, db, check, name):
    """Show live daemons, models and requests.

    \b
    Examples:
      listener status --uri "mongodb://host/mydb?replicaSet=rs0"
      listener status --check        # for container probes
    """
    settings = operator_settings(uri=uri, db=db)
    if check:
        healthy, why = health.check(settings.home, 3 * settings.heartbeat_s, name)
        click.echo(why, err=not healthy)
        raise SystemExit(0 if healthy else 1)
    database = open_database(uri, db)
    name = database.name
    console = Console()
    daemons = live_daemons(database)
    table = Table(title=f"daemons on {name}")
    # The owner is what `_listener` and leases name: shown whole, however narrow the terminal.
    table.add_column("owner", no_wrap=True, min_width=max((len(inert(d.owner)) for d in daemons), default=5))
    for column in ("heartbeat", "trainings", "gpus free", "waiting", "counters"):
        table.add_column(column)
    for d in daemons:
        counters = " ".join(f"{k}={v}" for k, v in d.counters.items() if v)
        gpus = f"{len(d.gpus_free)}/{len(d.gpus)}" if d.gpus else "cpu"
        waiting = "; ".join(f"{w.get('model')}: {w.get('why')}" for w in d.waiting)
        table.add_row(*map(inert, (d.owner, f"{d.heartbeat_at:%H:%M:%S}", ", ".join(d.trainings), gpus, waiting,
                                    counters)))
    console.print(table)
    for line in sorted({version_line(d.versions) for d in daemons if d.versions}):
        console.print(inert(line, MAX_LINE_CHARS))
    models = Table(title="models")
    for column in ("_id", "status", "run", "progress", "best checkpoint", "error"):
        models.add_column(column)
    for doc_id, m in shown_models(database):
        if m is None:
            models.add_row(inert(doc_id), "unreadable", "", "", "", inert(UNREADABLE, 80))
            continue
        p = m.get("progress") if isinstance(m.get("progress"), dict) else {}
        best = m.get("best_checkpoint") if isinstance(m.get("best_checkpoint"), dict) else None
        error = m.get("error") if isinstance(m.get("error"), dict) else {}
        models.add_row(*map(inert, (doc_id, m.get("status", Status.PENDING.value), m.get("run", ""),
                                    f"{p.get('step', 0)}/{p.get('total_steps', '?')}" if p else "",
                                    f"run {best.get('run')} step {best.get('step')}" if best else "")),
                       inert(error.get("message", ""), 80))
    console.print(models)
    console.print("requests: " + (", ".join(f"{s}={n}" for s, n in request_counts(database).items()) or "none"))


SHOWN = {"status": 1, "run": 1, "progress": 1, "best_checkpoint": 1, "error": 1}
UNREADABLE = f"nested deeper than {MAX_DEPTH} levels"


def shown_models(database) -> list[tuple[Any, dict | None]]:
    """Each model's id and `SHOWN` fields; None for one nested deeper than the listener reads, which hides no other.

    Read raw and decoded one by one (the driver fails on the whole batch otherwise); should the server itself fail
    to project one, every model is read whole and projected here (one whose top level cannot be read is shown
    as unreadable, id and all).
    """
    models = raw(database[defaults.MODELS])
    try:
        found = models.find({}, SHOWN).to_list()
    except OperationFailure:
        found = [only(document, SHOWN) for document in models.find({})]
    return [(_shown_id(document), _readable(document)) if document is not None else ("(unreadable)", None)
            for document in found]


def _shown_id(document):
    """The id to print: one nested too deep to decode is named as such."""
    doc_id = raw_id(document)
    if not isinstance(doc_id, RawBSONDocument):
        return doc_id
    try:
        return decoded(RawBSONDocument(bson.encode({"_id": doc_id})))["_id"]
    except SpecError:
        return "(id too deep)"


def _readable(document) -> dict | None:
    try:
        return decoded(document)
    except SpecError:
        return None


def request_counts(database) -> dict[str, int]:
    """Requests by status; statuses users made up are counted together as `other` (a line stays short)."""
    counts: dict[str, int] = {}
    for row in database[defaults.REQUESTS].aggregate(BY_STATUS):
        name = row["_id"] if row["_id"] in {s.value for s in Status} else "other"
        counts[name] = counts.get(name, 0) + row["n"]
    return counts
