"""One job on several nodes (`trainer.num_nodes`): N daemons, each one torchrun node of it, agreeing through the database.

`_listener` is written by daemons alone, so it is what a daemon believes. The model document's `nodes` array is
the listener's, but a user can write it too, so each entry counts only while its own daemon vouches for it there.

- Join. A daemon with room (a free job slot and the GPUs asked for) first writes a `node` record under its own name
  in `_listener` (model, rank, and for node 0 the endpoint it will host: its operator's `advertise_addr` and a
  port of `rendezvous_ports` it holds bound until its run ends, `reserve_port`), then appends its entry `{owner,
  name, host, devices, joined_at, expires_at[, addr, port]}` to the pending document with one update matched on
  the run it read, no cancel, the array's length it read and its own absence: an entry's index is its node rank,
  and no rank is taken twice.
- Vouching. Every entry is checked against its daemon's record first, whatever else it says (one `$in` read per
  poll): in a pending gang an entry with no record of its rank (or node 0's naming another endpoint, or a port
  outside this operator's `rendezvous_ports`) is forged, and the job fails naming `nodes` before any rank connects
  anywhere, unless its daemon's heartbeat is there and expired: the reaper forgets a dead daemon's node records
  (`forget_dead`), and its entry is a lost member, as is a vouched entry whose daemon is no longer alive
  (`leases.live_owners`) or whose `expires_at` passed; in a running gang an unvouched one is lost too.
- Leases. Each member renews its entry's `expires_at` (`lease_s`) while it waits and while it trains.
- Start. Node 0, once N vouched entries are there, claims the job (`leases.claim_model`, matched on the array's
  length and on its own entry 0) and from then on owns `run`, `lease` and `status` as for one node; then it records
  in its own node record the run it claimed and a rendezvous id of its own making (where that write fails, it gives
  the run back `pending` at once, `_recorded`). Each other member starts its node when it sees the document running
  with its entry in place and node 0's record naming that run: never on the document's `status` or `lease`, which a
  writer can type. Every node's child runs torchrun's agent with
  `--nnodes N --node-rank i`, node 0's endpoint and that id (static rendezvous: node 0's agent hosts the store, and
  an agent of another id, a stray, never gets past the rendezvous; `training.ranks`).
- Deadline. A gang not started `gang_wait_s` after node 0's record was written (its daemon's clock, not the
  document's `joined_at`), short or whole, or with a lost member, is dissolved (`nodes` unset, matched on its
  node 0's owner alone, so a member that joined meanwhile goes with it) by whichever member sees it: each gives
  its slot back and may join again, so two gangs never each hold part of the daemons for ever. A gang at its
  deadline that fewer live daemons than its nodes could host (their heartbeats' GPUs) fails the job, naming them.
- One fate. Rank 0 (on node 0) alone writes progress, metrics and checkpoints; every rank of every node is fenced on
  the run and node 0's lease, and the others write only `error`. Cancel and SIGTERM reach every rank through the
  ranks' per-step all-reduce (`training.ranks`). A node whose daemon dies breaks its peers' collectives (the process
  group's timeout bounds a silent host); node 0 finds the member lost and hands the run back `pending`, an attempt
  counted as for an expired lease, to resume from its last checkpoint once N daemons join again. A member whose
  child ends on its own records its exit and run in its own node record (never the document's entry, which a user
  may write), so node 0 tells a failure from a loss. Every move out of `running` unsets `nodes`; a member whose
  entry is gone stops its node. A member leaving a gang, whatever the reason, gives back the pending gang its entry is
  still in, if any, and forgets its record after (`leave`), so no peer reads its entry unvouched and calls it
  forged.
"""

import asyncio
import contextlib
import datetime as dt
import enum
import logging
import random
import socket
import uuid
from dataclasses import dataclass, field

from pymongo.errors import PyMongoError

from listener.gpus import fits
from listener.leases import claim_model, give_back, live_owners
from listener.records import BadRecord, DaemonRecord, Member, ModelState, NodeRecord, parse
from listener.settings import Settings
from listener.status import MODEL_TRANSITIONS, Status, now, status_filter, transition
from training import defaults, ids

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often a member reads its gang while it waits


