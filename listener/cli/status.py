import datetime as dt

import click
from pymongo import MongoClient
from rich.console import Console
from rich.table import Table

from listener import defaults
from listener.cli.options import connection_options, resolve


def live_daemons(db) -> list[dict]:
    """Daemons whose heartbeat is recent enough to count them alive."""
    cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=3 * defaults.HEARTBEAT_S)
    return list(db[defaults.LISTENER].find({"kind": "daemon", "heartbeat_at": {"$gte": cutoff}}))


@click.command()
@connection_options
@click.option("--check", is_flag=True, help="Print nothing; exit 0 if a daemon is alive, 1 if none is.")
def status(uri, db, check):
    """Show live daemons, models and requests."""
    uri, name = resolve(uri, db)
    client = MongoClient(uri, serverSelectionTimeoutMS=5000)
    database = client[name]
    daemons = live_daemons(database)
    if check:
        raise SystemExit(0 if daemons else 1)
    console = Console()
    table = Table(title=f"daemons on {name}")
    for column in ("owner", "heartbeat", "trainings", "counters"):
        table.add_column(column)
    for d in daemons:
        counters = " ".join(f"{k}={v}" for k, v in d.get("counters", {}).items() if v)
        table.add_row(d["owner"], f"{d['heartbeat_at']:%H:%M:%S}", ", ".join(d.get("trainings", [])), counters)
    console.print(table)
    models = Table(title="models")
    for column in ("_id", "status", "run", "progress", "best checkpoint", "error"):
        models.add_column(column)
    for m in database[defaults.MODELS].find({}, {"status": 1, "run": 1, "progress": 1, "best_checkpoint": 1,
                                                 "error": 1}):
        p = m.get("progress") or {}
        best = m.get("best_checkpoint")
        models.add_row(str(m["_id"]), m.get("status", "pending"), str(m.get("run", "")),
                       f"{p.get('step', 0)}/{p.get('total_steps', '?')}" if p else "",
                       f"run {best['run']} step {best['step']}" if best else "",
                       (m.get("error") or {}).get("message", "")[:80])
    console.print(models)
    counts = database[defaults.REQUESTS].aggregate([{"$group": {"_id": "$status", "n": {"$sum": 1}}}])
    console.print("requests: " + (", ".join(f"{c['_id'] or 'pending'}={c['n']}" for c in counts) or "none"))
