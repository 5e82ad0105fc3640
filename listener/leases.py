"""Claims and leases: who works on a document, and until when; who is alive to do it.

A claim is atomic: it moves the document to `running`, names the owner, sets the lease expiry and
counts the attempt, so a crashed attempt still counts. A model's claim is one `find_one_and_update`;
requests are claimed in batches (`listener.intake`). Work comes back two ways: a lease that ran out
(`reap`), and, for requests, a daemon whose heartbeat stopped (`take_over`), seconds after its death
instead of a lease later; at the next tick when its process, on this host, is certainly gone
(`listener.liveness`). Clocks of the daemons' hosts are assumed in step, as for every lease.
"""

import datetime as dt
import logging
from collections.abc import Container

from bson.raw_bson import RawBSONDocument
from pymongo.errors import OperationFailure

from listener import liveness
from listener.records import BadRecord, DaemonRecord, ModelState, SkipLog, parse, raw, raw_id, read_each
from listener.settings import ALIVE_BEATS
from listener.status import MODEL_TRANSITIONS, Status, now, transition
from training import ids
from training.config import SpecError

log = logging.getLogger(__name__)

# Why work was handed back (`history`): a lease ran out, a heartbeat stopped, a daemon's process is gone, or a job
# of several nodes lost one (`listener.gangs`).
LEASE_EXPIRED, HEARTBEAT_STOPPED, PROCESS_GONE, NODE_LOST = ("lease expired", "heartbeat stopped", "process gone",
                                                             "node lost")
HANDED_BACK = (LEASE_EXPIRED, HEARTBEAT_STOPPED, PROCESS_GONE, NODE_LOST)  # each an attempt that did not finish
OLDER_RELEASE_S = 30.0  # how long a heartbeat without `alive_until` counts (`alive`)
STATE_FIELDS = {"attempts": 1, "lease": 1, "history": 1}  # what a requeue reads


def lease(owner: str, lease_s: float) -> dict:
    return {"owner": owner, "expires_at": now() + dt.timedelta(seconds=lease_s)}


def alive_until(heartbeat_s: float) -> dt.datetime:
    """What a heartbeat written now promises: this daemon lives until then unless it beats again."""
    return now() + dt.timedelta(seconds=ALIVE_BEATS * heartbeat_s)


def alive() -> dict:
    """The `_listener` records of daemons alive now, each judged by its own heartbeat interval.

    A record without `alive_until` was written by an older release, still running during an upgrade: it
    counts while its heartbeat is under `OLDER_RELEASE_S` old, so its requests are not taken from it."""
    return {"kind": "daemon", "$or": [
        {"alive_until": {"$gte": now()}},
        {"alive_until": {"$exists": False}, "heartbeat_at": {"$gte": now() - dt.timedelta(seconds=OLDER_RELEASE_S)}},
    ]}


async def claim_model(models, state: ModelState, owner: str, lease_s: float, warnings: list[str],
                      match: dict | None = None) -> dict | None:
    """Claim a pending model: resume its interrupted run, or start the next one (fresh `warnings`).

    `match`: node 0 of a gang claims on the gang it read (`listener.gangs`); any other claim drops `nodes`."""
    resume = state.interrupted()
    fields = {"run": state.run + (0 if resume else 1), "lease": lease(owner, lease_s),
              **({} if resume else {"attempts": 1, "started_at": now(), "warnings": warnings})}
    return await transition(
        models, state.id, Status.PENDING, Status.RUNNING, MODEL_TRANSITIONS,
        match={"run": state.run or {"$in": [None, 0]}, "cancel": {"$ne": True}, **(match or {})},
        fields=fields, inc={"attempts": 1} if resume else None,
        unset=(() if resume else ("error", "finished_at", "cancel", "progress", "history")) + (() if match else ("nodes",)),
    )


async def give_back(collection, table: dict, doc_id, owner: str) -> dict | None:
    """Hand back, `pending`, what `owner` holds and will not finish (it stops, or cannot start it): no attempt is
    counted, and any daemon takes it at once. None if `owner` no longer holds it."""
    return await transition(collection, doc_id, Status.RUNNING, Status.PENDING, table,
                            match={"lease.owner": {"$eq": owner}}, unset=("lease", "nodes"))


