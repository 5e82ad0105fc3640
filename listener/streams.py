"""Change streams that survive restarts: resume tokens saved in `_listener`, a scan after any gap.

A token is saved only after its event was handled, so a crash re-delivers rather than loses
(handling is idempotent: claims are atomic). When a stream cannot resume, the caller's scan for
pending documents covers whatever the gap hid.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable

from pymongo.errors import OperationFailure, PyMongoError

from listener import defaults
from listener.status import now

log = logging.getLogger("mongotune.listener")

# Only what can need action: new or replaced documents, and updates that touch `status` or `cancel`
# (not the stream of progress and metrics writes a training makes).
PIPELINE = [{"$match": {"$or": [
    {"operationType": {"$in": ["insert", "replace"]}},
    {"operationType": "update", "updateDescription.updatedFields.status": {"$exists": True}},
    {"operationType": "update", "updateDescription.updatedFields.cancel": {"$exists": True}},
]}}]
# ChangeStreamHistoryLost, InvalidResumeToken, ChangeStreamFatalError: the token cannot be used again.
# Any other server refusal of a saved token at open (a malformed one: FailedToParse) is treated the same.
LOST_TOKEN_CODES = {286, 260, 280}


async def watch(db, collection: str, daemon_name: str, handle: Callable[[dict], Awaitable[None]],
                on_gap: Callable[[], Awaitable[None]]) -> None:
    """Deliver every insert/update of `collection` to `handle`, forever; cancel the task to stop."""
    tokens = db[defaults.LISTENER]
    key = f"resume:{daemon_name}:{collection}"
    backoff = 0.5
    while True:
        resume, opened = None, False
        try:
            saved = await tokens.find_one({"_id": key})
            resume = saved["token"] if saved else None
            async with await db[collection].watch(PIPELINE, full_document="updateLookup", resume_after=resume) as stream:
                opened = True
                await on_gap()
                backoff = 0.5
                async for change in stream:
                    await handle(change)
                    await tokens.update_one({"_id": key}, {"$set": {"token": stream.resume_token, "at": now()}},
                                            upsert=True)
        except PyMongoError as exc:
            refused = isinstance(exc, OperationFailure) and (exc.code in LOST_TOKEN_CODES or resume and not opened)
            if refused:
                log.warning("resume token for %s can no longer be used (%s); scanning for pending work instead",
                            collection, exc.details.get("codeName", exc.code) if exc.details else exc.code)
                await tokens.delete_one({"_id": key})
                continue
            log.warning("stream on %s broke (%s); reconnecting in %.1f s", collection, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