class GivenBack(enum.Enum):
    """How a gang that never started ended for this daemon, where that matters to it."""

    OVERDUE = "overdue"  # given back whole at its deadline: the daemon rests from gangs (`Daemon._rests`)


@dataclass(frozen=True)
class Node:
    """What one node's child is given by its daemon, from records their daemons wrote: its rank among `count`,
    node 0's endpoint and the run's rendezvous id, node 0's owner (whose lease fences every rank's writes) and, for
    the run's entry, every member."""

    rank: int
    count: int
    addr: str
    port: int
    rendezvous: str
    lease_owner: str
    members: list = field(default_factory=list)

    def launch(self) -> dict:
        return {"rank": self.rank, "count": self.count, "addr": self.addr, "port": self.port,
                "rendezvous": self.rendezvous, "members": self.members}


@dataclass(frozen=True)
class Gang:
    """One job of several nodes as this daemon takes part in it."""

    models: object
    listener: object
    settings: Settings
    owner: str
    state: ModelState
    key: str
    count: int  # trainer.num_nodes
    gpus: int  # trainer.num_gpus: what a daemon needs to host one node
    devices: tuple[int, ...] | None  # this daemon's, for its node


@dataclass(frozen=True)
class Verdict:
    """A gang as read, judged by what its daemons wrote (see "Vouching")."""

    lost: list[int]  # members whose daemon is gone or whose entry expired
    forged: int | None  # the first entry no daemon vouches for, in a pending gang
    exited: list[int]  # members whose daemon recorded its node's exit in this run
    live: dict[str, DaemonRecord]  # the live daemons, by owner (`leases.live_owners`)
    records: list[NodeRecord]  # the vouching records, by rank from the first judged

    def since(self) -> dt.datetime | None:
        """When the gang began, as node 0's daemon wrote it."""
        return self.records[0].at if self.records and self.records[0].rank == 0 else None


def members(document: dict) -> list[Member]:
    """The document's `nodes`, parsed with the rest of its listener-owned fields (BadRecord naming the field)."""
    return parse(ModelState, document).nodes or []


def record_id(owner: str, key: str) -> str:
    return f"{defaults.NODE_RECORD}{owner}:{key}"


async def judge(listener, key: str, entries: list[Member], since: int = 0, run: int | None = None,
                ports: tuple[int, int] | None = None) -> Verdict:
    """Each entry from rank `since`, vouched for first: see the module's "Vouching". `run`: the run of a running gang,
    whose unvouched entries count as lost and whose members' exits in that run count; None for a pending gang, whose
    first unvouched entry is forged. `ports`: this operator's rendezvous range, where node 0's port must lie (judging
    from rank 0). Node 0 of a running gang judges from rank 1: its own hold is the run's lease."""
    live, _ = await live_owners(listener)
    records, known = await _records(listener, key, entries[since:])
    lost, exited, vouching = [], [], []
    for rank, entry in enumerate(entries[since:], since):
        record = records.get(entry.owner)
        if not _vouches(record, rank, entry, ports, run):
            if run is None and (entry.owner in live or entry.owner not in known):
                return Verdict(lost, rank, exited, live, vouching)
            lost.append(rank)
            continue
        vouching.append(record)
        if record.exit is not None:
            exited.append(rank)
        elif entry.owner not in live or entry.expires_at < now():
            lost.append(rank)
    return Verdict(lost, None, exited, live, vouching)


async def _records(listener, key: str, entries: list[Member]) -> tuple[dict[str, NodeRecord], set[str]]:
    """The node records the entries' daemons wrote for this job, by owner (one of another shape vouches for nothing),
    and the owners of those entries that ever wrote a heartbeat, alive or not: a daemon killed outright leaves its
    heartbeat, and the reaper forgets its node records (`forget_dead`)."""
    owners = [e.owner for e in entries]
    wanted = [record_id(o, key) for o in owners] + [f"{defaults.DAEMON_RECORD}{o}" for o in owners]
    found, known = {}, set()
    async for document in listener.find({"_id": {"$in": wanted}}, {"counters": 0, "trainings": 0}):
        if document.get("kind") == "daemon":
            known.add(document.get("owner"))
        elif document.get("kind") == "node" and document.get("model") == key:
            with contextlib.suppress(BadRecord):
                record = parse(NodeRecord, document)
                found[record.owner] = record
    return found, known


