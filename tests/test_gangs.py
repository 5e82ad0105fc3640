"""Gangs in the fast tier: daemons driven in this process form one job's nodes through the real server, training
stood in for (real nodes, ranks and kills: tests/test_nodes.py)."""

import asyncio
import contextlib
import datetime as dt
import socket

import pytest
from click.testing import CliRunner

from listener import gangs, jobs
from listener.cli.main import cli
from listener.records import ModelState, parse
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


@contextlib.asynccontextmanager
async def live(server_uri, db, tmp_path, stand_in, *names: str, **options):
    """Daemons `names` driven in this process, each with its heartbeat written: alive to the others."""
    async with contextlib.AsyncExitStack() as stack:
        daemons = [await stack.enter_async_context(daemon(server_uri, db.name, tmp_path, stand_in, name, **options))
                   for name in names]
        for d in daemons:
            await d._heartbeat(started=True)
        yield daemons


def test_three_daemons_racing_for_a_two_node_job_form_one_gang_of_two(server_uri, db, tmp_path):
    db[defaults.MODELS].insert_one(model("m", PATH, trainer={"num_nodes": 2}))
    stand_in = NodeStandIn()

    async def body():
        async with live(server_uri, db, tmp_path, stand_in, "a", "b", "c") as (a, b, c):
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
    assert zero.rendezvous == one.rendezvous != "", "both agents carry the run's rendezvous id"
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
    failed = failed_naming(db, "m", "nodes")
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


WRITER_ADDR, WRITER_PORT = "10.66.66.66", 4444  # an endpoint the writer listens at


class AnyStandIn(NodeStandIn):
    """Stands in for one node of a gang and for a job of one node alike."""

    async def __call__(self, db, settings, model_id, run: int, owner: str, forks=None, devices=None, node=None):
        if node is None:
            return await StandIn.__call__(self, db, settings, model_id, run, owner, forks, devices)
        return await super().__call__(db, settings, model_id, run, owner, forks, devices, node)


def nodes_of(db, doc_id) -> list:
    return (read(db, doc_id) or {}).get("nodes") or []


def failed_naming(db, doc_id, field: str) -> dict:
    """The document, once it is `failed` with an error naming `field`."""
    failed = read(db, doc_id)
    assert failed["status"] == "failed" and failed["error"]["field"] == field, failed.get("error")
    return failed


def test_an_exit_written_on_node_0s_entry_does_not_let_the_writer_move_the_rendezvous(server_uri, db, tmp_path):
    """Another user's 3-node job is forming on daemons a and b. The writer sets `exit` on node 0's (genuine) entry and
    points its `addr`/`port` at its own host: `gangs.judge` skips any entry with `exit`, so the rewritten endpoint is
    never checked against node 0's `_listener` record, and once c joins, every node is started with the writer's
    endpoint (torchrun's static rendezvous: every agent connects to it; a DPO run with precompute_ref_log_probs then
    unpickles what "rank 0" broadcasts). It should fail the job naming `nodes`, and no node should start."""
    db[defaults.MODELS].insert_one(model("m", PATH, trainer={"num_nodes": 3}))
    stand_in = NodeStandIn()

    async def body():
        async with live(server_uri, db, tmp_path, stand_in, "a", "b", "c") as (a, b, c):
            await a.consider_model(read(db, "m"))
            await until(lambda: len(nodes_of(db, "m")) == 1)
            await b.consider_model(read(db, "m"))
            await until(lambda: len(nodes_of(db, "m")) == 2)
            db[defaults.MODELS].update_one({"_id": "m"}, {"$set": {
                "nodes.0.exit": 0, "nodes.0.addr": WRITER_ADDR, "nodes.0.port": WRITER_PORT}})
            await c.consider_model(read(db, "m"))
            await until(lambda: len(stand_in.nodes) == 3 or not any(d.trainings for d in (a, b, c)))
            stand_in.finish.set()
            await until(lambda: not any(d.trainings for d in (a, b, c)))

    asyncio.run(body())
    endpoints = [(name, node.addr, node.port) for name, node in stand_in.nodes]
    assert endpoints == [], f"nodes started with the writer's rendezvous: {endpoints}"
    failed_naming(db, "m", "nodes")