async def renew(collection, doc_id, owner: str, lease_s: float, projection: dict | None = None) -> dict | None:
    """Extend a lease we hold and return the document (`projection` of it); None: it is no longer ours."""
    return await collection.find_one_and_update(
        {"_id": ids.eq(doc_id), "status": Status.RUNNING.value, "lease.owner": {"$eq": owner}},
        {"$set": {"lease.expires_at": lease(owner, lease_s)["expires_at"]}},
        projection=projection or {"_id": 1},
    )


async def reap(collection, table: dict, state_kind, max_attempts: int, skipped: SkipLog, owner: str | None = None,
               held: Container[str] = ()) -> int:
    """Hand back work whose daemon died (its lease expired); fail it after `max_attempts` expiries.

    Only expiries count: a daemon stopped cleanly gives its work back and costs it no attempt. A
    document of an unexpected shape is skipped (logged once); the pass goes on to the next.
    What the reaping daemon (`owner`) still works on (`held`: the `ids.key` of each) is never reaped
    here, expired or not: that daemon is alive and renews it at its next tick. A daemon paused past
    its lease (a loaded host, a stopped process) would otherwise requeue its own live training, stop it
    and claim it again, an attempt and an expiry counted against the run for nothing (a request would
    be claimed and answered twice). Another daemon still reaps it: that is what a lease is for.
    """
    reaped = 0
    expired = {"status": Status.RUNNING.value, "lease.expires_at": {"$lt": now()}}
    for document in await read_each(collection, expired, STATE_FIELDS, skipped, f"reap {collection.name}"):
        try:
            state = parse(state_kind, document)
        except BadRecord as exc:
            await fail_malformed(collection, table, document["_id"], Status.RUNNING, exc, skipped)
            continue
        if owner is not None and state.lease is not None and state.lease.owner == owner and ids.key(state.id) in held:
            continue
        try:
            reaped += bool(await requeue(collection, table, state, max_attempts, LEASE_EXPIRED))
        except OperationFailure as exc:
            skipped.skip(f"reap {collection.name}", state.id, exc)
    # A claim writes status and lease together, so `running` without a dated lease was written by a user.
    leaseless = {"status": Status.RUNNING.value, "lease.expires_at": {"$not": {"$type": "date"}}}
    async for document in collection.find(leaseless, {"_id": 1}):
        await fail_malformed(collection, table, document["_id"], Status.RUNNING,
                             BadRecord("lease", "a running document without a lease that expires"), skipped)
    return reaped


async def take_over(collection, table: dict, state_kind, max_attempts: int, skipped: SkipLog, listener,
                    owner: str) -> int:
    """Hand back at once what daemons no longer alive hold (`alive`, less those of this host whose process is
    gone: `liveness.dead`), whatever their leases say.

    Two reads when nobody died: the live daemons, and whether anything running belongs to another
    owner. A requeue is fenced on the lease it read, like `reap`'s, and counts toward `max_attempts`
    the same way; the dead daemon, should it only have been paused, finds its answers' writes fenced
    out (they match on owner and status).
    """
    live, gone = await live_owners(listener)
    orphaned = {"status": Status.RUNNING.value, "lease.owner": {"$nin": [owner, *live]},
                "lease.expires_at": {"$type": "date"}}
    requeued = 0
    for document in await read_each(collection, orphaned, STATE_FIELDS, skipped, f"take over {collection.name}"):
        try:
            state = parse(state_kind, document)
            why = PROCESS_GONE if state.lease is not None and state.lease.owner in gone else HEARTBEAT_STOPPED
            requeued += bool(await requeue(collection, table, state, max_attempts, why))
        except (BadRecord, OperationFailure) as exc:
            skipped.skip(f"take over {collection.name}", document.get("_id"), exc)
    return requeued


