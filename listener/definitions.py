"""Writing model definitions: the one path `submit`, `apply` and the Python client share.

A new `_id` is inserted. An existing one is refused, unless the caller asks to replace it: then the
new definition becomes the model's next run, as a person fixing a mistake expects, its runs and
checkpoints kept. What changed is recorded (`changed`, dotted paths of the user's fields) and
copied into that run's entry; a change of base model or LoRA shape makes the run start from the
base, since the serving adapter no longer fits (`training.starting.continued`).
"""

from bson import json_util
from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError, OperationFailure

from listener.status import BAD_VALUE, FINAL, MODEL_TRANSITIONS, Status, query_for, update_for
from training import ids
from training.config import LISTENER_FIELDS, SpecError
from training.lineage import MAX_CHANGED, MAX_PATH_CHARS

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

    The stored document is anyone's to write: its status may be of any type, its `events` anything, its
    fields many. `changed` is kept bounded (`recorded`); a change of base or LoRA shape also drops
    `best_checkpoint`, so that no later run continues from, nor is gated against, an adapter that no longer
    fits (decided here, on every changed path, not on the bounded list a run's entry copies).
    """
    from training.starting import refitting

    current = models.find_one({"_id": ids.eq(document["_id"])})
    if current is None:
        insert_model(models, document)
        return document, None
    status = current.get("status") or Status.PENDING.value
    if not isinstance(status, str):
        raise Busy(f"model {document['_id']!r} has a status the listener never writes ({type(status).__name__}); "
                   f"look at it with `listener status {id_text(document['_id'])}`")
    old, new = _user_part(current), _user_part(document)
    found = changes(old, new)
    changed = recorded(found, new)
    fields = {**new, "changed": changed}
    unset = tuple(name for name in old if name not in new) + (("best_checkpoint",) if refitting(found) else ())
    if status in {s.value for s in FINAL}:  # the one status change, built as `transition` builds it
        cancel = () if "cancel" in new else ("cancel",)  # a definition may say `cancel: false`: set, not also unset
        update = update_for(Status(status), Status.PENDING, MODEL_TRANSITIONS, fields={**fields, **DEFINITION},
                            unset=unset + cancel, event={"kind": "definition_changed", "changed": changed})
        query = query_for(document["_id"], Status(status), {"run": current.get("run")})
        try:
            moved = models.find_one_and_update(query, update, return_document=ReturnDocument.AFTER)
        except OperationFailure as exc:  # a writer put something other than a list in `events`, as `transition` sees
            if exc.code != BAD_VALUE or "'events'" not in str(exc):
                raise
            update["$set"]["events"] = update.pop("$push")["events"]["$each"]
            moved = models.find_one_and_update(query, update, return_document=ReturnDocument.AFTER)
    elif status == Status.PENDING.value and not current.get("started_at"):  # never claimed: nothing to resume
        update = {"$set": fields, **({"$unset": {name: "" for name in unset}} if unset else {})}
        # Nothing but a status change moves the fence of a model never claimed: the document itself is the fence,
        # so that two replaces that read it at once do not both land, the second merged into the first.
        moved = models.find_one_and_update({"_id": ids.eq(document["_id"]),
                                            "$expr": {"$eq": ["$$ROOT", {"$literal": current}]}},
                                           update, return_document=ReturnDocument.AFTER)
    else:
        run = current.get("run")
        raise Busy(f"model {document['_id']!r} is {status} (run {run}): its definition cannot change while a run is "
                   f"under way; `listener cancel {id_text(document['_id'])}` first, or wait for it to end")
    if moved is None:
        raise Busy(f"model {document['_id']!r} changed while this ran; look again with `listener status`")
    return moved, changed


def recorded(found: list[str], new: dict) -> list[str]:
    """The changed paths as the document, its event and the run's entry record them: at most `MAX_CHANGED`, each
    cut at `MAX_PATH_CHARS`; past that many, a change of base or LoRA shape is kept first, then the fields this
    definition writes, then the fields it drops (which anyone may have left on the document, any number of them)."""
    from training.starting import refitting

    def rank(i: int) -> int:
        return 0 if refitting([found[i]]) else 1 if found[i].split(".", 1)[0] in new else 2

    kept = set(sorted(range(len(found)), key=rank)[:MAX_CHANGED])
    return [path[:MAX_PATH_CHARS] for i, path in enumerate(found) if i in kept]  # in the order `changes` found


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
