"""Custom transforms: functions the operator installed and registered by name, never code from a document.

A document may only name one (`data.transform: "chat_from_pairs"`). An operator registers more as
entry points in the `mongotune.transforms` group of any installed package:

    [project.entry-points."mongotune.transforms"]
    support_tickets = "mycompany.tuning:ticket_to_chat"

A transform takes one document and returns one example in a shape trl reads (`{"text"}`,
`{"prompt", "completion"}` or `{"messages"}`), or None to leave the document out.
"""

from importlib.metadata import entry_points

GROUP = "mongotune.transforms"


def registered() -> dict:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def check(name: str) -> None:
    """KeyError, with the names on offer, unless `name` is registered."""
    available = registered()
    if name not in available:
        raise KeyError(f"no transform {name!r} is registered on this listener (registered: "
                       f"{', '.join(sorted(available)) or 'none'}); an operator registers one as an entry point "
                       f"in the {GROUP!r} group")


def load(name: str):
    check(name)
    return registered()[name].load()


def chat_from_pairs(document: dict) -> dict:
    """`prompt`/`response` fields as a two-turn chat, so an instruct model trains through its chat template."""
    return {"messages": [{"role": "user", "content": str(document["prompt"])},
                         {"role": "assistant", "content": str(document["response"])}]}