def _vouches(record: NodeRecord | None, rank: int, entry: Member, ports: tuple[int, int] | None,
             run: int | None) -> bool:
    """Whether `record` vouches for `entry` at `rank`: node 0's for its endpoint too, which must lie in this
    operator's rendezvous range; an exit counts only in the run it was recorded in (a pending gang has none)."""
    if record is None or record.rank != rank or (record.exit is not None and (run is None or record.run != run)):
        return False
    return rank > 0 or (ports is not None and record.port is not None and ports[0] <= record.port <= ports[1]
                        and (record.addr, record.port) == (entry.addr, entry.port))


def check_advertised(addr: str) -> None:
    """At start, RuntimeError in one line where this host cannot listen at `addr`: every rendezvous it hosted would
    fail on each port in turn."""
    try:
        with socket.socket() as sock:
            sock.bind((addr, 0))
    except OSError as exc:
        raise RuntimeError(f"--advertise-addr {addr}: this host cannot listen there ({exc.strerror or exc}); give "
                           "the address of one of its own interfaces that the other hosts reach") from None


def reserve_port(addr: str, ports: tuple[int, int]) -> socket.socket | None:
    """A port of the operator's range at `addr`, bound and held (never listened on) from node 0's pick until its run
    ends (`release`), so no other gang of any daemon on this host is given it meanwhile, nor between the hold and its
    torchrun agent listening there. The agent's store (torch's TCPStore) binds with SO_REUSEADDR, which Linux lets
    bind beside a socket that has the option and does not listen: the held one takes it once bound, so another pick,
    binding without it, is still refused. Tried in random order."""
    for port in random.sample(range(ports[0], ports[1] + 1), ports[1] - ports[0] + 1):
        sock = socket.socket()
        try:
            sock.bind((addr, port))
        except OSError:
            sock.close()
            continue
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return sock
    return None


def release(ports: dict[str, socket.socket], key: str) -> None:
    """Let go of the port held for job `key`'s gang, if this daemon holds one."""
    sock = ports.pop(key, None)
    if sock is not None:
        sock.close()


def entry(owner: str, name: str, devices: tuple[int, ...] | None, lease_s: float, endpoint=None) -> dict:
    at = now()
    return {"owner": owner, "name": name, "host": socket.gethostname(), "devices": list(devices or ["cpu"]),
            "joined_at": at, "expires_at": at + dt.timedelta(seconds=lease_s),
            **({"addr": endpoint[0], "port": endpoint[1]} if endpoint else {})}


def _length(count: int) -> dict:
    """The array holds exactly `count` entries."""
    return {f"nodes.{count}": {"$exists": False}, **({f"nodes.{count - 1}": {"$exists": True}} if count else {})}


def as_read(entries: list[Member]) -> dict:
    """Matches the gang as read by its node 0's owner, not its length: a member that joined since is given back (or
    failed) with it, never left behind in `nodes` with nobody's gang around it."""
    return {"nodes.0.owner": {"$eq": entries[0].owner}}


async def join(models, listener, doc_id, key: str, run: int, rank: int, new: dict) -> bool:
    """Vouch for entry `new` at `rank` in `_listener`, then append it; whether this daemon is now that node."""
    record = {"kind": "node", "model": key, "rank": rank, "at": now(),
              **{k: new.get(k) for k in ("owner", "name", "host", "devices", "addr", "port")}}
    await listener.replace_one({"_id": record_id(new["owner"], key)}, record, upsert=True)
    done = await models.update_one(
        {"_id": ids.eq(doc_id), **status_filter(Status.PENDING), "run": run or {"$in": [None, 0]},
         "cancel": {"$ne": True}, "nodes.owner": {"$ne": new["owner"]}, **_length(rank)},
        {"$push": {"nodes": new}})
    if not done.modified_count:
        await forget(listener, new["owner"], key)
    return bool(done.modified_count)


async def forget(listener, owner: str, key: str) -> None:
    """Drop this daemon's node record, unless it records its node's exit: node 0 may still be judging by it (a
    later join replaces it, and a clean stop drops it: `forget_all`)."""
    await listener.delete_one({"_id": record_id(owner, key), "exit": None})


