"""Which claimed requests generate together, and when a batch starts: the serving loop's scheduling.

Requests wait in one queue per model (keyed by `ids.key`), oldest first; models take turns, one batch
each, and a batch holds only requests that generate alike (same normalised parameters, same
`timeout_s`). Once a model's base is known (`Queues.bases`, filled when its document is read), the batch
is topped up with alike requests of other models of the same base. What is held here (queued or
generating) is what this daemon claims more against: `free` in all, `room_for` one share, so one
model's flood never takes every place. Requests over a collection (`collection` given) run for as
long as they have documents to answer, and watching ones until cancelled, so they count against
places of their own (`max_collection_jobs`, and `max_collection_jobs_per_model` for one model over one
collection: anyone may name any model, so requests over one collection never take the places of that
model's requests over another; the places are the named collection's, not its writer's, and anyone may name
any collection listed for answers, so another writer's requests can fill a model's places over yours):
long-lived work never takes an interactive request's place, nor the other way round. Every batch waits until
the requests inserted with its first one are claimed (`Arrivals`), a full one too (another model's request
arriving meanwhile is claimed before the next batch is chosen), never longer than the operator's
`batch_window_s`.
"""

import asyncio
import json
import time
from collections import deque
from collections.abc import Container
from dataclasses import dataclass, field

from listener.settings import Settings
from training import ids
from training.config import RequestSpec
from training.inference import normalised

ARRIVAL_GAP_S = 0.02  # a pause in request arrivals this long ends a batch's wait for more (see `Arrivals`)


@dataclass(eq=False)
class Queued:
    spec: RequestSpec
    since: float = field(default_factory=time.monotonic)

    @property
    def batch_key(self) -> str:
        """Requests with equal keys may be answered by one `generate` call, whatever their checkpoints."""
        return json.dumps([normalised(self.spec.params), self.spec.timeout_s], sort_keys=True)

    @property
    def checkpoint_key(self) -> str:
        ref = self.spec.checkpoint if isinstance(self.spec.checkpoint, str) else self.spec.checkpoint.model_dump()
        return ids.key([self.spec.model, ref])

    @property
    def prompt(self):
        return self.spec.input if isinstance(self.spec.input, str) else [m.model_dump() for m in self.spec.input]


class Arrivals:
    """Change events on `_requests` being handled now (entered by `streams.watch` and the daemon's scans).

    A batch waits until no event is being handled and none has arrived for a gap, instead of a fixed
    pause: a server may deliver the events of one `insert_many` a getMore apart (the embedded one does,
    milliseconds each, more on a busy machine), so the batch holds every request inserted together, and a
    lone one starts after `ARRIVAL_GAP_S` rather than the whole window. The gap is twice the longest pause
    seen so far in this wait, if longer, so a slow stream does not split a burst. No gap at all once the
    last claim round saw every pending request (`all_claimed`, until the next event or claim round begins:
    each enters here): the requests inserted with the batch's are in it already (an `insert_many` is visible
    whole on the embedded server), so a lone request is generated as soon as it is claimed.
    """

    def __init__(self):
        self._handling = 0
        self._settled, self._arrived = asyncio.Event(), asyncio.Event()
        self._settled.set()
        self._all_claimed = False

    def __enter__(self) -> None:
        self._handling += 1
        self._settled.clear()
        self._arrived.set()
        self._all_claimed = False

    def all_claimed(self) -> None:
        """The claim round now ending saw every pending request (its finds came back short of their limits)."""
        self._all_claimed = True

    def __exit__(self, *exc) -> None:
        self._handling -= 1
        if not self._handling:
            self._settled.set()

    async def settled(self, window_s: float) -> None:
        """Once the arrivals pause, or after `window_s` (the operator's batching wait) at most."""
        deadline, gap = time.monotonic() + window_s, ARRIVAL_GAP_S
        while await _within(self._settled, deadline - time.monotonic()):
            if self._all_claimed:
                return
            self._arrived.clear()
            paused = time.monotonic()
            if not await _within(self._arrived, min(gap, deadline - time.monotonic())):
                return
            gap = max(gap, 2 * (time.monotonic() - paused))


async def _within(event: asyncio.Event, seconds: float) -> bool:
    """Whether `event` is set within `seconds`."""
    try:
        await asyncio.wait_for(event.wait(), max(seconds, 0.0))
    except TimeoutError:
        return False
    return True


