"""Gangs in the fast tier: daemons driven in this process form one job's nodes through the real server, training
stood in for (real nodes, ranks and kills: tests/test_nodes.py)."""

import asyncio
import datetime as dt

from click.testing import CliRunner

from listener import jobs
from listener.cli.main import cli
from listener.status import MODEL_TRANSITIONS, Status, now, transition
from tests.documents import model
from tests.test_claims import PATH, StandIn, daemon, read, until
from training import defaults, ids


class NodeStandIn(StandIn):
    """Records the node each daemon is given; node 0 ends the run as the real supervisor does (`jobs._end`)."""

    def __init__(self):
        super().__init__()
        self.nodes: list = []

    async def __call__(self, db, settings, model_id, run: int, owner: str, forks=None, devices=None, node=None):
        self.nodes.append((settings.name, node))
        await self.finish.wait()
        if node.rank == 0:
            await transition(db[defaults.MODELS], model_id, Status.RUNNING, Status.SUCCEEDED, MODEL_TRANSITIONS,
                             match={"lease.owner": owner}, unset=("lease", "nodes"))
        return Status.SUCCEEDED if node.rank == 0 else Status.RUNNING


def test_three_daemons_racing_for_a_two_node_job_form_one_gang_of_two(server_uri, db, tmp_path):
    db[defaults.MODELS].insert_one(model("m", PATH, trainer={"num_nodes": 2}))
    stand_in = NodeStandIn()

    async def body():
        async with daemon(server_uri, db.name, tmp_path, stand_in, "a") as a, \
                daemon(server_uri, db.name, tmp_path, stand_in, "b") as b, \
                daemon(server_uri, db.name, tmp_path, stand_in, "c") as c:
            for d in (a, b, c):
                await d._heartbeat(started=True)
            document = read(db, "m")
            await asyncio.gather(*(d.consider_model(document) for d in (a, b, c)))
            await until(lambda: len(stand_in.nodes) == 2)
            stand_in.finish.set()
            await until(lambda: not any(d.trainings for d in (a, b, c)))

    asyncio.run(body())
    nodes = sorted((node.rank, name, node) for name, node in stand_in.nodes)
    assert [rank for rank, _, _ in nodes] == [0, 1] and nodes[0][1] != nodes[1][1]
    zero, one = nodes[0][2], nodes[1][2]
    assert (zero.addr, zero.port) == (one.addr, one.port) == ("127.0.0.1", zero.port) and 29400 <= zero.port <= 29499
    assert zero.lease_owner == one.lease_owner and [m["rank"] for m in zero.members] == [0, 1]
    done = read(db, "m")
    assert done["status"] == "succeeded" and "nodes" not in done and done["run"] == 1
    assert db[defaults.LISTENER].count_documents({"kind": "node"}) == 0, "each daemon forgot its node record"


def test_an_entry_no_live_daemon_vouches_for_fails_the_job_and_nothing_starts(server_uri, db, tmp_path):
    stand_in = NodeStandIn()

    async def body():
        async with daemon(server_uri, db.name, tmp_path, stand_in, "a") as a:
            await a._heartbeat(started=True)
            at = now()
            forged = {"owner": a.owner, "name": "a", "host": "h", "devices": ["cpu"], "joined_at": at,
                      "expires_at": at + dt.timedelta(hours=1), "addr": "10.9.9.9", "port": 4444}
            db[defaults.MODELS].insert_one({**model("m", PATH, trainer={"num_nodes": 2}), "nodes": [forged]})
            await a.consider_model(read(db, "m"))
            await until(lambda: not a.trainings)

    asyncio.run(body())
    failed = read(db, "m")
    assert failed["status"] == "failed" and failed["error"]["field"] == "nodes", failed.get("error")
    assert "nodes" not in failed and stand_in.nodes == []


def test_a_gang_short_of_live_daemons_at_its_deadline_fails_naming_them(server_uri, db, tmp_path):
    db[defaults.MODELS].insert_one(model("m", PATH, trainer={"num_nodes": 2}))
    stand_in = NodeStandIn()

    async def body():
        async with daemon(server_uri, db.name, tmp_path, stand_in, "a", gang_wait_s=1) as a:
            await a._heartbeat(started=True)
            await a.consider_model(read(db, "m"))
            await until(lambda: a.gpus.waiting.get(ids.key("m")) == "1 of 2 nodes")
            await until(lambda: not a.trainings)

    asyncio.run(body())
    failed = read(db, "m")
    assert failed["status"] == "failed" and failed["error"]["field"] == "trainer.num_nodes"
    assert "asks for 2 nodes; 1 listener(s) are alive (a)" in failed["error"]["message"]
    assert "nodes" not in failed and stand_in.nodes == []


def test_a_node_lost_at_the_last_attempt_fails_the_run(server_uri, db, tmp_path):
    """Node 0 hands a run back when a member is lost (`jobs._node_lost`), clearing the peers' `error`; at the last
    attempt `requeue` writes its own `error` instead, and one update cannot set and clear it: the run must end
    `failed` naming its attempts, not stay `running`."""

    async def body():
        async with daemon(server_uri, db.name, tmp_path, NodeStandIn(), "a", max_attempts=1) as a:
            db[defaults.MODELS].insert_one({
                **model("m", PATH, trainer={"num_nodes": 2}), "status": "running", "run": 1, "attempts": 1,
                "lease": {"owner": a.owner, "expires_at": now() + dt.timedelta(minutes=1)},
                "error": {"type": "training_crashed", "message": "a peer's broken connection"}})
            return await jobs._node_lost(a.books, a.settings, "m", a.owner, [1])

    assert asyncio.run(body()) is Status.FAILED
    failed = read(db, "m")
    assert failed["status"] == "failed" and failed["error"]["type"] == "too_many_attempts", failed.get("error")
    assert [e["event"] for e in failed["history"]] == ["node lost"]


def test_listener_start_refuses_an_advertised_address_this_host_cannot_listen_at(tmp_path):
    """Every rendezvous such a daemon hosted would fail on each port in turn: it says so once, at start."""
    started = CliRunner().invoke(cli, ["start", "--advertise-addr", "192.0.2.1"],  # TEST-NET-1: no host's own
                                 env={"MONGOTUNE_HOME": str(tmp_path)})
    assert started.exit_code != 0
    assert started.output.strip().splitlines() == [
        "Error: --advertise-addr 192.0.2.1: this host cannot listen there (Cannot assign requested address); give "
        "the address of one of its own interfaces that the other hosts reach"]
