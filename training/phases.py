"""Where a training job's time goes, phase by phase, kept in its run's entry (`runs[].phases`, seconds).

`start` is what the job waited for its process: from the daemon's asking for it to the first line of
the job (a fork from the daemon's preloaded fork server takes milliseconds; the first one waits for
that server's imports, a fresh interpreter for its own); then `check` (the document
and the model's size), `data` (the pull from MongoDB), `model` (tokenizer, weights, the padding-free check), `trainer` (tokenizing and wrapping in
LoRA), `train` (the loop, with the database writes and checkpoint uploads inside it also counted on
their own) and `end` (the promotion gate). A plain script pays all but the writes, uploads and gate.
"""

import time

import psutil


class Phases:
    def __init__(self, sent: float = 0.0):
        """`sent`: when the daemon asked for the job's process (epoch seconds); else the process's creation."""
        self.seconds = {"start": round(time.time() - (sent or psutil.Process().create_time()), 2)}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        """The phase `name` ended now."""
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 2)
        self._last = now