def test_an_entry_with_an_exit_no_daemon_vouches_for_does_not_count_as_a_node(server_uri, db, tmp_path):
    """A 2-node job with one live daemon. Once a joins as node 0, the writer appends a made-up entry carrying `exit`:
    `judge` skips it unchecked, so it counts as node 1 and a claims and starts the job as 1 of 2 nodes on a gang
    that has one daemon (its agent then waits at the rendezvous for a node 1 the writer may supply). It should fail
    naming `nodes` and nothing should start."""
    db[defaults.MODELS].insert_one(model("m", PATH, trainer={"num_nodes": 2}))
    stand_in = NodeStandIn()

    async def body():
        async with daemon(server_uri, db.name, tmp_path, stand_in, "a") as a:
            await a._heartbeat(started=True)
            await a.consider_model(read(db, "m"))
            await until(lambda: a.gpus.waiting.get(ids.key("m")) == "1 of 2 nodes")
            at = now()
            ghost = {"owner": "nobody:1:abcdef", "name": "ghost", "host": "writer", "devices": ["cpu"],
                     "joined_at": at, "expires_at": at + dt.timedelta(hours=1), "exit": 0}
            db[defaults.MODELS].update_one({"_id": "m", "nodes.1": {"$exists": False}}, {"$push": {"nodes": ghost}})
            await until(lambda: bool(stand_in.nodes) or not a.trainings)
            stand_in.finish.set()
            await until(lambda: not a.trainings)

    asyncio.run(body())
    started = [(name, node.rank, node.count) for name, node in stand_in.nodes]
    assert started == [], f"a gang with one daemon started as a job of two nodes: {started}"
    failed_naming(db, "m", "nodes")


def test_a_joined_at_moved_into_the_future_does_not_hold_a_daemons_slot_forever(server_uri, db, tmp_path):
    """A 2-node job and one live daemon, gang deadline 2 s: left alone it fails `not_enough_nodes` at the deadline
    (test_gangs). The writer moves node 0's `joined_at` a day ahead: `overdue` reads the deadline from that field, so
    the gang is never given back and the daemon's job slot stays taken while the job stays `pending` for ever (with
    `num_nodes` at the cap and one such job per daemon, every daemon serves nobody). The deadline should come from
    what the daemons know, and the job should end as it does untouched."""
    db[defaults.MODELS].insert_one(model("m", PATH, trainer={"num_nodes": 2}))
    stand_in = NodeStandIn()
    held = []

    async def body():
        async with daemon(server_uri, db.name, tmp_path, stand_in, "a", gang_wait_s=2,
                          heartbeat_s=30) as a:  # alive throughout: no periodic heartbeat here
            await a._heartbeat(started=True)
            await a.consider_model(read(db, "m"))
            await until(lambda: a.gpus.waiting.get(ids.key("m")) == "1 of 2 nodes")
            db[defaults.MODELS].update_one({"_id": "m"}, {"$set": {"nodes.0.joined_at": now() + dt.timedelta(days=1)}})
            try:
                await until(lambda: not a.trainings, timeout_s=20)  # ten deadlines
            except TimeoutError:
                held.append(a.gpus.waiting.get(ids.key("m")))

    asyncio.run(body())
    assert held == [], f"the daemon's slot is still held by a gang past ten deadlines (waiting: {held})"
    failed_naming(db, "m", "trainer.num_nodes")


def test_an_exit_written_on_a_lost_members_entry_does_not_turn_its_loss_into_the_runs_failure(server_uri, db, tmp_path):
    """Another user's 2-node job runs on a (node 0) and b; b's daemon dies (its heartbeat gone). Node 0's ranks fail on
    the broken collective and `jobs._node_lost` asks `gangs.lost_peers` whether a member was lost, to hand the run
    back `pending` (resumed from its checkpoint) rather than fail it. The writer has set `exit` on b's entry:
    `lost_peers` and `judge` skip entries with `exit`, so b is not found lost and the run fails as if node 0 failed on
    its own. An `exit` only b's daemon wrote should count."""
    stand_in = NodeStandIn()

    async def body():
        async with daemon(server_uri, db.name, tmp_path, stand_in, "a") as a:
            await a._heartbeat(started=True)
            key, at = ids.key("m"), now()
            b_owner = "b:2:000000"  # a daemon that joined and is no longer alive: no heartbeat record
            a_entry = gangs.entry(a.owner, "a", None, 60, (WRITER_ADDR, 29400))
            b_entry = {**gangs.entry(b_owner, "b", None, 60), "expires_at": at + dt.timedelta(minutes=1)}
            listener = a.books[defaults.LISTENER]
            await listener.insert_one({"_id": gangs.record_id(a.owner, key), "kind": "node", "owner": a.owner,
                                       "model": key, "rank": 0, "addr": WRITER_ADDR, "port": 29400, "at": at})
            db[defaults.MODELS].insert_one({**model("m", PATH, trainer={"num_nodes": 2}), "status": "running",
                                            "run": 1, "nodes": [a_entry, {**b_entry, "exit": 0}]})
            return await gangs.lost_peers(a.books[defaults.MODELS], listener, "m", key, wait_s=0)

    lost = asyncio.run(body())
    assert lost == [1], f"b's daemon is gone, yet node 0 finds no member lost ({lost}): the run would fail"


