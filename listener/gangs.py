"""One job on several nodes (`trainer.num_nodes`): N daemons, each one torchrun node of it, agreeing through the database.

`_listener` is written by daemons alone, so it is what a daemon believes. The model document's `nodes` array is
the listener's, but a user can write it too, so each entry counts only while its own daemon vouches for it there.

- Join. A daemon with room (a free job slot and the GPUs asked for) first writes a `node` record under its own name
  in `_listener` (model, rank, and for node 0 the endpoint it will host: its operator's `advertise_addr` and a free
  port of `rendezvous_ports`), then appends its entry `{owner, name, host, devices, joined_at, expires_at[, addr,
  port]}` to the pending document with one update matched on the run it read, no cancel, the array's length it read
  and its own absence: an entry's index is its node rank, and no rank is taken twice.
- Vouching. An entry whose daemon is alive but has no record of it (or one naming another endpoint) is forged: the
  job fails naming `nodes`, before any rank connects anywhere. An entry whose daemon is no longer alive, or whose
  `expires_at` passed, is a lost member.
- Leases. Each member renews its entry's `expires_at` (`lease_s`) while it waits and while it trains.
- Start. Node 0, once N vouched entries are there, claims the job (`leases.claim_model`, matched on the array's
  length and on its own entry 0) and from then on owns `run`, `lease` and `status` as for one node; each other member
  starts its node when it sees the document running with its entry in place. Every node's child runs torchrun's
  agent with `--nnodes N --node-rank i` and node 0's endpoint (static rendezvous: node 0's agent hosts the store).
- Deadline. A gang still short `gang_wait_s` after its first entry, or with a lost member, is dissolved (`nodes`
  unset, matched on its length and first owner) by whichever member sees it: each gives its slot back and may join
  again, so two gangs never each hold part of the daemons for ever. A gang dissolved at its deadline while fewer
  daemons than its nodes are alive fails the job, naming how many there are.
- One fate. Rank 0 (on node 0) alone writes progress, metrics and checkpoints; every rank of every node is fenced on
  the run and node 0's lease, and the others write only `error`. Cancel and SIGTERM reach every rank through the
  ranks' per-step all-reduce (`training.ranks`). A node whose daemon dies breaks its peers' collectives (the process
  group's timeout bounds a silent host); node 0 finds the member lost and hands the run back `pending`, an attempt
  counted as for an expired lease, to resume from its last checkpoint once N daemons join again. A member whose
  child ends on its own records its exit on its entry, so node 0 tells a failure from a loss. Every move out of
  `running` unsets `nodes`; a member whose entry is gone stops its node.
"""

import asyncio
import contextlib
import datetime as dt
import logging
import random
import socket
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pymongo.errors import PyMongoError

from listener.leases import alive, claim_model
from listener.records import BadRecord, ModelState
from listener.status import MODEL_TRANSITIONS, Status, now, status_filter, transition
from training import ids

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often a member reads its gang while it waits


