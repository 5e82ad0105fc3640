"""Claims and leases: who works on a document, and until when.

A claim is one atomic `find_one_and_update` that moves the document to `running`, names the
owner, sets the lease expiry and counts the attempt, so a crashed attempt still counts.
"""

import datetime as dt

from listener import defaults
from listener.status import MODEL_TRANSITIONS, REQUEST_TRANSITIONS, Status, now, transition


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
        match={"run": document.get("run")}, fields=fields, inc={"attempts": 1} if resume else None,
        unset=() if resume else ("error", "finished_at", "cancel", "progress"),
    )


async def claim_request(requests, request_id, owner: str) -> dict | None:
    return await transition(
        requests, request_id, Status.PENDING, Status.RUNNING, REQUEST_TRANSITIONS,
        fields={"lease": lease(owner), "started_at": now()}, inc={"attempts": 1},
    )


async def renew(collection, doc_id, owner: str) -> bool:
    """Extend a lease we hold; False means it is no longer ours."""
    result = await collection.update_one(
        {"_id": doc_id, "status": Status.RUNNING.value, "lease.owner": owner},
        {"$set": {"lease.expires_at": lease(owner)["expires_at"]}},
    )
    return result.matched_count == 1


async def renew_all(collection, owner: str) -> int:
    """Extend every lease `owner` holds in a collection at once (requests in a long generation)."""
    result = await collection.update_many(
        {"status": Status.RUNNING.value, "lease.owner": owner},
        {"$set": {"lease.expires_at": lease(owner)["expires_at"]}},
    )
    return result.modified_count


async def reap(collection, table: dict, max_attempts: int) -> int:
    """Hand back work whose daemon died (its lease expired); fail it after `max_attempts` claims."""
    reaped = 0
    expired = {"status": Status.RUNNING.value, "lease.expires_at": {"$lt": now()}}
    async for document in collection.find(expired, {"attempts": 1, "lease": 1, "history": 1}):
        held = document["lease"]
        event = {"at": now(), "event": "lease expired", "owner": held.get("owner"), "attempt": document.get("attempts")}
        gave_up = document.get("attempts", 0) >= max_attempts and Status.FAILED in table[Status.RUNNING]
        fields = {}
        if gave_up:
            past = [*(document.get("history") or []), event]
            fields["error"] = {
                "type": "too_many_attempts",
                "message": f"gave up after {len(past)} attempt(s): each time, the daemon working on it stopped "
                           f"without finishing (daemons: {', '.join(str(e['owner']) for e in past)}); "
                           "look at those hosts' logs, then set status back to 'pending' to try again",
            }
        if await transition(collection, document["_id"], Status.RUNNING, Status.FAILED if gave_up else Status.PENDING,
                            table, match={"lease.expires_at": held["expires_at"]}, fields=fields, unset=("lease",),
                            push={"history": event}):
            reaped += 1
    return reaped