def test_a_nodes_array_that_is_not_a_list_fails_the_job_naming_it(server_uri, db, tmp_path):
    """A writer sets `nodes` to a string on a pending 2-node job. `gangs._join` reads it before `form`'s `try`, so
    BadRecord escapes the slot's task (an unretrieved task exception) and the job stays `pending` for ever, each scan
    of each daemon trying again; it should fail naming `nodes`, as `form`'s comment promises."""
    db[defaults.MODELS].insert_one({**model("m", PATH, trainer={"num_nodes": 2}), "nodes": "not a list"})
    stand_in = NodeStandIn()

    async def body():
        async with daemon(server_uri, db.name, tmp_path, stand_in, "a") as a:
            await a._heartbeat(started=True)
            await a.consider_model(read(db, "m"))
            await until(lambda: not a.trainings)
            await a.consider_model(read(db, "m"))  # "the next consideration fails the document, naming it"
            await until(lambda: not a.trainings)

    asyncio.run(body())
    failed = read(db, "m")
    assert failed.get("status") == "failed" and failed["error"]["field"] == "nodes", \
        (failed.get("status"), failed.get("error"), failed.get("nodes"))


def test_a_full_gang_no_daemon_will_claim_does_not_spin_an_idle_daemon(server_uri, db, tmp_path):
    """A writer's own 2-node job, `nodes` holding two made-up entries that carry `exit` (which `judge` skips): the gang
    is full, so a daemon with a free slot finds no place (`_join` returns None), and `_in_slot` then rescans every
    pending model at once, which considers this one again: a loop with no wait, every idle daemon scanning the whole
    collection flat out for as long as the document stays pending (node 0 never exists to claim it). The job should
    fail naming `nodes` (or at least be left alone until the next scan)."""
    at = now()
    ghosts = [{"owner": f"nobody:{i}:abcdef", "name": "ghost", "host": "writer", "devices": ["cpu"], "joined_at": at,
               "expires_at": at + dt.timedelta(hours=1), "exit": 0, "addr": WRITER_ADDR, "port": WRITER_PORT}
              for i in range(2)]
    db[defaults.MODELS].insert_one({**model("m", PATH, trainer={"num_nodes": 2}), "nodes": ghosts})
    stand_in = NodeStandIn()
    scans = []

    async def body():
        async with daemon(server_uri, db.name, tmp_path, stand_in, "a", heartbeat_s=30) as a:
            await a._heartbeat(started=True)
            scan = a._scan_models

            async def counted():  # a spy on the daemon's own rescan, nothing stood in for
                scans.append(1)
                await scan()

            a._scan_models = counted
            await a.consider_model(read(db, "m"))
            try:
                await until(lambda: read(db, "m").get("status") == "failed" or len(scans) > 200, timeout_s=10)
            finally:
                a.stop_event.set()  # ends the loop, whichever way it went
                await until(lambda: not a.trainings)

    asyncio.run(body())
    assert len(scans) <= 10, f"an idle daemon rescanned {len(scans)} times on its own for one pending document"
    failed = read(db, "m")
    assert failed.get("status") == "failed" and failed["error"]["field"] == "nodes", failed.get("status")


def test_a_run_changed_under_a_forming_gang_does_not_hold_its_daemons_for_ever(server_uri, db, tmp_path):
    """A 2-node job; a joins as node 0, then the writer sets `run: 7`, and b (reading run 7) joins as node 1. Node 0's
    claim is matched on the run a read when it considered the job, so it never matches; the gang is full, so its
    deadline (`_keep` checks it only while short) never comes: both daemons' job slots stay taken for ever and the job
    stays pending. No `exit` needed. The gang should be given back at its deadline (or the job start or fail)."""
    db[defaults.MODELS].insert_one(model("m", PATH, trainer={"num_nodes": 2}))
    stand_in = NodeStandIn()
    held = []

    async def body():
        async with live(server_uri, db, tmp_path, stand_in, "a", "b", gang_wait_s=2, heartbeat_s=30) as (a, b):
            await a.consider_model(read(db, "m"))
            await until(lambda: a.gpus.waiting.get(ids.key("m")) == "1 of 2 nodes")
            db[defaults.MODELS].update_one({"_id": "m"}, {"$set": {"run": 7}})
            await b.consider_model(read(db, "m"))
            try:
                await until(lambda: bool(stand_in.nodes) or not (a.trainings or b.trainings), timeout_s=20)
            except TimeoutError:
                held.append((dict(a.gpus.waiting), dict(b.gpus.waiting)))
            stand_in.finish.set()

    asyncio.run(body())
    assert held == [], f"two daemons' slots held past ten deadlines by a gang that can never claim: {held}"


