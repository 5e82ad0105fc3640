"""Preloading (the operator's `preload_best`): a model's new best checkpoint is loaded for serving
before anyone asks, so the first request after a promotion or a finished run pays no load.

Best effort by design: this stream keeps no resume token, because a missed event costs one cold
start and nothing else, and `Serving` runs a preload only while no request waits. A swap never
touches requests in flight: the worker answers one batch at a time, each batch with the checkpoint
it resolved, and the new one is simply the most recently used entry of its cache.
"""

import asyncio
import logging
from collections.abc import Callable

from pymongo.errors import PyMongoError

from listener.status import Status
from training import defaults

log = logging.getLogger(__name__)

PIPELINE = [{"$match": {"operationType": {"$in": ["update", "replace"]}}}]


def promoted(change: dict) -> bool:
    """A new best checkpoint (any write under `best_checkpoint`) or a run that ended well."""
    if change["operationType"] == "replace":
        return True
    fields = (change.get("updateDescription") or {}).get("updatedFields") or {}
    return fields.get("status") == Status.SUCCEEDED or any(name.split(".")[0] == "best_checkpoint" for name in fields)


async def watch_promotions(db, preload: Callable[[object], None]) -> None:
    """Hand the id of every promoted model to `preload`, forever; cancel the task to stop."""
    backoff = 0.5
    while True:
        try:
            async with await db[defaults.MODELS].watch(PIPELINE) as stream:
                log.info("watching %s for promoted checkpoints to preload", defaults.MODELS)
                backoff = 0.5
                async for change in stream:
                    if promoted(change):
                        preload(change["documentKey"]["_id"])
        except PyMongoError as exc:
            log.warning("preload stream on %s broke (%s); reconnecting in %.1f s", defaults.MODELS, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
