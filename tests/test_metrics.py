"""`--metrics-port` and `--log-format json`: what a Prometheus scrape and a log shipper see from a real daemon."""

import asyncio
import datetime as dt
import json
import os
import re
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from bson import ObjectId
from pymongo import AsyncMongoClient

from listener.cli.main import cli
from listener.embedded import free_port
from listener.metrics import Metrics, parse_gpu_memory
from listener.processes import wait_until
from tests.conftest import finished, wait_for
from tests.documents import insert_nested, nested_document
from training import defaults, ids


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
    records = log_records(daemon)
    assert any(r["message"].startswith("listening on") and r["level"] == "info" and r["logger"] and r["time"]
               for r in records)
    assert not [line for line in lines if re.match(r"\[\d\d:\d\d:\d\d\]", line)], "no Rich lines with json logs"


def refreshed(client, db, owner: str, queued: dict | None = None, meanwhile=None) -> list:
    """The samples of a daemon's metrics (`Metrics` over its database, with `owner`'s trainings and `queued` requests)
    after one refresh, or two with `meanwhile()` between them."""
    async def refreshes() -> list:
        async_client = AsyncMongoClient(client.address[0], client.address[1], directConnection=True)
        try:
            stand_in = SimpleNamespace(db=async_client[db.name], owner=owner, counters={}, trainings={},
                                       serving=SimpleNamespace(queues=SimpleNamespace(queued=lambda: queued or {})))
            metrics = Metrics(stand_in)
            await metrics.refresh()
            if meanwhile is not None:
                meanwhile()
                await metrics.refresh()
            return [sample for family in metrics.registry.collect() for sample in family.samples]
        finally:
            await async_client.close()

    return asyncio.run(refreshes())


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

    def meanwhile():
        models.update_one({"_id": "mine"}, {"$set": {"progress.step": 30,
                                                     "progress.updated_at": start + dt.timedelta(seconds=10)}})

    samples = {(s.name, tuple(s.labels.items())): s.value
               for s in refreshed(client, db, owner, {ids.key("mine"): 3}, meanwhile)}
    mine = (("model", ids.key("mine")),)  # the id as canonical extended JSON, as the queue keys it
    assert samples[("mongotune_training_steps_per_second", mine)] == 2.0
    assert not [key for key in samples if key[1] == (("model", ids.key("theirs")),)]
    assert samples[("mongotune_serving_queue_depth", mine)] == 3
    assert samples[("mongotune_models", (("status", "running"),))] == 2
    assert {labels for name, labels in samples if name == "mongotune_models"} == {
        (("status", status),) for status in ("pending", "running", "succeeded", "failed", "cancelled")}


STAND_IN = """#!/bin/sh
echo call >> "{folder}/calls"
case "$(cat "{folder}/mode")" in
  good) printf '0, 1024, 81559\\n1, 0, 81559\\n' ;;
  garbage) printf '0, [N/A], [N/A]\\n' ;;
  *) echo "Failed to initialize NVML: Driver/library version mismatch"; exit 18 ;;
esac
"""