def test_a_gang_no_two_live_daemons_can_host_does_not_starve_another_users_job(server_uri, db, tmp_path):
    """Daemon a has 2 GPUs, daemon b none (both live). A writer's 2-node job asks 2 GPUs per node: b can never host a
    node (it waits, `gpus.reserve`), so the gang never completes; at its deadline `_keep` counts live daemons (2, not
    the 1 that can host it), dissolves instead of failing, and `_in_slot`'s rescan, reading pending jobs in order,
    joins the writer's gang again before anything else. Another user's 2-GPU job, which only a can run, then waits for
    ever. The job no two daemons can host should fail at its deadline (as `not_enough_nodes`), and the other run."""
    db[defaults.MODELS].insert_one(model("writer", PATH, trainer={"num_nodes": 2, "num_gpus": 2}))
    db[defaults.MODELS].insert_one(model("victim", PATH, trainer={"num_gpus": 2}))
    stand_in = AnyStandIn()

    async def body():
        async with daemon(server_uri, db.name, tmp_path, stand_in, "a", gpus=(0, 1), gang_wait_s=1,
                          heartbeat_s=30) as a, \
                daemon(server_uri, db.name, tmp_path, stand_in, "b", gpus=(), gang_wait_s=1, heartbeat_s=30) as b:
            for d in (a, b):
                await d._heartbeat(started=True)
            await a._scan_models()
            await b._scan_models()
            with contextlib.suppress(TimeoutError):
                await until(lambda: bool(stand_in.runs), timeout_s=15)  # fifteen deadlines
            stand_in.finish.set()
            a.stop_event.set()
            b.stop_event.set()
            await until(lambda: not (a.trainings or b.trainings))

    asyncio.run(body())
    assert [model_id for model_id, _, _ in stand_in.runs] == ["victim"], \
        f"another user's job never ran; the writer's gang is {read(db, 'writer').get('status', 'pending')}"
    assert read(db, "writer")["status"] == "failed"


def test_a_third_daemon_beside_a_gang_that_cannot_claim_does_not_spin(server_uri, db, tmp_path):
    """The same loop with no `exit` anywhere: a and b form a 2-node gang, the writer having set `run: 7` between their
    joins, so node 0 never claims (see the run test). Daemon c, with a free slot, finds the gang full, gives its slot
    back and rescans at once, which considers the job again: c scans flat out while the gang stands."""
    db[defaults.MODELS].insert_one(model("m", PATH, trainer={"num_nodes": 2}))
    stand_in = NodeStandIn()
    scans = []

    async def body():
        async with live(server_uri, db, tmp_path, stand_in, "a", "b", "c", heartbeat_s=30) as (a, b, c):
            await a.consider_model(read(db, "m"))
            await until(lambda: a.gpus.waiting.get(ids.key("m")) == "1 of 2 nodes")
            db[defaults.MODELS].update_one({"_id": "m"}, {"$set": {"run": 7}})
            await b.consider_model(read(db, "m"))
            await until(lambda: b.gpus.waiting.get(ids.key("m")) == "2 of 2 nodes")
            scan = c._scan_models

            async def counted():  # a spy on c's own rescan, nothing stood in for
                scans.append(1)
                await scan()

            c._scan_models = counted
            await c.consider_model(read(db, "m"))
            with contextlib.suppress(TimeoutError):
                await until(lambda: len(scans) > 200, timeout_s=5)
            for d in (a, b, c):
                d.stop_event.set()
            stand_in.finish.set()

    asyncio.run(body())
    assert len(scans) <= 10, f"an idle daemon rescanned {len(scans)} times on its own beside a gang that cannot claim"


def test_listener_start_refuses_an_advertised_address_this_host_cannot_listen_at(tmp_path):
    """Every rendezvous such a daemon hosted would fail on each port in turn: it says so once, at start."""
    started = CliRunner().invoke(cli, ["start", "--advertise-addr", "192.0.2.1"],  # TEST-NET-1: no host's own
                                 env={"MONGOTUNE_HOME": str(tmp_path)})
    assert started.exit_code != 0
    assert started.output.strip().splitlines() == [
        "Error: --advertise-addr 192.0.2.1: this host cannot listen there (Cannot assign requested address); give "
        "the address of one of its own interfaces that the other hosts reach"]


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


