"""Statuses and the one table of allowed transitions; `transition` is the only writer of `status`.

Every transition is a single `find_one_and_update` filtered on the expected old status, so it
happens once however many daemons race for it.
"""

import datetime as dt
from enum import Enum

from pymongo import ReturnDocument
from pymongo.errors import OperationFailure

from training import ids


class Status(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


S = Status
# A model goes back to pending to retrain, or when its lease is released by a stopping daemon.
MODEL_TRANSITIONS = {
    S.PENDING: {S.RUNNING, S.FAILED, S.CANCELLED},
    S.RUNNING: {S.SUCCEEDED, S.FAILED, S.CANCELLED, S.PENDING},
    S.SUCCEEDED: {S.PENDING},
    S.FAILED: {S.PENDING},
    S.CANCELLED: {S.PENDING},
}
REQUEST_TRANSITIONS = {
    S.PENDING: {S.RUNNING, S.FAILED, S.CANCELLED},
    S.RUNNING: {S.DONE, S.FAILED, S.CANCELLED, S.PENDING},
}
FINAL = {S.SUCCEEDED, S.DONE, S.FAILED, S.CANCELLED}
DOCUMENT_VALIDATION_FAILURE = 121


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def status_filter(status: Status) -> dict:
    """A document with no status yet was just inserted by a user: it counts as pending."""
    return {"status": {"$in": [None, S.PENDING.value]}} if status is S.PENDING else {"status": status.value}


async def transition(collection, doc_id, old: Status, new: Status, table: dict, *, match: dict | None = None,
                     fields: dict | None = None, inc: dict | None = None, unset: tuple = (),
                     push: dict | None = None) -> dict | None:
    """Move one document from `old` to `new`; returns it after the change, or None if it was not in `old`."""
    if new not in table.get(old, ()):
        raise ValueError(f"status {old.value} -> {new.value} is not an allowed transition")
    stamp = {"finished_at": now()} if new in FINAL else {}
    update: dict = {"$set": {"status": new.value, **stamp, **(fields or {})}}
    if inc:
        update["$inc"] = inc
    if unset:
        update["$unset"] = {name: "" for name in unset}
    if push:
        update["$push"] = push
    query = {"_id": ids.eq(doc_id), **status_filter(old), **(match or {})}
    try:
        return await collection.find_one_and_update(query, update, return_document=ReturnDocument.AFTER)
    except OperationFailure as exc:
        if exc.code != DOCUMENT_VALIDATION_FAILURE:
            raise
        # The document predates a stricter validator (the operator lowered a cap): the listener's own
        # write must still land, or the document could never be failed or finished.
        return await collection.find_one_and_update(query, update, return_document=ReturnDocument.AFTER,
                                                    bypassDocumentValidation=True)