async def leave(models, listener, doc_id, owner: str, key: str) -> None:
    """This daemon's place in job `key`'s gang, given up: the pending gang its entry is still in given back whole,
    then its record forgotten, never before (see "One fate")."""
    await dissolve(models, doc_id, {"nodes.owner": {"$eq": owner}})
    await forget(listener, owner, key)


async def forget_all(listener, owner: str) -> None:
    await listener.delete_many({"kind": "node", "owner": {"$eq": owner}})


async def forget_dead(listener, grace_s: float) -> None:
    """Drop the node records of daemons killed outright (never `forget_all`): those this host sees are gone
    (`liveness.dead`), and those whose heartbeat ran out more than `grace_s` ago, by when their gangs' live members
    gave them back; a daemon only paused meanwhile finds its gang gone, not its entry unvouched. Their entries
    count as lost without them (`judge`)."""
    _, gone = await live_owners(listener)
    expired = {"kind": "daemon", "alive_until": {"$lt": now() - dt.timedelta(seconds=grace_s)}}
    gone |= {document["owner"] async for document in listener.find({**expired, "owner": {"$type": "string"}},
                                                                     {"owner": 1})}
    if gone:
        await listener.delete_many({"kind": "node", "owner": {"$in": sorted(gone)}})


async def renew(models, doc_id, rank: int, owner: str, lease_s: float, status: Status,
                projection: dict | None = None) -> dict | None:
    """Extend this member's entry; the document (`projection`), or None once the entry or that status is gone."""
    return await models.find_one_and_update(
        {"_id": ids.eq(doc_id), **status_filter(status), f"nodes.{rank}.owner": {"$eq": owner}},
        {"$set": {f"nodes.{rank}.expires_at": now() + dt.timedelta(seconds=lease_s)}},
        projection=projection or {"_id": 1, "status": 1, "run": 1, "nodes": 1, "cancel": 1})


async def dissolve(models, doc_id, match: dict) -> bool:
    """Give every node of a pending gang back (see "Deadline"), matched on the gang (`as_read`, or a member's own
    entry); whether this call did."""
    done = await models.update_one({"_id": ids.eq(doc_id), **status_filter(Status.PENDING), "nodes.0": {"$exists": True},
                                    **match}, {"$unset": {"nodes": ""}})
    return bool(done.modified_count)


async def fail(models, doc_id, entries: list[Member], error: dict) -> bool:
    """End a pending gang's job `failed` with `error`, matched on the gang as read."""
    return await transition(models, doc_id, Status.PENDING, Status.FAILED, MODEL_TRANSITIONS, match=as_read(entries),
                            fields={"error": error}, unset=("nodes",)) is not None


def forged(rank: int) -> dict:
    return {"type": "invalid_document", "field": "nodes",
            "message": f"nodes.{rank} is not vouched for by the listener it names (a rendezvous only a listener may "
                       "publish): this field is written by the listener; remove it, then set status to 'pending'"}


def too_few(count: int, gpus: int, hosts: list[DaemonRecord]) -> dict:
    names = ", ".join(sorted(r.name for r in hosts))
    return {"type": "not_enough_nodes", "field": "trainer.num_nodes",
            "message": f"asks for {count} nodes; {len(hosts)} listener(s) are alive ({names}) that can host a node of "
                       f"{gpus} GPU(s). Ask for fewer, or start a listener on more hosts, then set status to 'pending'"}


def hosts(verdict: Verdict, gpus: int) -> list[DaemonRecord]:
    """The live daemons with GPUs enough for one node (`gpus.fits`), busy or not."""
    return [r for r in verdict.live.values() if fits(len(r.gpus), gpus)]


def overdue(verdict: Verdict, wait_s: float) -> bool:
    since = verdict.since()
    return since is not None and now() - since > dt.timedelta(seconds=wait_s)


async def report_exit(listener, key: str, run: int, owner: str, code: int) -> None:
    """A member's node ended on its own: say so in its own record, so node 0 does not take it for lost."""
    await listener.update_one({"_id": record_id(owner, key)}, {"$set": {"exit": int(code), "run": run}})