@pytest.mark.parametrize("count", [1, 2, 3])
def test_gangs_given_back_at_their_deadline_let_the_daemon_run_another_job_first(server_uri, db, tmp_path, count):
    """Two daemons can host each 2-node job, but b is busy, so each gang is given back at its deadline. Daemon a, its
    slot free again, takes the next job of one node before any gang again, however many gangs precede that job:
    else, reading pending jobs in order, it would join a gang first every time (with a rest per gang, the next gang
    each deadline) and another user's job would wait as long as b stays busy."""
    db[defaults.MODELS].insert_one(model("busy", PATH))
    stand_in = AnyStandIn()
    gang_ids = [f"g{i}" for i in range(count)]

    async def body():
        async with live(server_uri, db, tmp_path, stand_in, "a", "b", gang_wait_s=1, heartbeat_s=30) as (a, b):
            await b.consider_model(read(db, "busy"))
            await until(lambda: [m for m, _, _ in stand_in.runs] == ["busy"])
            db[defaults.MODELS].insert_many([*(model(g, PATH, trainer={"num_nodes": 2}) for g in gang_ids),
                                             model("other", PATH)])
            await a._scan_models()
            await until(lambda: a.gpus.waiting.get(ids.key("g0")) == "1 of 2 nodes")
            with contextlib.suppress(TimeoutError):
                await until(lambda: len(stand_in.runs) == 2, timeout_s=15)  # fifteen gang deadlines
            stand_in.finish.set()
            for d in (a, b):
                d.stop_event.set()
            await until(lambda: not (a.trainings or b.trainings))

    asyncio.run(body())
    assert [m for m, _, _ in stand_in.runs] == ["busy", "other"], \
        f"another user's job never ran in fifteen gang deadlines: {stand_in.runs}"
    for g in gang_ids:
        assert read(db, g).get("status", "pending") == "pending" and "nodes" not in read(db, g)


def a_free_port() -> int:
    """A port for a one-port range that no other test's gang holds now: the suite's workers share this host."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def after_node_0_polls(db, doc_id) -> None:
    """Return just after node 0 renewed its entry and before node 1 next does, as a writer reading its own document
    can tell (each member's renewal moves its entry's `expires_at`)."""
    def expiries():
        return [e["expires_at"] for e in read(db, doc_id)["nodes"]]

    for _ in range(20):
        before = expiries()
        await until(lambda: expiries()[0] != before[0])
        if expiries()[1] == before[1]:
            return
    # Both polled together each time (a loaded host batches their wake-ups): the writer writes now, and node 1 reads
    # the forgery first about half the time. The callers' gangs outlast these 20 polls (`gang_wait_s` 120).


async def forge_a_running_lease(db, a, b) -> None:
    """The writer's 2-node job "m": a joins as node 0, the writer sets `run: 7` (node 0's claim, matched on the run it
    read, now never matches), b joins as node 1; then, just after a's poll, the writer sets `status: "running"` and
    `lease.owner` to a's owner, a day ahead."""
    key = ids.key("m")
    await a.consider_model(read(db, "m"))
    await until(lambda: a.gpus.waiting.get(key) == "1 of 2 nodes")
    db[defaults.MODELS].update_one({"_id": "m"}, {"$set": {"run": 7}})
    await b.consider_model(read(db, "m"))
    await until(lambda: b.gpus.waiting.get(key) == "2 of 2 nodes")
    await after_node_0_polls(db, "m")
    db[defaults.MODELS].update_one({"_id": "m"}, {"$set": {
        "status": "running", "lease": {"owner": a.owner, "expires_at": now() + dt.timedelta(days=1)}}})


def test_forgery_a_member_starts_its_node_on_a_lease_node_0_never_wrote(server_uri, db, tmp_path):
    """A member starts its node only once node 0 claimed the job, never on a `status`/`lease` a writer typed
    (`forge_a_running_lease`). Had b started on that lease, its slot would be held by a run nobody
    claimed and its agent would dial a port a gives back and may hand to its next gang: b waits for a's own record of
    its claim (`gangs.record_claim`), which never comes."""
    db[defaults.MODELS].insert_one(model("m", PATH, trainer={"num_nodes": 2}))
    stand_in = NodeStandIn()

    async def body():
        async with live(server_uri, db, tmp_path, stand_in, "a", "b", gang_wait_s=120, heartbeat_s=30) as (a, b):
            await forge_a_running_lease(db, a, b)
            with contextlib.suppress(TimeoutError):
                await until(lambda: bool(stand_in.nodes) or not (a.trainings or b.trainings))
            stand_in.finish.set()
            for d in (a, b):
                d.stop_event.set()
            await until(lambda: not (a.trainings or b.trainings))

    asyncio.run(body())
    started = [(name, node.rank, node.lease_owner) for name, node in stand_in.nodes]
    assert started == [], f"a node started on a lease the writer wrote, node 0 never claiming: {started}"