def test_gpu_memory_comes_from_nvidia_smi_and_a_broken_one_is_left_out_with_one_warning(db, start_daemon, tmp_path):
    """A stand-in nvidia-smi first on the daemon's PATH: the CSV the real one prints, a failure, garbage."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "calls").write_text("")
    (folder / "nvidia-smi").write_text(STAND_IN.format(folder=folder))
    (folder / "nvidia-smi").chmod(0o755)
    port = free_port()
    (folder / "mode").write_text("good")
    daemon = start_daemon(env={"PATH": f"{folder}:{os.environ['PATH']}"},
                          args=("--metrics-port", str(port), "--set", "heartbeat_s=1", "--log-format", "json"))
    wait_until(lambda: scrape(port), 60, "the metrics endpoint")
    for mode in ("good", "exit", "good", "garbage"):
        (folder / "mode").write_text(mode)
        seen = len((folder / "calls").read_text().splitlines())
        wait_until(lambda: len((folder / "calls").read_text().splitlines()) >= seen + 3, 60, f"3 calls, {mode}")
        found = scrape(port)
        gpu = {labels: value for (name, labels), value in found.items() if name == "mongotune_gpu_memory_bytes"}
        assert found[("mongotune_daemon_trainings", ())] == 0, "the scrape answers whatever nvidia-smi does"
        assert gpu == ({(("device", "0"), ("kind", "used")): 1024 * 2**20, (("device", "1"), ("kind", "used")): 0,
                        (("device", "0"), ("kind", "total")): 81559 * 2**20,
                        (("device", "1"), ("kind", "total")): 81559 * 2**20} if mode == "good" else {}), mode
    warnings = [r["message"] for r in log_records(daemon) if r["level"] == "warning" and "GPU memory" in r["message"]]
    assert len(warnings) == 2, warnings  # one per failure, not one per refresh
    assert "(exit status 18: Failed to initialize NVML: Driver/library version mismatch)" in warnings[0]
    assert "(unexpected nvidia-smi line '0, [N/A], [N/A]')" in warnings[1]
    assert len([r for r in log_records(daemon) if "answers again" in r["message"]]) == 1


def log_records(daemon) -> list[dict]:
    """The daemon's `--log-format json` lines."""
    return [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]


@pytest.mark.parametrize("text", ["0, 1024", "0, 1024, 81559, 3", "0, -1, 81559", "0, 1.5, 81559", "x, 1, 2",
                                  "0, [N/A], 81559", "\n".join(["0, 1, 2"] * 65)])
def test_gpu_memory_refuses_what_nvidia_smi_does_not_print(text):
    with pytest.raises(ValueError):
        parse_gpu_memory(text)
    assert parse_gpu_memory("0, 1024, 81559\n 1,0,81559 \n") == [(0, 2**30, 81559 * 2**20), (1, 0, 81559 * 2**20)]
    assert parse_gpu_memory("") == []


def test_class7_two_models_whose_ids_print_alike_are_two_series_in_metrics(client, db):
    """`_step_rates` keys its state by `ids.key` (ObjectId("h") and "h" are two models) but labels each series
    `str(_id)`: two models a writer named ObjectId("h") and "h", training on one daemon, give two samples with
    the same labels, a scrape Prometheus rejects whole ("duplicate sample"): every metric of the daemon is lost
    while they train."""
    oid = ObjectId()
    owner = "metrics-21"
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    models = db[defaults.MODELS]
    models.insert_many([{"_id": doc_id, "status": "running", "lease": {"owner": owner},
                         "progress": {"step": 10, "updated_at": start}} for doc_id in (oid, str(oid))])

    later = {"$set": {"progress.step": 30, "progress.updated_at": start + dt.timedelta(seconds=10)}}
    samples = refreshed(client, db, owner, meanwhile=lambda: models.update_many({}, later))
    labels = [tuple(sorted(s.labels.items())) for s in samples if s.name == "mongotune_training_steps_per_second"]
    assert len(labels) == 2, labels
    assert len(set(labels)) == 2, f"two models, one series name and labels: {labels}"


def test_class5_a_status_nested_deeper_than_the_server_groups_never_stales_the_metrics(client, db):
    """One request whose `status` nests ~975 deep made the server fail the whole `$group` by status, so every
    daemon's documents-by-status gauges kept their old values while it existed: it is a status users made up, left
    out of the labels (`listener.status.BY_STATUS`, the grouping `listener status` uses too)."""
    insert_nested(db[defaults.REQUESTS], {"_id": 1, "model": "m", "input": "hi", "status": nested_document(975)})
    db[defaults.REQUESTS].insert_many([{"_id": 2, "model": "m", "input": "hi", "status": "done"},
                                       {"_id": 3, "model": "m", "input": "hi"}])

    samples = refreshed(client, db, "metrics-status")
    counts = {s.labels["status"]: s.value for s in samples if s.name == "mongotune_requests"}
    assert counts["done"] == 1 and counts["pending"] == 1, counts
