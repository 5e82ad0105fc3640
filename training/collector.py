"""Importing with Python's garbage collector paused: the modules a process imports make many thousands of objects
and no garbage, so each collection the imports trigger walks all of them (a fifth to a third of their CPU). Paused
meanwhile, and what they made frozen after, they cost less, and no later collection in a long-lived process (a
daemon, the fork server, a test worker) walks them again."""

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Run the block with the collector off; then freeze what exists and turn it back on, whatever the block raised."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()