class JobStandIn(NodeStandIn):
    """Also records which job each node belongs to."""

    def __init__(self):
        super().__init__()
        self.jobs: list = []

    async def __call__(self, db, settings, model_id, run: int, owner: str, forks=None, devices=None, node=None):
        self.jobs.append((model_id, settings.name, node.rank, node.addr, node.port))
        return await super().__call__(db, settings, model_id, run, owner, forks, devices, node)


def test_forgery_a_stray_node_dials_the_rendezvous_node_0_then_hosts_for_another_users_job(server_uri, db, tmp_path):
    """Another user's gang is the only one whose agents are told to meet at its rendezvous.

    As in the lease test, the writer types a running lease for its job so that b might start node 1 on it while a
    gives its place and its port back. a's host has one rendezvous port (any range is reused the same way, by chance).
    Another user's 2-node job then forms on d (node 0, on a's host: that same port; a itself rests from gangs once it
    gave one back) and c: no node of the writer's job
    may be dialling that endpoint as one of its ranks (and a stray agent would carry another run's rendezvous id)."""
    db[defaults.MODELS].insert_one(model("m", PATH, trainer={"num_nodes": 2}))
    stand_in = JobStandIn()

    async def body():
        port = a_free_port()
        async with live(server_uri, db, tmp_path, stand_in, "a", "b", "c", "d", gang_wait_s=120, heartbeat_s=30,
                        rendezvous_ports=(port, port)) as (a, b, c, d):
            await forge_a_running_lease(db, a, b)
            await until(lambda: not a.trainings)  # a gave its place and port back; a stray b is caught below
            db[defaults.MODELS].insert_one(model("victim", PATH, trainer={"num_nodes": 2}))
            await d.consider_model(read(db, "victim"))
            await until(lambda: d.gpus.waiting.get(ids.key("victim")) == "1 of 2 nodes")
            await c.consider_model(read(db, "victim"))
            await until(lambda: sum(job == "victim" for job, *_ in stand_in.jobs) == 2)  # the victim's gang started
            stand_in.finish.set()
            for one in (a, b, c, d):
                one.stop_event.set()
            await until(lambda: not any(one.trainings for one in (a, b, c, d)))

    asyncio.run(body())
    victims = {(addr, port) for job, _, _, addr, port in stand_in.jobs if job == "victim"}
    assert victims, stand_in.jobs
    strays = [(job, name, rank, addr, port) for job, name, rank, addr, port in stand_in.jobs
              if job != "victim" and (addr, port) in victims]
    assert strays == [], f"another job's node was started at the other user's rendezvous: {stand_in.jobs}"


def test_rendezvous_two_pending_gangs_on_one_host_are_given_one_port(server_uri, db, tmp_path):
    """Two jobs' gangs are never given the same rendezvous endpoint, whoever inserted them.

    Daemons a and b share a host (one address, its operator's one range: here one port, so what a range of 100
    gives by chance happens every time; a writer inserting many 2-node jobs makes it likely with any range). Node 0
    listens only when its gang starts, up to `gang_wait_s` after its pick, so it holds the port bound meanwhile
    (`gangs.reserve_port`): b, node 0 of another user's job while a forms the writer's, finds none free and leaves
    that job to another listener, rather than both jobs' nodes 1 being told to meet at that one port."""
    db[defaults.MODELS].insert_many([model("w", PATH, trainer={"num_nodes": 2}),
                                     model("victim", PATH, trainer={"num_nodes": 2})])
    stand_in = JobStandIn()

    async def body():
        port = a_free_port()
        async with live(server_uri, db, tmp_path, stand_in, "a", "b", "c", "d", heartbeat_s=30,
                        rendezvous_ports=(port, port)) as (a, b, c, d):
            await a.consider_model(read(db, "w"))
            await until(lambda: a.gpus.waiting.get(ids.key("w")) == "1 of 2 nodes")
            await b.consider_model(read(db, "victim"))
            await until(lambda: not b.trainings)  # a holds the one port: b has none to offer
            assert "nodes" not in read(db, "victim")
            await c.consider_model(read(db, "w"))
            await d.consider_model(read(db, "victim"))
            # w forms on a and c; d, the victim's node 0 now, finds the host's one port held and leaves that job too.
            await until(lambda: sum(job == "w" for job, *_ in stand_in.jobs) == 2 and not d.trainings)
            stand_in.finish.set()
            for one in (a, b, c, d):
                one.stop_event.set()
            await until(lambda: not any(one.trainings for one in (a, b, c, d)))

    asyncio.run(body())
    endpoints = {}
    for job, _, _, addr, port in stand_in.jobs:
        endpoints.setdefault((addr, port), set()).add(job)
    shared = {endpoint: jobs for endpoint, jobs in endpoints.items() if len(jobs) > 1}
    assert shared == {}, f"two jobs' nodes were given one rendezvous endpoint: {stand_in.jobs}"


