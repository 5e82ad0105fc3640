"""What the fork server imports once, so that every training child and serving worker forked from it
starts without the five seconds of a CPU that torch, transformers, peft and trl take (`listener.forks`).

Importing is all it does besides one thing: no thread, no CUDA, no connection, nothing a fork could
copy half-made. The one thing: the fork server dies with its daemon. Every child forked from it holds
the pipe whose end would tell it the daemon is gone, so it would outlive a SIGKILLed daemon, and
its children with it; the kernel's parent-death signal ends it instead, and theirs ends them.

The collector is off while it imports (with torch's objects on the heap, each of the thousands of
collections the imports trigger walked all of them: a fifth of their CPU), and what the imports made is
then frozen: no collection in the server or in anything forked from it walks it again.
"""

import gc

from training import lifeline

lifeline.die_with_parent()

gc.disable()
try:  # the fork server logs an import that fails and goes on: the collector must be back on all the same
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import trl  # noqa: F401
    from trl import DPOTrainer, KTOTrainer  # noqa: F401  (0.04 s here, which a preference run would pay)

    from training import (arguments, child, dataset, inference, methods, models, phases, preferences,  # noqa: F401
                          progress, worker)
finally:
    gc.freeze()
    gc.enable()
