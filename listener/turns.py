"""Who goes first when a daemon's bounds leave room for only some models: one rule for the retrain and feedback passes.

`Sightings` orders models by when this daemon first saw them, never by id: the models a daemon follows within its
bound are the first ones in that order, so a newcomer never takes the place of a model followed before it, whatever
its id (by id, anyone who may insert a model could push a followed one out with an id that sorts first). Models first
seen in one pass are ordered among themselves by key; one that leaves (deleted, failed) and comes back is a newcomer.

`Queue` hands out what only a few may have each pass (a new filter's first try, a turn of a slow model), the longest
waiting first: a key waits from the pass that first wanted it, so however many keys one writer makes wait, or keeps
renewing, every other key gets its turn within a bounded number of passes.
"""

from collections.abc import Hashable, Iterable


class Sightings:
    """Keys in the order first seen."""

    def __init__(self):
        self.numbers: dict[str, int] = {}  # by key: its place in the order
        self.next = 0  # the number the next key seen gets

    def remember(self, keys: Iterable[str]) -> None:
        """Take `keys` as seen before any other, in their order (a restarted daemon's order, as it stored it)."""
        for key in keys:
            if key not in self.numbers:
                self.numbers[key], self.next = self.next, self.next + 1

    def order(self, keys: Iterable[str]) -> list[str]:
        """`keys` (those present now) in the order first seen: the new ones last, by key; the absent ones forgotten."""
        keys = set(keys)
        for key in sorted(keys - self.numbers.keys()):
            self.numbers[key], self.next = self.next, self.next + 1
        self.numbers = {key: n for key, n in self.numbers.items() if key in keys}
        return sorted(self.numbers, key=self.numbers.__getitem__)


class Queue:
    """Keys waiting for what `per_pass` of them get a pass, the longest waiting first."""

    def __init__(self, per_pass: int):
        self.per_pass = per_pass
        self.passes = 0
        self.since: dict[Hashable, int] = {}  # by key waiting: the pass it waits from

    def turns(self, waiting: Iterable[Hashable]) -> list:
        """Start a pass: the at most `per_pass` keys of `waiting` that have waited longest (ties in `waiting`'s order).
        A key not waiting before waits from this pass; one no longer in `waiting` is forgotten."""
        self.passes += 1
        waiting = list(waiting)
        self.since = {key: self.since.get(key, self.passes) for key in waiting}
        return sorted(waiting, key=self.since.__getitem__)[:self.per_pass]

    def wait(self, key: Hashable) -> None:
        """`key` waits again from this pass (it just had its turn), behind every key waiting from an earlier one."""
        self.since[key] = self.passes

    def leave(self, key: Hashable) -> None:
        self.since.pop(key, None)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.since