async def lost_peers(models, listener, doc_id, key: str, wait_s: float) -> list[int]:
    """Node 0, its own node failed: the members lost, once each other member has either recorded its exit or is
    lost, waiting up to `wait_s` for that (a killed daemon counts as alive until its heartbeat runs out)."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        document = await models.find_one({"_id": ids.eq(doc_id)}, {"nodes": 1, "run": 1})
        try:
            state = parse(ModelState, document or {"_id": doc_id})
        except BadRecord:  # a user rewrote `nodes` as it ran: no member can be judged
            return []
        entries = state.nodes or []
        verdict = await judge(listener, key, entries, since=1, run=state.run)
        waiting = len(entries) - 1 - len(verdict.exited) - len(verdict.lost)
        if verdict.lost or waiting <= 0 or asyncio.get_running_loop().time() > deadline:
            return verdict.lost
        await asyncio.sleep(POLL_S)


def waiting_note(entries: list[Member], count: int) -> str:
    """What `listener status` shows for a gang this daemon waits in."""
    return f"{len(entries)} of {count} nodes"


async def record_claim(listener, owner: str, key: str, run: int) -> str:
    """Node 0, having claimed `run`: say so in its own record, which its members start on (see "Start"); the run's
    rendezvous id."""
    rendezvous = uuid.uuid4().hex
    await listener.update_one({"_id": record_id(owner, key)}, {"$set": {"claimed": run, "rendezvous": rendezvous}})
    return rendezvous


async def _recorded(gang: Gang, run: int) -> str:
    """Node 0's claim of `run`, recorded (`record_claim`); where that write fails, the run is given back `pending` at
    once, as a daemon that stops gives its work back (no attempt counted: the server's refusal is not the run's), else
    it would stay `running` with no node started until its lease ran out."""
    try:
        return await record_claim(gang.listener, gang.owner, gang.key, run)
    except PyMongoError:
        with contextlib.suppress(PyMongoError):
            await give_back(gang.models, MODEL_TRANSITIONS, gang.state.id, gang.owner)
        raise


def node_of(verdict: Verdict, rank: int, count: int, rendezvous: str) -> Node:
    """This daemon's node, from the records of a gang judged whole: the run's entry lists what the daemons wrote."""
    first = verdict.records[0]
    return Node(rank, count, first.addr or "", first.port or 0, rendezvous, first.owner,
                [{"rank": r.rank, "name": r.name, "host": r.host, "devices": r.devices} for r in verdict.records])


async def take_place(gang: Gang, ports: dict[str, socket.socket]) -> int | None:
    """This daemon's node rank in the gang forming, once its entry is in; None when there is no place or no port.
    Daemons joining at once each try the next place, so they end up in rank order. `ports`: the rendezvous ports
    this daemon holds for its gangs, by model key; node 0 adds its own, which the caller `release`s."""
    settings = gang.settings
    for _ in range(gang.count):
        document = await gang.models.find_one({"_id": ids.eq(gang.state.id), **status_filter(Status.PENDING)},
                                              {"nodes": 1, "cancel": 1})
        if document is None:
            return None
        entries = members(document)
        if not isinstance(await _keep(gang, entries, document), Verdict) or len(entries) >= gang.count or \
                any(e.owner == gang.owner for e in entries):
            return None
        endpoint = None
        if not entries:
            sock = reserve_port(settings.advertise_addr, settings.rendezvous_ports)
            if sock is None:
                log.warning("model %.200r: no free rendezvous port in %d-%d; leaving it to another listener",
                            gang.state.id, *settings.rendezvous_ports)
                return None
            ports[gang.key] = sock
            endpoint = (settings.advertise_addr, sock.getsockname()[1])
        new = entry(gang.owner, settings.name, gang.devices, settings.lease_s, endpoint)
        if await join(gang.models, gang.listener, gang.state.id, gang.key, gang.state.run, len(entries), new):
            log.info("model %.200r: joined as node %d of %d", gang.state.id, len(entries), gang.count)
            return len(entries)
        release(ports, gang.key)
    return None


async def form(gang: Gang, rank: int, warnings: list[str],
               waiting: dict[str, str]) -> tuple[Node, int] | GivenBack | None:
    """Wait as node `rank` for the others: (this node, the run) once it starts here, OVERDUE or None once this daemon's
    place is given back (at the deadline, or dissolved, failed, cancelled: `_keep`). `waiting` (the heartbeat's) says
    meanwhile how many nodes are there. The caller `leave`s once the gang ends: node 0 judges its members by their
    records as they train."""
    try:
        while True:
            document = await renew(gang.models, gang.state.id, rank, gang.owner, gang.settings.lease_s, Status.PENDING)
            if document is None:
                return await _started(gang, rank)
            entries = members(document)
            waiting[gang.key] = waiting_note(entries, gang.count)
            verdict = await _keep(gang, entries, document)
            if not isinstance(verdict, Verdict):
                return verdict
            if rank == 0 and len(entries) == gang.count:
                claimed = await claim_model(gang.models, gang.state, gang.owner, gang.settings.lease_s, warnings,
                                            match={"nodes.0.owner": {"$eq": gang.owner}, **_length(gang.count)})
                if claimed is not None:
                    rendezvous = await _recorded(gang, claimed["run"])
                    return node_of(verdict, 0, gang.count, rendezvous), claimed["run"]
            await asyncio.sleep(POLL_S)
    finally:
        waiting.pop(gang.key, None)


async def _keep(gang: Gang, entries: list[Member], document: dict) -> Verdict | GivenBack | None:
    """The gang as read judged, if it may go on forming; OVERDUE once it is given back at its deadline, None once it
    is dissolved otherwise (cancelled, a member lost) or its job failed here. Only OVERDUE makes a daemon rest: a
    cancel or a lost entry is the writer's to make, and would otherwise keep daemons off every other gang."""
    doc_id, settings = gang.state.id, gang.settings
    if document.get("cancel") is True:
        if entries:
            await dissolve(gang.models, doc_id, as_read(entries))
        return None
    verdict = await judge(gang.listener, gang.key, entries, ports=settings.rendezvous_ports)
    if verdict.forged is not None:
        log.warning("model %.200r: its nodes.%d is not vouched for by its listener; failing it", doc_id,
                    verdict.forged)
        await fail(gang.models, doc_id, entries, forged(verdict.forged))
        return None
    if verdict.lost:
        log.info("model %.200r: node(s) %s of its gang are gone; giving every node back", doc_id, verdict.lost)
        await dissolve(gang.models, doc_id, as_read(entries))
        return None
    if overdue(verdict, settings.gang_wait_s):  # short, or whole and never claimed (its run changed under it)
        able = hosts(verdict, gang.gpus)
        if len(able) < gang.count:
            await fail(gang.models, doc_id, entries, too_few(gang.count, gang.gpus, able))
        else:
            log.info("model %.200r: %d of %d nodes after %.0f s, not started; giving every node back", doc_id,
                     len(entries), gang.count, settings.gang_wait_s)
            await dissolve(gang.models, doc_id, as_read(entries))
            return GivenBack.OVERDUE
        return None
    return verdict


async def _started(gang: Gang, rank: int) -> tuple[Node, int] | None:
    """A member other than node 0, its entry no longer pending: its node, once node 0's daemon recorded that it claimed
    the document's run with every entry vouched for (see "Start"); None when that run is not one it claimed. Node 0
    records its claim just after making it, so a member may read the document first: it reads again meanwhile."""
    if rank == 0:
        return None
    while True:
        document = await gang.models.find_one({"_id": ids.eq(gang.state.id), "status": Status.RUNNING.value,
                                               f"nodes.{rank}.owner": {"$eq": gang.owner}}, {"nodes": 1, "run": 1})
        if document is None:
            return None
        state = parse(ModelState, document)
        entries = state.nodes or []
        verdict = await judge(gang.listener, gang.key, entries, run=state.run, ports=gang.settings.rendezvous_ports)
        claimed = verdict.records[0].claimed if verdict.records and verdict.records[0].rank == 0 else None
        if len(entries) != gang.count or verdict.lost or (claimed is not None and claimed != state.run):
            log.warning("model %.200r: its running gang is not one its node 0 claimed; not starting", gang.state.id)
            return None
        if claimed == state.run:
            return node_of(verdict, rank, gang.count, verdict.records[0].rendezvous or ""), state.run
        await asyncio.sleep(POLL_S)
