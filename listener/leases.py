"""Claims and leases: who works on a document, and until when.

A claim is one atomic `find_one_and_update` that moves the document to `running`, names the
owner, sets the lease expiry and counts the attempt, so a crashed attempt still counts.
"""

import datetime as dt
import logging

from pymongo.errors import OperationFailure

from listener import defaults
from listener.status import MODEL_TRANSITIONS, REQUEST_TRANSITIONS, Status, now, transition

log = logging.getLogger("mongotune.listener")


def lease(owner: str) -> dict:
    return {"owner": owner, "expires_at": now() + dt.timedelta(seconds=defaults.LEASE_S)}


def resumes_run(document: dict) -> bool:
    """A run that started and never finished (its daemon stopped or died) is resumed, not restarted."""
    return bool(document.get("run")) and bool(document.get("started_at")) and not document.get("finished_at")


async def claim_model(models, document: dict, owner: str) -> dict | None:
    resume = resumes_run(document)
    run = document.get("run", 0) + (0 if resume else 1)
    fields = {"run": run, "lease": lease(owner), **({} if resume else {"attempts": 1, "started_at": now()})}
    return await transition(
        models, document["_id"], Status.PENDING, Status.RUNNING, MODEL_TRANSITIONS,
        match={"run": document.get("run"), "cancel": {"$ne": True}}, fields=fields,
        inc={"attempts": 1} if resume else None,
        unset=() if resume else ("error", "finished_at", "cancel", "progress", "history"),
    )


async def claim_request(requests, request_id, owner: str) -> dict | None:
    return await transition(
        requests, request_id, Status.PENDING, Status.RUNNING, REQUEST_TRANSITIONS,
        fields={"lease": lease(owner), "started_at": now()}, inc={"attempts": 1},
    )


async def renew(collection, doc_id, owner: str, projection: dict | None = None) -> dict | None:
    """Extend a lease we hold and return the document (`projection` of it); None: it is no longer ours."""
    return await collection.find_one_and_update(
        {"_id": doc_id, "status": Status.RUNNING.value, "lease.owner": owner},
        {"$set": {"lease.expires_at": lease(owner)["expires_at"]}},
        projection=projection or {"_id": 1},
    )


async def reap(collection, table: dict, max_attempts: int) -> int:
    """Hand back work whose daemon died (its lease expired); fail it after `max_attempts` expiries.

    Only expiries count: a daemon stopped cleanly gives its work back and costs it no attempt.
    """
    reaped = 0
    expired = {"status": Status.RUNNING.value, "lease.expires_at": {"$lt": now()}}
    async for document in collection.find(expired, {"attempts": 1, "lease": 1, "history": 1}):
        held = document["lease"]
        event = {"at": now(), "event": "lease expired", "owner": held.get("owner"), "attempt": document.get("attempts")}
        history = document.get("history") if isinstance(document.get("history"), list) else []
        past = [e for e in history if isinstance(e, dict) and e.get("event") == "lease expired"] + [event]
        gave_up = len(past) >= max_attempts
        fields = {}
        if gave_up:
            fields["error"] = {
                "type": "too_many_attempts",
                "message": f"gave up after {len(past)} attempt(s): each time, the daemon working on it stopped "
                           f"without finishing (daemons: {', '.join(str(e['owner']) for e in past)}); "
                           "look at those hosts' logs, then set status back to 'pending' to try again",
            }
        try:
            if await transition(collection, document["_id"], Status.RUNNING,
                                Status.FAILED if gave_up else Status.PENDING, table,
                                match={"lease.expires_at": held["expires_at"]}, fields=fields, unset=("lease",),
                                push={"history": event} if "history" not in document or history else None,
                                ):
                reaped += 1
        except OperationFailure as exc:  # a user-written field in the way: the next document still gets reaped
            log.warning("cannot requeue %r: %s", document["_id"], exc)
    return reaped