def test_race_a_gang_that_grew_as_node_0_gave_it_back_fails_the_users_untouched_job(server_uri, db, tmp_path):
    """A gang given back at its deadline is given back whole, and never ends a job nobody wrote to `failed`.

    A 3-node job and three live daemons. a is node 0; its deadline passes as c joins, between a's read of the gang
    (one entry) and its `dissolve`. Matched on that length, it would match nothing, a would forget its node record
    with its entry 0 still in `nodes`, and c's next poll, finding entry 0 vouched for by nobody, would fail the job
    `invalid_document` naming `nodes`, though no one but the daemons wrote it. Matched on node 0's owner, c's entry
    goes with the gang. Driven step by step here (gangs' own functions, the real server): the daemons' polls hit
    this interleaving only by chance, a join landing in the milliseconds between node 0's read and its write."""
    db[defaults.MODELS].insert_one(model("m", PATH, trainer={"num_nodes": 3}))
    key = ids.key("m")

    async def body():
        async with live(server_uri, db, tmp_path, NodeStandIn(), "a", "b", "c", gang_wait_s=30,
                        heartbeat_s=30) as (a, _, c):
            models = a.books[defaults.MODELS]  # read as the daemons read (timezone-aware)
            state = parse(ModelState, await models.find_one({"_id": "m"}))

            def gang(d):
                return gangs.Gang(d.books[defaults.MODELS], d.books[defaults.LISTENER], d.settings, d.owner, state,
                                  key, 3, 0, None)

            assert await gangs.take_place(gang(a), a.ports) == 0
            as_a_read = await models.find_one({"_id": "m"})  # a's poll reads its gang: one entry
            assert await gangs.take_place(gang(c), c.ports) == 1  # c joins, within the deadline
            records = a.books[defaults.LISTENER]  # a's deadline passes: its record says it joined a minute ago
            record = await records.find_one({"_id": gangs.record_id(a.owner, key)})
            await records.update_one({"_id": record["_id"]}, {"$set": {"at": record["at"] - dt.timedelta(minutes=1)}})
            kept = await gangs._keep(gang(a), gangs.members(as_a_read), as_a_read)  # a's deadline: give it back
            assert kept is gangs.GivenBack.OVERDUE and "nodes" not in read(db, "m"), "given back whole"
            await gangs.leave(models, a.books[defaults.LISTENER], "m", a.owner, key)  # as a's `_gang` does
            now_read = await models.find_one({"_id": "m"})
            await gangs._keep(gang(c), gangs.members(now_read), now_read)  # c's next poll

    asyncio.run(body())
    document = read(db, "m")
    assert document.get("status", "pending") == "pending", (document.get("status"), document.get("error"))


def test_a_killed_daemons_node_record_is_forgotten_and_its_entry_given_back_not_failed(server_uri, db, tmp_path):
    """A daemon killed outright never forgets its node records (`forget_all` is its clean stop's): a live daemon's
    reaper drops them, and the pending gang its entry is left in is given back, never failed as forged (its
    heartbeat, expired, is still there: an entry naming a daemon that never wrote one is forged)."""
    key = ids.key("m")
    dead = "z:1:dead"
    first = gangs.entry(dead, "z", None, 60, ("127.0.0.1", 29400))
    gone = now() - dt.timedelta(minutes=5)
    db[defaults.LISTENER].insert_one({"_id": f"{defaults.DAEMON_RECORD}{dead}", "kind": "daemon", "owner": dead,
                                      "name": "z", "host": "h", "heartbeat_at": gone, "alive_until": gone})
    db[defaults.LISTENER].insert_one({"_id": gangs.record_id(dead, key), "kind": "node", "model": key, "rank": 0,
                                      "at": now(), **{k: first[k] for k in ("owner", "name", "host", "devices",
                                                                             "addr", "port")}})
    db[defaults.MODELS].insert_one({**model("m", PATH, trainer={"num_nodes": 2}), "nodes": [first]})
    paused, just = "y:1:paused", now() - dt.timedelta(seconds=1)  # within gang_wait_s: its gang's peers decide
    db[defaults.LISTENER].insert_many([
        {"_id": f"{defaults.DAEMON_RECORD}{paused}", "kind": "daemon", "owner": paused, "name": "y", "host": "h",
         "heartbeat_at": just, "alive_until": just},
        {"_id": gangs.record_id(paused, "other"), "kind": "node", "model": "other", "rank": 1, "owner": paused,
         "name": "y", "host": "h", "devices": ["cpu"], "at": just}])

    async def body():
        async with live(server_uri, db, tmp_path, NodeStandIn(), "a") as (a,):
            await a.reap_requests()
            assert [r["owner"] for r in db[defaults.LISTENER].find({"kind": "node"})] == [paused]
            await a.consider_model(read(db, "m"))
            await until(lambda: not a.trainings)

    asyncio.run(body())
    document = read(db, "m")
    assert document.get("status", "pending") == "pending" and "nodes" not in document, document.get("error")


