"""Documents in a collection become an SFT dataset in one of trl's three shapes.

The shape is whatever the document's `data` section implies: a text field, a prompt/response
pair (optionally joined by a template into text), or chat `messages`. Every problem is reported
against the `data.*` field a user would change.
"""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING

from training.config import DataSpec, SpecError, check_collection_type
from training.hints import did_you_mean, fields_hint, user_collections
from training.lineage import data_read
from training.limits import Limits
from training.template import render, template_fields
from training.transforms import load as load_transform

if TYPE_CHECKING:  # `datasets` is imported where a dataset is built: `listener apply --dry-run` checks without it
    from datasets import Dataset

TEXT, PROMPT_COMPLETION, MESSAGES = "text", "prompt_completion", "messages"
ROLES = {"system", "user", "assistant"}


def detect_format(example: dict) -> str:
    """The shape of one example, the way trl reads it."""
    if "messages" in example:
        return MESSAGES
    if "prompt" in example and "completion" in example:
        return PROMPT_COMPLETION
    return TEXT


def read_collection(db, data: DataSpec, read):
    """What `read()` returns, read only from a collection: the name names the same collection before and after the
    read, never a view swapped in meanwhile (which would read anything with the daemon's rights)."""
    def listed():
        return db.list_collections(filter={"name": data.collection}).to_list()

    uuid = check_collection_type(listed(), "data.collection")
    result = read()
    check_collection_type(listed(), "data.collection", uuid)
    return result


def load_documents(db, data: DataSpec, limits: Limits) -> list[dict]:
    """The selected documents, at most the operator's cap; errors never show other documents' contents."""
    projection = {name: 1 for name in data.read_fields()} or None
    cap = min(data.limit or limits.max_documents, limits.max_documents)
    # In `_id` order, so the same documents always make the same dataset (and the run can be redone).
    documents = read_collection(db, data, lambda: list(db[data.collection].find(data.filter, projection,
                                                                                limit=cap + 1, sort=[("_id", 1)])))
    if len(documents) > cap and not data.limit:
        raise SpecError("data.limit", limits.refusal("max_documents", "the selection holds more documents, which")
                        + "; select fewer with data.filter or data.limit")
    if not documents:
        where = f"collection {data.collection!r}"
        if data.filter:
            raise SpecError("data.filter", f"no document in {where} matches the filter {data.filter}")
        names = user_collections(db, limits)  # None: not ours to list
        hint = did_you_mean(data.collection, names)
        if names is not None and data.collection not in names:
            raise SpecError("data.collection", f"there is no {where} in database {db.name!r}{hint}")
        raise SpecError("data.collection", f"{where} has no documents (check the name and the database){hint}")
    return documents[:cap]


def present_fields(db, data: DataSpec) -> str:
    """Which fields the selected documents do have, as a hint: when none has a field `data` names, the name is likely
    wrong."""
    return read_collection(db, data, lambda: fields_hint(db[data.collection], data.filter))


def _missing(db, documents: list[dict], data: DataSpec) -> None:
    for name in data.read_fields()[:-1]:
        lacking = [doc for doc in documents if name not in doc]
        if lacking:
            field = "data.template" if data.template and name in template_fields(data.template) else "data.key"
            hint = present_fields(db, data) if len(lacking) == len(documents) else ""
            raise SpecError(
                field,
                f"{len(lacking)} of {len(documents)} selected documents have no field {name!r}{hint}",
            )


def check_documents(db, data: DataSpec, limits: Limits) -> int:
    """What the daemon's training child checks first, without building a dataset: the selection has documents and
    the fields `data` names; how many documents it selects. Raises the same SpecError the training would."""
    documents = load_documents(db, data, limits)
    _missing(db, documents, data)
    return len(documents)


def is_messages(value) -> bool:
    """A non-empty list of {role: system|user|assistant, content: string}: chat as trl reads it."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value
    )


def clean_messages(messages: list[dict]) -> list[dict]:
    """Chat that `is_messages` accepted, each message its role and content only, as trl reads it."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _messages(value) -> list[dict]:
    if not is_messages(value):
        raise SpecError(
            "data.key",
            "chat messages must be a non-empty list of "
            "{role: system|user|assistant, content: string}",
        )
    return clean_messages(value)


