"""The one factory for the documents tests insert: a model trained on the sample chats, a request, a heartbeat."""

import sys

from listener.leases import alive_until
from training import defaults

QUICK = {"max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1, "max_seq_length": 64}
LONG = {**QUICK, "max_steps": 400, "save_steps": 10_000}  # long enough to be stopped or cancelled midway


def model(doc_id, path: str, trainer: dict = QUICK, **extra) -> dict:
    """A model document for `path`, trained on the `pirate_chat` samples (`listener.demo.load_samples`)."""
    return {"_id": doc_id, "model_name_or_path": path, "data": {"collection": "pirate_chat", "key": "messages"},
            "trainer": dict(trainer), **extra}


def request(doc_id, model_id, text: str = "ahoy", max_new_tokens: int = 2, **extra) -> dict:
    return {"_id": doc_id, "model": model_id, "input": text, "params": {"max_new_tokens": max_new_tokens}, **extra}


def heartbeat(db, owner: str = "d0:1") -> None:
    """A daemon's `_listener` record with a heartbeat now: what clients read to know a daemon serves `db`."""
    db[defaults.LISTENER].insert_one({"_id": owner, "kind": "daemon", "owner": owner, "name": owner, "host": "h",
                                      "pid": 1, "heartbeat_at": defaults.now(), "alive_until": alive_until(60)})


ANSWERS = {"MONGOTUNE_ANSWER_COLLECTIONS": "*"}  # an operator who lets answers be written into any data collection


def collection_request(doc_id, model_id, collection, **fields) -> dict:
    """A request over `collection` answering each document's `text` into `answer`, from the base model."""
    return {"_id": doc_id, "model": model_id, "collection": collection, "input": "{text}", "output_field": "answer",
            "checkpoint": "base", "params": {"max_new_tokens": 2}, **fields}


def nested(levels: int, value="x"):
    """`value` inside `levels` arrays: deeper than MongoDB stores (100), as the embedded server still stores it."""
    for _ in range(levels):
        value = [value]
    return value


def nested_document(levels: int, value="x") -> dict:
    """`value` inside `levels` objects: as an `_id`, the embedded server stores it and then fails any change stream
    whose event carries it (`internal server error`, code 1), and the driver decodes it only to its depth limit."""
    for _ in range(levels):
        value = {"k": value}
    return value


def insert_nested(collection, document: dict) -> None:
    """Insert a document nested far deeper than Python's recursion limit lets the driver encode it by default (a
    writer's own tools encode it: any driver, mongosh)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)
    try:
        collection.insert_one(document)
    finally:
        sys.setrecursionlimit(limit)