def test_a_gang_its_writer_cancels_leaves_no_daemon_resting_from_other_users_gangs(server_uri, db, tmp_path):
    """Only a gang given back at its deadline makes a daemon rest from gangs: a writer who cancels its own forming
    gang (or makes an entry lost) whenever daemons have joined it would otherwise keep each of them off every other
    user's gang for `gang_wait_s`, again and again. Another user's 2-node job forms at once on the same daemons."""
    db[defaults.MODELS].insert_one(model("w", PATH, trainer={"num_nodes": 3}))
    stand_in = NodeStandIn()

    async def body():
        async with live(server_uri, db, tmp_path, stand_in, "a", "b", gang_wait_s=120, heartbeat_s=30) as (a, b):
            for d in (a, b):
                await d.consider_model(read(db, "w"))
            await until(lambda: a.gpus.waiting.get(ids.key("w")) == "2 of 3 nodes")
            db[defaults.MODELS].update_one({"_id": "w"}, {"$set": {"cancel": True}})
            await until(lambda: not (a.trainings or b.trainings))
            resting = [d.settings.name for d in (a, b) if d._rests()]
            db[defaults.MODELS].insert_one(model("theirs", PATH, trainer={"num_nodes": 2}))
            for d in (a, b):
                await d.consider_model(read(db, "theirs"))
            await until(lambda: len(stand_in.nodes) == 2)
            stand_in.finish.set()
            await until(lambda: not (a.trainings or b.trainings))
            return resting

    assert asyncio.run(body()) == [], "a daemon rests from gangs after a gang its writer cancelled"
    assert read(db, "theirs")["status"] == "succeeded"


def test_node_0_whose_record_of_its_claim_fails_gives_the_run_back_at_once(server_uri, db, tmp_path):
    """The server refuses node 0's record of its claim (here a validator on `_listener`; in life an election or an
    outage between the claim and the record): its members never start, and the run, claimed, is `pending` again at
    once (its lease is 10 minutes) instead of `running` with no node until its lease runs out. Read from the model's
    change stream: the daemons, refused each time, go on forming the gang again."""
    db.create_collection(defaults.LISTENER, validator={"$jsonSchema": {"properties": {"claimed": {"bsonType": "string"}}}})
    db[defaults.MODELS].insert_one(model("m", PATH, trainer={"num_nodes": 2}))
    stand_in = NodeStandIn()
    changes = db[defaults.MODELS].watch([{"$match": {"operationType": "update", "documentKey._id": "m"}}],
                                        max_await_time_ms=10)
    updates: list[dict] = []

    def given_back() -> bool:
        while (event := changes.try_next()) is not None:
            updates.append(event["updateDescription"])
        return any(update["updatedFields"].get("status") == "pending" for update in updates)

    async def body():
        async with live(server_uri, db, tmp_path, stand_in, "a", "b", lease_s=600) as (a, b):
            document = read(db, "m")
            await asyncio.gather(*(d.consider_model(document) for d in (a, b)))
            await until(given_back, timeout_s=30)
            for d in (a, b):
                d.stop_event.set()

    asyncio.run(body())
    changes.close()
    statuses = [(u["updatedFields"].get("status"), u["updatedFields"].get("run")) for u in updates
                if "status" in u["updatedFields"]]
    assert statuses[:2] == [("running", 1), ("pending", None)], statuses
    back = next(u for u in updates if u["updatedFields"].get("status") == "pending")
    assert {"lease", "nodes"} <= set(back["removedFields"]), back
    assert stand_in.nodes == [], "no node started without node 0's record of its claim"


def test_rendezvous_node_0s_agent_listens_at_the_port_its_daemon_still_holds():
    """Node 0 holds its port until its run ends (`gangs.reserve_port`): its agent's store listens there beside the
    hold, as torchrun's static rendezvous makes it, and another pick still finds the port taken, then and after."""
    from torch.distributed import TCPStore

    port = a_free_port()
    held = gangs.reserve_port("127.0.0.1", (port, port))
    try:
        store = TCPStore("127.0.0.1", port, 1, True, dt.timedelta(seconds=10), multi_tenant=True)
        store.set("k", "v")
        assert store.get("k") == b"v"
        assert gangs.reserve_port("127.0.0.1", (port, port)) is None
        del store
        assert gangs.reserve_port("127.0.0.1", (port, port)) is None
    finally:
        held.close()