def _transformed(doc: dict, data: DataSpec, transform) -> dict | None:
    try:
        example = transform(doc)
    except Exception as exc:
        raise SpecError("data.transform", f"{data.transform!r} failed on a selected document: "
                                          f"{type(exc).__name__}") from None
    shapes = ({"text"}, {"prompt", "completion"}, {"messages"})
    if example is not None and not (isinstance(example, dict) and set(example) in shapes):
        raise SpecError("data.transform", f"{data.transform!r} returned {type(example).__name__} for a selected "
                                          "document; a transform returns {text}, "
                                          "{prompt, completion}, {messages} or None")
    return example


def to_example(doc: dict, data: DataSpec, transform=None) -> dict | None:
    if transform is not None:
        return _transformed(doc, data, transform)
    if data.template:
        return {"text": render(data.template, doc)}
    if isinstance(data.key, list):
        prompt, response = data.key
        return {"prompt": str(doc[prompt]), "completion": str(doc[response])}
    value = doc[data.key]
    if isinstance(value, str):
        return {"text": value}
    if isinstance(value, list):
        return {"messages": _messages(value)}
    raise SpecError(
        "data.key",
        f"field {data.key!r} of a selected document is {type(value).__name__}: "
        f"use a string field for text or a list of messages for chat",
    )


def split_folds(documents: list[dict], data: DataSpec) -> tuple[list[dict], list[dict]]:
    """`fold_field` decides when the documents carry it; otherwise a seeded split."""
    if any(data.fold_field in doc for doc in documents):
        valid = [doc for doc in documents if doc.get(data.fold_field) == "valid"]
        train = [doc for doc in documents if doc.get(data.fold_field) != "valid"]
    else:
        shuffled = documents[:]
        random.Random(data.seed).shuffle(shuffled)
        n_valid = int(len(shuffled) * data.valid_fraction) if len(shuffled) >= 10 else 0
        valid, train = shuffled[:n_valid], shuffled[n_valid:]
    if not train:
        raise SpecError("data.fold_field", f"every document is in the 'valid' fold; mark some {data.fold_field}: 'train'")
    return train, valid


def build_datasets(db, data: DataSpec, limits: Limits) -> tuple[Dataset, Dataset | None]:
    return read_datasets(db, data, limits)[:2]


def read_datasets(db, data: DataSpec, limits: Limits) -> tuple[Dataset, Dataset | None, dict]:
    """The datasets, and what was read for them (`training.lineage.data_read`) for the run's entry."""
    from datasets import Dataset

    documents = load_documents(db, data, limits)
    _missing(db, documents, data)
    train, valid = split_folds(documents, data)
    transform = load_transform(data.transform) if data.transform else None
    examples = [[e for e in (to_example(doc, data, transform) for doc in fold) if e is not None]
                for fold in (train, valid)]
    if not examples[0]:
        raise SpecError("data.transform", f"{data.transform!r} left out every training document")
    formats = {detect_format(example) for fold in examples for example in fold}
    if len(formats) > 1:
        raise SpecError("data.key", f"the documents mix shapes {sorted(formats)}; select one shape with data.filter")
    train_set = Dataset.from_list(examples[0])
    read = data_read(data.collection, data.filter, documents)
    return train_set, Dataset.from_list(examples[1]) if examples[1] else None, read


GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")  # how a chat template marks the assistant's tokens


def check_loss_options(assistant_only_loss: bool, train_set: Dataset, tokenizer) -> None:
    """`assistant_only_loss` needs chat data and a chat template that marks the assistant's turns."""
    if not assistant_only_loss:
        return
    field = "trainer.assistant_only_loss"
    if detect_format(train_set[0]) != MESSAGES:
        raise SpecError(field, "applies to chat data only (data.key naming a list of messages); remove it, or "
                               "use completion_only_loss for prompt/response data")
    if not GENERATION_BLOCK.search(tokenizer.chat_template or ""):
        raise SpecError(field, "this model's chat template does not mark the assistant's turns with "
                               "{% generation %}, so the loss cannot be limited to them; remove assistant_only_loss")