DAEMON_FIELDS = dict.fromkeys(("owner", "name", "host", "heartbeat_at", "gpus", "gpus_free", *liveness.FIELDS), 1)


async def live_owners(listener) -> tuple[dict[str, DaemonRecord], set[str]]:
    """The daemons alive now (`alive`, less those of this host whose process is gone: `liveness.dead`) by owner, and
    the owners found dead here; a record of another shape is skipped (only daemons write `_listener`)."""
    here, live, gone = liveness.identity(), {}, set()
    async for document in listener.find(alive(), DAEMON_FIELDS):
        try:
            record = parse(DaemonRecord, document)
        except BadRecord:
            continue
        if liveness.dead(record, here):
            gone.add(record.owner)
        else:
            live[record.owner] = record
    return live, gone


async def fail_malformed(collection, table: dict, doc_id, old: Status, exc: BadRecord, skipped: SkipLog) -> bool:
    """A document whose listener-owned fields were overwritten with the wrong shape ends `failed`, naming the field;
    whether it did now."""
    error = {"type": "invalid_document", "field": exc.field,
             "message": f"{exc}: this field is written by the listener; remove it, then set status to 'pending'"}
    try:
        return await transition(collection, doc_id, old, Status.FAILED, table, fields={"error": error},
                                unset=("lease",)) is not None
    except OperationFailure as again:
        skipped.skip(collection.name, doc_id, again)
        return False


async def fail_undecodable(collection, table: dict, document: RawBSONDocument, exc: SpecError,
                           skipped: SkipLog) -> bool:
    """A pending document nested deeper than the listener reads (`records.decoded`) ends `failed` by its id, naming
    the field; written and read back raw, so nothing decodes it again. Whether it did now. OperationFailure where
    the server cannot change it either (the embedded one, past some 900 levels): the caller leaves it out."""
    doc_id = raw_id(document)
    if doc_id is None:  # not even its top level decodes: no id to fail it by
        skipped.skip(f"read {collection.name}", None, exc)
        return False
    log.info("%s %.200r cannot be read: %s", collection.name, doc_id, exc)
    return await transition(raw(collection), doc_id, Status.PENDING, Status.FAILED, table,
                            fields={"error": exc.as_error()}) is not None


async def requeue(collection, table: dict, state, max_attempts: int, why: str) -> dict | None:
    """Hand back work whose daemon (or one of its nodes) is gone, or fail it once that happened `max_attempts` times.
    A model's gang goes with its lease (`listener.gangs`), and so does an `error` its attempt's processes wrote: the
    run is not over, and the claim that resumes it keeps `error` (a gang's other nodes write theirs when node 0 dies,
    their connections broken)."""
    if state.lease is None:
        raise BadRecord("lease", "a running document without a lease")
    event = {"at": now(), "event": why, "owner": state.lease.owner, "attempt": state.attempts}
    past = [e for e in state.history if e.get("event") in HANDED_BACK] + [event]
    gave_up = len(past) >= max_attempts
    fields = {}
    if gave_up:
        fields["error"] = {
            "type": "too_many_attempts",
            "message": f"gave up after {len(past)} attempt(s): each time, the daemon working on it stopped "
                       f"without finishing (daemons: {', '.join(str(e.get('owner')) for e in past)}); "
                       "look at those hosts' logs, then set status back to 'pending' to try again",
        }
    cleared = ("lease", *(("nodes", "error") if table is MODEL_TRANSITIONS else ()))
    done = await transition(collection, state.id, Status.RUNNING, Status.FAILED if gave_up else Status.PENDING,
                            table, match={"lease.expires_at": state.lease.expires_at}, fields=fields,
                            unset=tuple(f for f in cleared if f not in fields),  # one update cannot set and unset it
                            push={"history": event},
                            event=None if gave_up else {"kind": why.replace(" ", "_"), "owner": state.lease.owner})
    if done is not None:
        log.warning("%s %.200r: %s of %.100s (attempt %d); %s", collection.name, state.id, why, state.lease.owner,
                    state.attempts, "failed: too many attempts" if gave_up else "handed back as pending")
    return done
