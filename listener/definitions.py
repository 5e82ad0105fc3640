"""Writing model definitions: the one path `submit`, `apply` and the Python client share.

A new `_id` is inserted. An existing one is refused, unless the caller asks to replace it: then the
new definition becomes the model's next run, as a person fixing a mistake expects, its runs and
checkpoints kept. What changed is recorded (`changed`, dotted paths of the user's fields) and
copied into that run's entry; a change of base model or LoRA shape makes the run start from the
base, since the serving adapter no longer fits (`training.starting.continued`).
"""

from bson import json_util
from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from listener.status import FINAL, MODEL_TRANSITIONS, Status, query_for, update_for
from training import ids
from training.config import LISTENER_FIELDS, SpecError

DEFINITION = {"trigger": "definition"}  # why the next run starts (`training.lineage.trigger_of`)


class Busy(ValueError):
    """The model is training, or about to resume a run: its definition cannot change under it."""


def insert_model(models, document: dict):
    """Insert a checked model definition; its `_id`. A taken `_id` is a SpecError, as a misspelt field is: nothing
    was written, and the message says what to do (every client inserts here, so they all say the same)."""
    try:
        return models.insert_one(document).inserted_id
    except DuplicateKeyError:
        shown = id_text(document.get("_id"))
        raise SpecError("_id", f"a model with _id {document.get('_id')!r} is already in {models.database.name}."
                        f"{models.name}: submit it with --replace (replace=True in Python) to make this definition "
                        f"its next run, choose another _id, or remove it first (`listener delete {shown}`)") from None


def replace_model(models, document: dict) -> tuple[dict, list[str] | None]:
    """Make a checked definition the next run of the model with its `_id` (inserted if there is none).

    Returns the document as it now is and the changed fields (None: it was inserted). `Busy` while the
    model trains or waits to resume an interrupted run.
    """
    current = models.find_one({"_id": ids.eq(document["_id"])})
    if current is None:
        insert_model(models, document)
        return document, None
    status = current.get("status") or Status.PENDING.value
    old, new = _user_part(current), _user_part(document)
    changed = changes(old, new)
    fields = {**new, "changed": changed}
    unset = tuple(name for name in old if name not in new)
    if status in {s.value for s in FINAL}:  # the one status change, built as `transition` builds it
        update = update_for(Status(status), Status.PENDING, MODEL_TRANSITIONS, fields={**fields, **DEFINITION},
                            unset=unset + ("cancel",), event={"kind": "definition_changed", "changed": changed})
        moved = models.find_one_and_update(query_for(document["_id"], Status(status), {"run": current.get("run")}),
                                           update, return_document=ReturnDocument.AFTER)
    elif status == Status.PENDING.value and not current.get("started_at"):  # never claimed: nothing to resume
        update = {"$set": fields, **({"$unset": {name: "" for name in unset}} if unset else {})}
        moved = models.find_one_and_update({"_id": ids.eq(document["_id"]), "status": current.get("status"),
                                            "run": current.get("run"), "started_at": current.get("started_at")},
                                           update, return_document=ReturnDocument.AFTER)
    else:
        run = current.get("run")
        raise Busy(f"model {document['_id']!r} is {status} (run {run}): its definition cannot change while a run is "
                   f"under way; `listener cancel {id_text(document['_id'])}` first, or wait for it to end")
    if moved is None:
        raise Busy(f"model {document['_id']!r} changed while this ran; look again with `listener status`")
    return moved, changed


def changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the fields that differ between two definitions, objects compared field by field."""
    found = []
    for name in sorted(set(old) | set(new), key=str):
        path = f"{prefix}{name}"
        a, b = old.get(name), new.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            found += changes(a, b, f"{path}.")
        elif a != b or (name in old) != (name in new):
            found.append(path)
    return found


def replaced(document: dict, changed: list[str] | None, where: str) -> str:
    """What `replace_model` did, in one line."""
    from training.starting import next_start

    if changed is None:
        return f"inserted model {document['_id']!r} into {where}"
    what = f"changed: {', '.join(changed)}" if changed else "the same definition"
    return f"replaced the definition of model {document['_id']!r} ({what}); pending: {next_start(document)}"


def id_text(model_id) -> str:
    """The model id as a user types it back: a string as is, anything else as quoted extended JSON."""
    return model_id if isinstance(model_id, str) else f"'{json_util.dumps(model_id)}'"


def _user_part(document: dict) -> dict:
    return {k: v for k, v in document.items() if k not in LISTENER_FIELDS and k != "_id"}
