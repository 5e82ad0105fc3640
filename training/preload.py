"""What the fork server imports once, so that every training child and serving worker forked from it
starts without the five seconds of a CPU that torch, transformers, peft and trl take (`listener.forks`).

Importing is all it does besides one thing: no thread, no CUDA, no connection, nothing a fork could
copy half-made. The one thing: the fork server dies with its daemon. Every child forked from it holds
the pipe whose end would tell it the daemon is gone, so it would outlive a SIGKILLed daemon, and
its children with it; the kernel's parent-death signal ends it instead, and theirs ends them.

The collector is paused while it imports (`training.collector`: a fifth of their CPU), and what the imports made is
then frozen: no collection in the server or in anything forked from it walks it again.
"""

from training import collector, lifeline

lifeline.die_with_parent()

with collector.paused():  # an import that fails is logged by the fork server, which goes on, collector back on
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import trl  # noqa: F401
    from trl import DPOTrainer, KTOTrainer  # noqa: F401  (0.04 s here, which a preference run would pay)

    from training import (arguments, child, dataset, inference, methods, models, phases, preferences,  # noqa: F401
                          progress, worker)
