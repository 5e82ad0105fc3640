"""Change streams that survive restarts: resume tokens saved in `_listener`, a scan after any gap.

A token is saved only after its event was handled, so a crash re-delivers rather than loses
(handling is idempotent: claims are atomic). Saves run beside the handling of the next events and
coalesce (`Tokens`): a burst of inserts costs one claim each, not a claim and a save each. When a
stream cannot resume, the caller's scan for pending documents covers whatever the gap hid.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext

from bson.errors import InvalidBSON, InvalidDocument
from pymongo.errors import OperationFailure, PyMongoError

from listener.records import BadRecord, ChangeEvent, ResumeRecord, parse
from listener.status import now
from training import defaults

log = logging.getLogger(__name__)

# Only what can need action: new or replaced documents, and updates that touch `status` or `cancel`
# (not the stream of progress and metrics writes a training makes).
PIPELINE = [{"$match": {"$or": [
    {"operationType": {"$in": ["insert", "replace"]}},
    {"operationType": "update", "updateDescription.updatedFields.status": {"$exists": True}},
    {"operationType": "update", "updateDescription.updatedFields.cancel": {"$exists": True}},
]}}]
# For `_requests`, only what can mean a request to claim: one inserted (or replaced) pending, one set back to
# pending, one cancelled while pending. Not the claims, answers and partial outputs daemons write, which
# would reach every daemon once each; and no document: the event only wakes `listener.intake`.
REQUEST_EVENTS = [
    {"$match": {"$or": [
        {"operationType": {"$in": ["insert", "replace"]}, "fullDocument.status": {"$in": [None, "pending"]}},
        {"operationType": "update", "updateDescription.updatedFields.status": "pending"},
        {"operationType": "update", "updateDescription.updatedFields.cancel": {"$exists": True}},
    ]}},
    {"$project": {"operationType": 1}},
]
# ChangeStreamHistoryLost, InvalidResumeToken, ChangeStreamFatalError: the token cannot be used again.
# Any other server refusal of a saved token at open (a malformed one: FailedToParse) is treated the same.
LOST_TOKEN_CODES = {286, 260, 280}


async def watch(db, collection: str, daemon_name: str | None, handle: Callable[[dict], Awaitable[None]],
                on_gap: Callable[[], Awaitable[None]] | None = None, pipeline: list = PIPELINE,
                handling: AbstractContextManager = nullcontext(), lookup: bool = True) -> None:
    """Deliver the full document of every change of `collection` that `pipeline` passes to `handle`, forever.

    `lookup` False delivers every event that passes, with no document (`{}`): a wake-up, for a caller
    that reads what it needs itself.
    Cancel the task to stop. `daemon_name` None keeps no resume token: each stream, reopened after a
    break or an unreadable event, starts from now (for best-effort work that a missed event only delays).
    `handling` is entered around each event; between events already received it is re-entered without
    yielding to the event loop, so other tasks see it exited only while the stream waits on the server.
    """
    tokens = db[defaults.LISTENER]
    key = f"resume:{daemon_name}:{collection}" if daemon_name is not None else None
    backoff = 0.5
    while True:
        resume, opened, saver = None, False, Tokens(tokens, key)
        try:
            resume = await _saved_token(tokens, key) if key else None
            async with await db[collection].watch(pipeline, full_document="updateLookup" if lookup else None,
                                                  resume_after=resume) as stream:
                opened = True
                if on_gap:
                    await on_gap()
                backoff = 0.5
                async for change in stream:
                    with handling:
                        await _deliver(change, handle, lookup)
                    saver.handled(stream.resume_token)
        except PyMongoError as exc:
            refused = isinstance(exc, OperationFailure) and (exc.code in LOST_TOKEN_CODES or resume and not opened)
            if refused:
                log.warning("resume token for %s can no longer be used (%s); scanning for pending work instead",
                            collection, exc.details.get("codeName", exc.code) if exc.details else exc.code)
                await saver.settled()
                await _forget(tokens, key)
                continue
            log.warning("stream on %s broke (%s); reconnecting in %.1f s", collection, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
        except (InvalidBSON, InvalidDocument, ValueError, TypeError) as exc:
            # An event that cannot be read at all: start a fresh stream; the scan (if any) covers what it hid.
            log.warning("unreadable event on %s skipped (%s); opening a fresh stream", collection, exc)
            await saver.settled()
            await _forget(tokens, key)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)


class Tokens:
    """Saves a stream's resume token once its event was handled, beside the next events' handling.

    One save is in flight at a time; events handled meanwhile are covered by the next save, of the
    newest token, so a burst costs one or two writes. A failed save is logged and retried with the
    next event; a crash before it re-delivers events already handled, which is harmless.
    """

    def __init__(self, tokens, key: str | None):
        self.tokens, self.key = tokens, key
        self._newest = self._saved = None
        self._saving: asyncio.Task | None = None

    def handled(self, token: dict | None) -> None:
        if self.key is None or token is None:
            return
        self._newest = token
        if self._saving is None or self._saving.done():
            self._saving = asyncio.create_task(self._save())

    async def settled(self) -> None:
        """Once no save is in flight: a token forgotten now stays forgotten."""
        if self._saving is not None:
            await self._saving

    async def _save(self) -> None:
        while self._saved is not self._newest:
            token = self._newest
            try:
                await self.tokens.update_one({"_id": self.key}, {"$set": {"token": token, "at": now()}}, upsert=True)
            except PyMongoError as exc:
                log.warning("resume token for %s not saved: %s", self.key, exc)
                return
            self._saved = token


async def _saved_token(tokens, key: str) -> dict | None:
    """The saved resume token, if its record has the right shape; a bad record means a fresh stream."""
    saved = await tokens.find_one({"_id": key})
    if saved is None:
        return None
    try:
        return parse(ResumeRecord, saved).token
    except BadRecord as exc:
        log.warning("resume record %s is unusable (%s); starting a fresh stream", key, exc)
        await tokens.delete_one({"_id": key})
        return None


async def _forget(tokens, key: str | None) -> None:
    if key is None:
        return
    try:
        await tokens.delete_one({"_id": key})
    except PyMongoError as exc:
        log.warning("cannot drop resume record %s: %s", key, exc)


async def _deliver(change: dict, handle: Callable[[dict], Awaitable[None]], lookup: bool = True) -> None:
    try:
        event = parse(ChangeEvent, change)
    except BadRecord as exc:
        log.warning("skipping a change event of an unexpected shape: %s", exc)
        return
    if not lookup:
        await handle({})
    elif event.full_document is not None:
        await handle(event.full_document)
