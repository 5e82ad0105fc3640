"""Which claimed requests make a batch (`listener.batching.Queues`): turns across models, alike requests
together, other models of one base topping a batch up, the room that caps what a daemon claims, and when a
batch starts (`Arrivals`)."""

import asyncio

from listener.batching import Arrivals, Queues
from listener.settings import Settings
from training.config import parse_request
from training.limits import Limits


def spec(doc_id, model, temperature: float = 0.0):
    params = {"max_new_tokens": 2, **({"do_sample": True, "temperature": temperature} if temperature else {})}
    return parse_request({"_id": doc_id, "model": model, "input": "hi", "params": params}, Limits())


def queues(**options) -> Queues:
    return Queues(Settings.load(options, environ={}))


def ids_of(batch) -> list:
    return [item.spec.id for item in batch]


def test_models_take_turns_and_a_batch_holds_only_requests_that_generate_alike():
    q = queues(max_batch=2)
    for request in (spec("a1", "a"), spec("a2", "a", 0.7), spec("a3", "a"), spec("a4", "a"), spec("b1", "b")):
        assert q.hold(request)
        q.enqueue(request)
    assert ids_of(q.next_batch()) == ["a1", "a3"]  # a2 samples: another batch
    assert ids_of(q.next_batch()) == ["b1"]  # b's turn before a's second batch
    assert ids_of(q.next_batch()) == ["a2"]
    assert ids_of(q.next_batch()) == ["a4"] and not q.waiting()


def test_other_models_of_the_same_base_top_a_batch_up_once_the_base_is_known():
    q = queues(max_batch=3)
    for request in (spec("a1", "a"), spec("b1", "b"), spec("b2", "b"), spec("c1", "c")):
        q.hold(request)
        q.enqueue(request)
    q.bases.update({'"a"': "base-1", '"b"': "base-1", '"c"': "base-2"})
    assert ids_of(q.next_batch()) == ["a1", "b1", "b2"]
    assert ids_of(q.next_batch()) == ["c1"]


def test_what_is_held_caps_what_is_claimed_in_all_and_per_model():
    q = queues(max_queued_requests=3, max_queue_per_model=2)
    for request in (spec("a1", "a"), spec("a2", "a"), spec("b1", "b")):
        assert q.hold(request)
    assert not q.hold(spec("a1", "a")), "a request claimed again while held is held once"
    assert q.free() == 0 and q.room_for("a") == 0 and q.room_for("b") == 1 and q.full() == ["a"]
    q.release("a1")
    assert q.free() == 1 and q.room_for("a") == 1 and q.full() == []


def test_once_a_claim_round_saw_every_pending_request_the_batch_starts_without_the_arrival_gap():
    """A lone request is generated as soon as its claim ends: `settled` returns on the next turns of the loop, no
    timer involved. An event after it is waited for again."""
    async def turns(n: int = 50) -> None:
        for _ in range(n):
            await asyncio.sleep(0)

    async def body() -> tuple[bool, bool, bool]:
        arrivals = Arrivals()
        with arrivals:  # the claim round: it saw every pending request
            waiting = asyncio.create_task(arrivals.settled(window_s=60))
            await turns()
            during = waiting.done()
            arrivals.all_claimed()
        await turns()
        after_complete_round = waiting.done()
        with arrivals:  # an event arrives after it: its round may bring more, and is waited for
            gap = asyncio.create_task(arrivals.settled(window_s=60))
            await turns()
            waits_again = not gap.done()
        await asyncio.wait_for(gap, 30)
        return during, after_complete_round, waits_again

    assert asyncio.run(body()) == (False, True, True)