class Member(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    owner: str = Field(max_length=300)
    name: str = Field(max_length=300)
    host: str = Field(max_length=300)
    devices: list = Field(max_length=64)
    joined_at: dt.datetime
    expires_at: dt.datetime
    addr: str | None = Field(None, max_length=255)
    port: int | None = Field(None, ge=1, le=65_535)
    exit: int | None = None


@dataclass(frozen=True)
class Node:
    """What one node's child is given by its daemon, from entries their daemons vouch for: its rank among `count`,
    node 0's endpoint, node 0's owner (whose lease fences every rank's writes) and, for the run's entry, every member."""

    rank: int
    count: int
    addr: str
    port: int
    lease_owner: str
    members: list = field(default_factory=list)

    def launch(self) -> dict:
        return {"rank": self.rank, "count": self.count, "addr": self.addr, "port": self.port,
                "members": self.members}


def members(document: dict) -> list[Member]:
    """The document's `nodes`, each entry parsed; BadRecord naming the field when a user wrote another shape."""
    raw = document.get("nodes")
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > 64:
        raise BadRecord("nodes", "not a list of at most 64 node entries")
    try:
        return [Member.model_validate(entry) for entry in raw]
    except ValidationError as exc:
        raise BadRecord("nodes", str(exc.errors()[0]["msg"])) from None


def record_id(owner: str, key: str) -> str:
    return f"node:{owner}:{key}"


async def live_daemons(listener) -> dict[str, dict]:
    """The live daemons' records (`leases.alive`) by owner."""
    return {r["owner"]: r async for r in listener.find(alive(), {"owner": 1, "name": 1})
            if isinstance(r.get("owner"), str)}


async def judge(listener, key: str, entries: list[Member], since: int = 0) -> tuple[list[int], int | None]:
    """(the ranks of lost members, the first forged rank or None): see the module's "Vouching". Node 0 of a running
    gang judges from rank 1 (`since`): its own hold is the run's lease, which it renews instead of its entry."""
    live, lost = await live_daemons(listener), []
    for rank, entry in enumerate(entries[since:], since):
        if entry.exit is not None:
            continue
        if entry.owner not in live or entry.expires_at < now():
            lost.append(rank)
            continue
        record = await listener.find_one({"_id": record_id(entry.owner, key)})
        vouched = record is not None and record.get("rank") == rank and \
            (rank > 0 or (record.get("addr"), record.get("port")) == (entry.addr, entry.port))
        if not vouched:
            return lost, rank
    return lost, None


def check_advertised(addr: str) -> None:
    """At start, RuntimeError in one line where this host cannot listen at `addr`: every rendezvous it hosted would
    fail on each port in turn."""
    try:
        with socket.socket() as sock:
            sock.bind((addr, 0))
    except OSError as exc:
        raise RuntimeError(f"--advertise-addr {addr}: this host cannot listen there ({exc.strerror or exc}); give "
                           "the address of one of its own interfaces that the other hosts reach") from None


def free_port(addr: str, ports: tuple[int, int], taken: set[int]) -> int | None:
    """A port of the operator's range that this host can listen on at `addr` now, and no gang here holds; tried in
    random order, so daemons sharing a host (and its range) seldom pick the same one before either listens."""
    for port in random.sample(range(ports[0], ports[1] + 1), ports[1] - ports[0] + 1):
        if port in taken:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((addr, port))
            except OSError:
                continue
        return port
    return None


def entry(owner: str, name: str, devices: tuple[int, ...] | None, lease_s: float, endpoint=None) -> dict:
    at = now()
    return {"owner": owner, "name": name, "host": socket.gethostname(), "devices": list(devices or ["cpu"]),
            "joined_at": at, "expires_at": at + dt.timedelta(seconds=lease_s),
            **({"addr": endpoint[0], "port": endpoint[1]} if endpoint else {})}


def _length(count: int) -> dict:
    """The array holds exactly `count` entries."""
    return {f"nodes.{count}": {"$exists": False}, **({f"nodes.{count - 1}": {"$exists": True}} if count else {})}


async def join(models, listener, doc_id, key: str, run: int, rank: int, new: dict) -> bool:
    """Vouch for entry `new` at `rank` in `_listener`, then append it; whether this daemon is now that node."""
    record = {"kind": "node", "owner": new["owner"], "model": key, "rank": rank, "addr": new.get("addr"),
              "port": new.get("port"), "at": now()}
    await listener.replace_one({"_id": record_id(new["owner"], key)}, record, upsert=True)
    done = await models.update_one(
        {"_id": ids.eq(doc_id), **status_filter(Status.PENDING), "run": run or {"$in": [None, 0]},
         "cancel": {"$ne": True}, "nodes.owner": {"$ne": new["owner"]}, **_length(rank)},
        {"$push": {"nodes": new}})
    if not done.modified_count:
        await forget(listener, new["owner"], key)
    return bool(done.modified_count)


async def forget(listener, owner: str, key: str) -> None:
    await listener.delete_one({"_id": record_id(owner, key)})


async def renew(models, doc_id, rank: int, owner: str, lease_s: float, status: Status,
                projection: dict | None = None) -> dict | None:
    """Extend this member's entry; the document (`projection`), or None once the entry or that status is gone."""
    return await models.find_one_and_update(
        {"_id": ids.eq(doc_id), **status_filter(status), f"nodes.{rank}.owner": {"$eq": owner}},
        {"$set": {f"nodes.{rank}.expires_at": now() + dt.timedelta(seconds=lease_s)}},
        projection=projection or {"_id": 1, "status": 1, "run": 1, "nodes": 1, "cancel": 1})


async def dissolve(models, doc_id, entries: list[Member]) -> bool:
    """Give every node of a pending gang back (see "Deadline"); whether this call did."""
    if not entries:
        return False
    done = await models.update_one({"_id": ids.eq(doc_id), **status_filter(Status.PENDING),
                                    "nodes.0.owner": {"$eq": entries[0].owner}, **_length(len(entries))},
                                   {"$unset": {"nodes": ""}})
    return bool(done.modified_count)


async def fail(models, doc_id, entries: list[Member], error: dict) -> bool:
    """End a pending gang's job `failed` with `error`, matched on the gang as read."""
    match = {"nodes.0.owner": {"$eq": entries[0].owner}, **_length(len(entries))} if entries else {}
    return await transition(models, doc_id, Status.PENDING, Status.FAILED, MODEL_TRANSITIONS, match=match,
                            fields={"error": error}, unset=("nodes",)) is not None


def forged(rank: int) -> dict:
    return {"type": "invalid_document", "field": "nodes",
            "message": f"nodes.{rank} is not vouched for by the listener it names (a rendezvous only a listener may "
                       "publish): this field is written by the listener; remove it, then set status to 'pending'"}


def too_few(count: int, live: dict[str, dict]) -> dict:
    names = ", ".join(sorted(str(r.get("name")) for r in live.values()))
    return {"type": "not_enough_nodes", "field": "trainer.num_nodes",
            "message": f"asks for {count} nodes; {len(live)} listener(s) are alive ({names}). Ask for fewer, or "
                       "start a listener on more hosts, then set status to 'pending'"}


def overdue(entries: list[Member], wait_s: float) -> bool:
    return bool(entries) and now() - entries[0].joined_at > dt.timedelta(seconds=wait_s)


async def report_exit(models, doc_id, run: int, rank: int, owner: str, code: int) -> None:
    """A member's node ended on its own: say so, so node 0 does not take it for lost."""
    await models.update_one({"_id": ids.eq(doc_id), "run": run, f"nodes.{rank}.owner": {"$eq": owner}},
                            {"$set": {f"nodes.{rank}.exit": int(code)}})


async def lost_peers(models, listener, doc_id, key: str, wait_s: float) -> list[int]:
    """Node 0, its own node failed: the members lost, once each other member has either reported its exit or is
    lost, waiting up to `wait_s` for that (a killed daemon counts as alive until its heartbeat runs out)."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        document = await models.find_one({"_id": ids.eq(doc_id)}, {"nodes": 1})
        try:
            entries = members(document or {})
        except BadRecord:
            return []
        lost, _ = await judge(listener, key, entries, since=1)
        pending = [r for r, e in enumerate(entries) if r and e.exit is None and r not in lost]
        if lost or not pending or asyncio.get_running_loop().time() > deadline:
            return lost
        await asyncio.sleep(POLL_S)


def waiting_note(entries: list[Member], count: int) -> str:
    """What `listener status` shows for a gang this daemon waits in."""
    return f"{len(entries)} of {count} nodes"


def run_members(entries: list[Member]) -> list[dict]:
    """The nodes as the run's entry records them."""
    return [{"rank": r, "name": e.name, "host": e.host, "devices": e.devices} for r, e in enumerate(entries)]


def node_of(entries: list[Member], rank: int, count: int) -> Node:
    first = entries[0]
    return Node(rank, count, first.addr or "", first.port or 0, first.owner, run_members(entries))


async def form(models, listener, settings, owner: str, state: ModelState, count: int, key: str,
               devices: tuple[int, ...] | None, warnings: list[str], waiting: dict[str, str],
               ports: dict[str, int]) -> tuple[Node, int] | None:
    """Join the pending job `state` as one of its `count` nodes and wait for the others: (this node, the run) once it
    starts here, None once this daemon's place is given back (dissolved, failed, cancelled, or no place was free).
    `waiting` (the heartbeat's) says meanwhile how many nodes are there; a started node's `_listener` record stays
    until its training ends (`forget`), as node 0 judges its members by it while they train. `ports`: the rendezvous
    ports this daemon's gangs hold, by model key; node 0 adds its own, which the caller removes when the gang ends."""
    rank = await _join(models, listener, settings, owner, state, count, key, devices, ports)
    if rank is None:
        return None
    started, entries = None, []
    try:
        while started is None:
            document = await renew(models, state.id, rank, owner, settings.lease_s, Status.PENDING)
            if document is None:
                started = await _started(models, listener, state.id, key, rank, count, owner)
                return started
            entries = members(document)
            waiting[key] = waiting_note(entries, count)
            if not await _keep(models, listener, settings, state.id, key, count, entries, document):
                return None
            if rank == 0 and len(entries) == count:
                claimed = await claim_model(models, state, owner, settings.lease_s, warnings,
                                            match={"nodes.0.owner": {"$eq": owner}, **_length(count)})
                if claimed is not None:
                    started = node_of(entries, 0, count), claimed["run"]
                    return started
            await asyncio.sleep(POLL_S)
    except BadRecord:
        return None  # a user rewrote `nodes`: the next consideration fails the document, naming it
    except asyncio.CancelledError:  # the daemon stops: the others need not wait for this node
        with contextlib.suppress(PyMongoError):
            await dissolve(models, state.id, entries)
        raise
    finally:
        waiting.pop(key, None)
        if started is None:
            with contextlib.suppress(PyMongoError):
                await forget(listener, owner, key)


async def _join(models, listener, settings, owner: str, state: ModelState, count: int, key: str,
                devices: tuple[int, ...] | None, ports: dict[str, int]) -> int | None:
    """This daemon's node rank in the gang forming, once its entry is in; None when there is no place or no port.
    Daemons joining at once each try the next place, so they end up in rank order."""
    for _ in range(count):
        document = await models.find_one({"_id": ids.eq(state.id), **status_filter(Status.PENDING)},
                                         {"nodes": 1, "cancel": 1})
        if document is None:
            return None
        entries = members(document)
        if not await _keep(models, listener, settings, state.id, key, count, entries, document) or \
                len(entries) >= count or any(e.owner == owner for e in entries):
            return None
        endpoint = None
        if not entries:
            port = free_port(settings.advertise_addr, settings.rendezvous_ports, set(ports.values()))
            if port is None:
                log.warning("model %.200r: no free rendezvous port in %d-%d; leaving it to another listener",
                            state.id, *settings.rendezvous_ports)
                return None
            endpoint = (settings.advertise_addr, port)
        new = entry(owner, settings.name, devices, settings.lease_s, endpoint)
        if await join(models, listener, state.id, key, state.run, len(entries), new):
            if endpoint:
                ports[key] = endpoint[1]
            log.info("model %.200r: joined as node %d of %d", state.id, len(entries), count)
            return len(entries)
    return None


async def _keep(models, listener, settings, doc_id, key: str, count: int, entries: list[Member],
                document: dict) -> bool:
    """Whether the gang as read may go on forming; if not, it is dissolved or its job failed here."""
    if document.get("cancel") is True:
        await dissolve(models, doc_id, entries)
        return False
    lost, bad = await judge(listener, key, entries)
    if bad is not None:
        log.warning("model %.200r: its nodes.%d is not vouched for by its listener; failing it", doc_id, bad)
        await fail(models, doc_id, entries, forged(bad))
        return False
    if lost:
        log.info("model %.200r: node(s) %s of its gang are gone; giving every node back", doc_id, lost)
        await dissolve(models, doc_id, entries)
        return False
    if len(entries) < count and overdue(entries, settings.gang_wait_s):
        live = await live_daemons(listener)
        if len(live) < count:
            await fail(models, doc_id, entries, too_few(count, live))
        else:
            log.info("model %.200r: %d of %d nodes after %.0f s; giving every node back", doc_id, len(entries),
                     count, settings.gang_wait_s)
            await dissolve(models, doc_id, entries)
        return False
    return True


async def _started(models, listener, doc_id, key: str, rank: int, count: int, owner: str) -> tuple[Node, int] | None:
    """A member other than node 0, its entry no longer pending: its node, if node 0 started the job with it."""
    document = await models.find_one({"_id": ids.eq(doc_id), "status": Status.RUNNING.value,
                                      f"nodes.{rank}.owner": {"$eq": owner}}, {"nodes": 1, "run": 1})
    if document is None or rank == 0:
        return None
    entries = members(document)
    _, bad = await judge(listener, key, entries)
    if len(entries) != count or bad is not None or not isinstance(document.get("run"), int):
        log.warning("model %.200r: its running gang is not one this listener can vouch for; not starting", doc_id)
        return None
    return node_of(entries, rank, count), document["run"]
