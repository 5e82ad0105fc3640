"""Statuses and the one table of allowed transitions; the `transition` functions are the only writers of `status`.

Every transition is filtered on the expected old status, so it happens once however many daemons race
for it: one document's (`transition`, a `find_one_and_update`), a batch claim's (`transition_many`, one
`update_many`) or a batch of answers' (`transition_each`, one `bulk_write`).
"""

from pymongo import ReturnDocument, UpdateOne
from pymongo.errors import BulkWriteError, OperationFailure

from training import events, ids
from training.defaults import FINAL, Status, now  # noqa: F401  (the daemon's modules import them from here)

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
# Documents by status, one `$group` stage that no document can fail: it groups on a status only where it is a string
# (missing or null is pending, anything else `other`). Grouping on any value fails the whole `$group` for one status
# nested ~975 levels deep (`InternalError`), and a value of another BSON type could not be hashed by the caller.
BY_STATUS = [{"$group": {"_id": {"$switch": {"branches": [
    {"case": {"$eq": [{"$type": "$status"}, "string"]}, "then": "$status"},
    {"case": {"$in": [{"$type": "$status"}, ["missing", "null"]]}, "then": S.PENDING.value}],
    "default": "other"}}, "n": {"$sum": 1}}}]
DOCUMENT_VALIDATION_FAILURE = 121
BAD_VALUE = 2  # e.g. `$push` onto a field that is not an array


def model_event(old: Status, new: Status, fields: dict, given: dict) -> dict:
    """What a model's transition means as an event: who claimed it, why it failed, who asked to retrain."""
    details = dict(given)
    kind = details.pop("kind", None)
    if new is S.RUNNING:
        kind = kind or "claimed"
        details.setdefault("owner", (fields.get("lease") or {}).get("owner"))
        details.setdefault("run", fields.get("run"))
    elif new is S.PENDING:
        kind = kind or ("released" if old is S.RUNNING else "retrain_requested")
    elif new is S.FAILED:
        details.setdefault("error", (fields.get("error") or {}).get("type"))
    return events.event(kind or new.value, **details)


def status_filter(status: Status) -> dict:
    """A document with no status yet was just inserted by a user: it counts as pending."""
    return {"status": {"$in": [None, S.PENDING.value]}} if status is S.PENDING else {"status": status.value}


def update_for(old: Status, new: Status, table: dict, *, fields: dict | None = None, inc: dict | None = None,
               unset: tuple = (), push: dict | None = None, event: dict | None = None) -> dict:
    """The update document that moves a document from `old` to `new` (checked against `table`)."""
    if new not in table.get(old, ()):
        raise ValueError(f"status {old.value} -> {new.value} is not an allowed transition")
    stamp = {"finished_at": now()} if new in FINAL else {}
    update: dict = {"$set": {"status": new.value, **stamp, **(fields or {})}}
    if inc:
        update["$inc"] = inc
    if unset:
        update["$unset"] = {name: "" for name in unset}
    if table is MODEL_TRANSITIONS:
        push = {**(push or {}), **events.push(model_event(old, new, fields or {}, event or {}))}
    if push:
        update["$push"] = push
    return update


def query_for(doc_id, old: Status, match: dict | None = None) -> dict:
    """The filter that finds exactly this document, only while it is still in `old` (and matches `match`)."""
    return {"_id": ids.eq(doc_id), **status_filter(old), **(match or {})}


async def transition(collection, doc_id, old: Status, new: Status, table: dict, *, match: dict | None = None,
                     fields: dict | None = None, inc: dict | None = None, unset: tuple = (),
                     push: dict | None = None, event: dict | None = None) -> dict | None:
    """Move one document from `old` to `new`; returns it after the change, or None if it was not in `old`.

    A model's transition also records an event (see `model_event`); `event` overrides its kind or adds details.
    """
    update = update_for(old, new, table, fields=fields, inc=inc, unset=unset, push=push, event=event)
    query = query_for(doc_id, old, match)
    try:
        return await _write(collection, query, update)
    except OperationFailure as exc:
        if exc.code != BAD_VALUE or "'events'" not in str(exc) or "events" not in update.get("$push", {}):
            raise
    # A user wrote something other than a list into `events`: the listener's list replaces it.
    update["$set"]["events"] = update["$push"].pop("events")["$each"]
    if not update["$push"]:
        del update["$push"]
    return await _write(collection, query, update)


async def transition_many(collection, doc_ids: list, old: Status, new: Status, table: dict, *,
                          match: dict | None = None, **change) -> int | None:
    """Move every listed document still in `old` (and matching `match`) to `new`, in one `update_many`.

    Returns how many moved, or None when that is not known (a validator refused the first try, which
    may have moved some); with daemons racing, which ones moved is read back by a field the change set.
    """
    update = update_for(old, new, table, **change)
    query = {"_id": {"$in": list(doc_ids)}, **status_filter(old), **(match or {})}
    try:
        return (await collection.update_many(query, update)).modified_count
    except OperationFailure as exc:
        if exc.code != DOCUMENT_VALIDATION_FAILURE:
            raise
    await collection.update_many(query, update, bypass_document_validation=True)  # as in `_write`
    return None


async def transition_each(collection, writes: list[tuple[dict, dict]]) -> int:
    """Several documents' transitions (`query_for`, `update_for` pairs) in one unordered `bulk_write`.

    Returns how many documents moved (the others were no longer in their old status, or no longer
    matched). One refused by a validator is retried as `_write` does; any other failure of one write
    is raised after the others landed.
    """
    if not writes:
        return 0
    try:
        return (await collection.bulk_write([UpdateOne(q, u) for q, u in writes], ordered=False)).modified_count
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors", [])
        if any(error.get("code") != DOCUMENT_VALIDATION_FAILURE for error in errors):
            raise
        moved, again = exc.details.get("nModified", 0), [writes[error["index"]] for error in errors]
    result = await collection.bulk_write([UpdateOne(q, u) for q, u in again], ordered=False,
                                         bypass_document_validation=True)
    return moved + result.modified_count


async def _write(collection, query: dict, update: dict) -> dict | None:
    try:
        return await collection.find_one_and_update(query, update, return_document=ReturnDocument.AFTER)
    except OperationFailure as exc:
        if exc.code != DOCUMENT_VALIDATION_FAILURE:
            raise
        # The document predates a stricter validator (the operator lowered a cap): the listener's own
        # write must still land, or the document could never be failed or finished.
        return await collection.find_one_and_update(query, update, return_document=ReturnDocument.AFTER,
                                                    bypassDocumentValidation=True)
