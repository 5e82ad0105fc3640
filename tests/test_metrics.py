"""`--metrics-port` and `--log-format json`: what a Prometheus scrape and a log shipper see from a real daemon."""

import asyncio
import datetime as dt
import json
import re
import urllib.error
import urllib.request
from types import SimpleNamespace

from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from pymongo import AsyncMongoClient

from listener.cli.main import cli
from listener.embedded import free_port
from listener.metrics import Metrics
from listener.processes import wait_until
from tests.conftest import finished, wait_for
from training import defaults


def scrape(port: int) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of one scrape; empty while the daemon is not listening yet."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_scrape_shows_documents_by_status_latency_and_health(db, start_daemon, tiny_model_path):
    port = free_port()
    data = {"collection": "docs"}
    db[defaults.MODELS].insert_many([
        {"_id": "llm", "model_name_or_path": tiny_model_path, "data": data, "status": "succeeded", "checkpoints": []},
        {"_id": "bad", "model_name_or_path": tiny_model_path, "data": data, "trainer": {"max_step": 3}},
    ])
    daemon = start_daemon("scraped", args=("--metrics-port", str(port), "--log-format", "json",
                                           "--set", "heartbeat_s=1", "--no-validators"))
    db[defaults.REQUESTS].insert_one({"_id": "q1", "model": "llm", "input": "ahoy", "checkpoint": "base",
                                      "params": {"max_new_tokens": 2}})
    assert wait_for(db[defaults.REQUESTS], "q1", finished)["status"] == "done"

    def settled():
        found = scrape(port)
        return found if found.get(("mongotune_requests", (("status", "done"),))) == 1 else None

    metrics = wait_until(settled, 60, "a scrape that counts the answered request")
    assert metrics[("mongotune_models", (("status", "succeeded"),))] == 1
    assert metrics[("mongotune_models", (("status", "failed"),))] == 1
    assert metrics[("mongotune_daemon_events_total", (("event", "invalid_documents"),))] == 1
    assert metrics[("mongotune_request_latency_seconds_count", ())] == 1
    assert metrics[("mongotune_daemon_trainings", ())] == 0

    status, why = healthz(port)
    assert status == 200 and "'scraped'" in why
    for name, healthy in (("scraped", 0), ("another", 1)):  # what the probes run, in the daemon's environment
        checked = CliRunner().invoke(cli, ["status", "--check"], env={"MONGOTUNE_HOME": str(daemon.home),
                                                                       "MONGOTUNE_NAME": name})
        assert checked.exit_code == healthy, checked.output

    daemon.stop()
    lines = daemon.log().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert any(r["message"].startswith("listening on") and r["level"] == "info" and r["logger"] and r["time"]
               for r in records)
    assert not [line for line in lines if re.match(r"\[\d\d:\d\d:\d\d\]", line)], "no Rich lines with json logs"


def test_steps_per_second_come_from_the_progress_this_daemon_writes(client, db):
    """Two progress writes 10 s apart (by their own clocks) and 20 steps apart: 2 steps per second.

    Only the refresh is driven here, by a stand-in daemon on the real server, so the clock is the documents'.
    """
    owner = "metrics-test"
    models = db[defaults.MODELS]
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    models.insert_many([
        {"_id": "mine", "status": "running", "lease": {"owner": owner}, "progress": {"step": 10, "updated_at": start}},
        {"_id": "theirs", "status": "running", "lease": {"owner": "other"},
         "progress": {"step": 10, "updated_at": start}},
        {"_id": "odd", "status": {"made": "up"}},  # users write anything: never a label, never an error
    ])

    async def two_refreshes() -> dict:
        async_client = AsyncMongoClient(client.address[0], client.address[1], directConnection=True)
        try:
            stand_in = SimpleNamespace(db=async_client[db.name], owner=owner, counters={}, trainings={},
                                       serving=SimpleNamespace(queued=lambda: {"mine": 3}))
            metrics = Metrics(stand_in)
            await metrics.refresh()
            models.update_one({"_id": "mine"}, {"$set": {"progress.step": 30,
                                                         "progress.updated_at": start + dt.timedelta(seconds=10)}})
            await metrics.refresh()
            return {(s.name, tuple(s.labels.items())): s.value
                    for family in metrics.registry.collect() for s in family.samples}
        finally:
            await async_client.close()

    samples = asyncio.run(two_refreshes())
    assert samples[("mongotune_training_steps_per_second", (("model", "mine"),))] == 2.0
    assert not [key for key in samples if key[1] == (("model", "theirs"),)]
    assert samples[("mongotune_serving_queue_depth", (("model", "mine"),))] == 3
    assert samples[("mongotune_models", (("status", "running"),))] == 2
    assert {labels for name, labels in samples if name == "mongotune_models"} == {
        (("status", status),) for status in ("pending", "running", "succeeded", "failed", "cancelled")}
