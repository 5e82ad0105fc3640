"""A model's `events`: what happened to its jobs and when, newest last, bounded.

Written by the daemon (claims, releases, expiries, final statuses) and by the training child
(resumes, stored checkpoints, stop requests), always as one `$push` that keeps the newest
`KEEP`, so the list never grows without bound however long a model lives.
"""

from training.defaults import now

KEEP = 100  # events kept per model document
KINDS = frozenset({
    "claimed", "resumed", "checkpoint_stored", "stop_requested", "lease_expired", "node_lost", "released", "promoted",
    "retrain_requested", "definition_changed", "failed", "succeeded", "cancelled", "nothing_to_train",
})


def event(kind: str, **details) -> dict:
    """One entry: `{at, kind, ...details}`; details are plain values (owner, run, step, error type)."""
    if kind not in KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    return {"at": now(), "kind": kind, **details}


def push(*entries: dict) -> dict:
    """The `$push` clause that appends `entries` and keeps the newest `KEEP`."""
    return {"events": {"$each": list(entries), "$slice": -KEEP}}
