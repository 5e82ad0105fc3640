"""Preloading (the operator's `preload_best`): a model's new best checkpoint is loaded for serving
before anyone asks, so the first request after a promotion or a finished run pays no load.

Best effort by design: this stream keeps no resume token, because a missed event costs one cold
start and nothing else, and `Serving` gives a preload the next turn between batches (or runs it at
once when idle), so a model under steady load delays it by one batch at most. A swap never
touches requests in flight: the worker answers one batch at a time, each batch with the checkpoint
it resolved, and the new one is simply the most recently used entry of its cache. Events come
through `listener.streams.watch`, so an unreadable or malformed one is skipped with a log line and
the stream goes on.
"""

import logging
from collections.abc import Callable

from listener import streams
from listener.status import Status
from training import defaults

log = logging.getLogger(__name__)

# Matched by the server, so the stream carries promotions only, not every progress write of a training.
# A write inside `best_checkpoint` (a dotted name such as `best_checkpoint.step`) is not matched: the
# listener always sets the whole field.
PIPELINE = [{"$match": {"$or": [
    {"operationType": "replace"},
    {"operationType": "update", "updateDescription.updatedFields.best_checkpoint": {"$exists": True}},
    {"operationType": "update", "updateDescription.updatedFields.status": Status.SUCCEEDED.value},
]}}]


async def watch_promotions(db, preload: Callable[[object], None]) -> None:
    """Hand the id of every promoted model to `preload`, forever; cancel the task to stop."""

    async def promoted(document: dict) -> None:
        preload(document["_id"])

    async def opened() -> None:
        log.info("watching %s for promoted checkpoints to preload", defaults.MODELS)

    await streams.watch(db, defaults.MODELS, None, promoted, opened, PIPELINE)
