"""The turns the retrain and feedback passes share (`listener.turns`): models in the order first seen, and the longest
waiting first, a few a pass."""

from listener.turns import Queue, Sightings


def test_a_newcomer_comes_after_every_model_seen_before_it_whatever_its_id():
    sightings = Sightings()
    assert sightings.order({"y", "x"}) == ["x", "y"]  # seen together: by key
    assert sightings.order({"y", "x", "a"}) == ["x", "y", "a"]
    assert sightings.order(["a", "y"]) == ["y", "a"]  # x left...
    assert sightings.order({"a", "x", "y"}) == ["y", "a", "x"]  # ...and came back a newcomer


def test_a_key_waits_from_the_first_pass_that_wanted_it_and_is_forgotten_once_not_waiting():
    """As a data.filter waits for its first try: a new (or edited) one queues behind those waiting already."""
    queue = Queue(per_pass=1)
    assert queue.turns(["a", "b"]) == ["a"]  # both wait from pass 1: in the order given
    assert queue.turns(["c", "b"]) == ["b"]  # a tried; c waits from pass 2
    assert queue.turns(["d", "c"]) == ["c"]  # d, listed first, waits from pass 3
    assert queue.turns(["b", "d"]) == ["d"]  # b was not waiting in pass 3: it waits anew, from pass 4
    assert "c" not in queue and "b" in queue


def test_keys_that_had_their_turn_and_wait_again_take_turns_the_longest_waiting_first():
    """As slow models do: each waits again from the pass of its turn, so they take turns one a pass."""
    queue, slow, taken = Queue(per_pass=1), ["p", "q", "r"], []
    queue.turns([])
    for key in slow:  # all slow after the first pass
        queue.wait(key)
    for _ in range(4):
        [key] = queue.turns(slow)
        queue.wait(key)
        taken.append(key)
    queue.leave("p")
    assert taken == ["p", "q", "r", "p"] and "p" not in queue