def share_of(model, collection: str | None = None):
    """Whose places a request takes: its model's, and for a request over a collection, its model's over that
    collection (the collection being whose data it is). The intake applies it to pending documents before
    they are parsed, this module to claimed requests."""
    return model if collection is None else [model, collection]


class Queues:
    """The requests held here: queued per model, taking turns, or generating."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._queues: dict[str, deque[Queued]] = {}  # by ids.key of the model, oldest first
        self._turns: deque[str] = deque()  # models with queued requests, the next to be served first
        self._held: dict[str, RequestSpec] = {}  # queued or generating, by ids.key of the request
        self.bases: dict[str, str] = {}  # model key -> key of its base (source, kwargs, quantisation), once read

    def queued(self) -> dict[str, int]:
        """Requests waiting here, by model key (for metrics)."""
        return {model: len(queue) for model, queue in self._queues.items()}

    def held(self) -> Container[str]:
        """The requests queued or generating here, by `ids.key`: their leases are this daemon's to renew."""
        return self._held.keys()

    def held_ids(self) -> list:
        return [spec.id for spec in self._held.values()]

    def free(self, collection: bool = False) -> int:
        """How many more requests of this kind (over a collection or not) to claim; what this daemon cannot answer
        soon stays pending for another."""
        cap = self.settings.max_collection_jobs if collection else self.settings.max_queued_requests
        return cap - len(self._of_kind(collection))

    def room_for(self, share, collection: bool = False) -> int:
        """How many more requests of this kind and share (`share_of`) to claim: one model's flood never takes
        every place, nor one collection's every place of a model."""
        cap = self.settings.max_collection_jobs_per_model if collection else self.settings.max_queue_per_model
        wanted = ids.key(share)
        return cap - sum(1 for held in self._shares(collection) if ids.key(held) == wanted)

    def full(self, collection: bool = False) -> list:
        """The shares (`share_of`) with no room left here for requests of this kind."""
        held = {ids.key(share): share for share in self._shares(collection)}
        return [share for share in held.values() if self.room_for(share, collection) <= 0]

    def _of_kind(self, collection: bool) -> list[RequestSpec]:
        return [spec for spec in self._held.values() if (spec.collection is not None) == collection]

    def _shares(self, collection: bool) -> list:
        """The share of each request of this kind held here, one per request."""
        return [share_of(spec.model, spec.collection) for spec in self._of_kind(collection)]

    def hold(self, spec: RequestSpec) -> bool:
        """Count a claimed request as held here; False if it already is (claimed again while held)."""
        key = ids.key(spec.id)
        if key in self._held:
            return False
        self._held[key] = spec
        return True

    def release(self, request_id) -> None:
        self._held.pop(ids.key(request_id), None)

    def enqueue(self, spec: RequestSpec) -> None:
        model = ids.key(spec.model)
        if model not in self._queues:
            self._queues[model] = deque()
            self._turns.append(model)
        self._queues[model].append(Queued(spec))

    def waiting(self) -> bool:
        return bool(self._turns)

    def next_batch(self) -> list[Queued]:
        """From the model whose turn it is: its oldest request and the next ones that generate alike."""
        model = self._turns.popleft()
        queue = self._queues.pop(model)
        key = queue[0].batch_key
        batch = [item for item in queue if item.batch_key == key][: self.settings.max_batch]
        rest = deque(item for item in queue if item not in batch)
        if rest:
            self._queues[model] = rest
            self._turns.append(model)
        return batch + self._same_base(model, key, self.settings.max_batch - len(batch))

    def _same_base(self, model: str, key: str, room: int) -> list[Queued]:
        """Up to `room` requests of other models of `model`'s base that generate alike, oldest model first."""
        base, taken = self.bases.get(model), []
        for other in list(self._turns):
            if base is None or len(taken) >= room:
                break
            if other == model or self.bases.get(other) != base:
                continue
            queue = self._queues[other]
            mine = [item for item in queue if item.batch_key == key][: room - len(taken)]
            taken += mine
            left = deque(item for item in queue if item not in mine)
            if left:
                self._queues[other] = left
            else:
                del self._queues[other]
                self._turns.remove(other)
        return taken
