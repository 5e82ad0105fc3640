"""Documents in a collection become a preference dataset: DPO pairs or KTO's labelled examples.

`data.key` names three fields of each document, in the order of `training.config.KEYS`: the prompt and
the two answers (`dpo`: chosen, rejected), or the prompt, one answer and its label (`kto`: a bool, or
a number whose sign says good or bad). Each field is text, or chat messages as SFT reads them; when any
usable document is chat, every example is (a text prompt becomes the user's turn, a text answer the
assistant's), so trl sees one shape. A document of another shape is skipped and counted by reason, for
the run's entry (the reasons are few: one per check and named field); a run left with fewer than `MIN_ROWS`
usable training examples fails naming `data.key`, in the dry run (`check_documents`) as in the run.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import TYPE_CHECKING

from training.config import DPO, KEYS, DataSpec, SpecError
from training.dataset import clean_messages, is_messages, load_documents, present_fields, split_folds
from training.lineage import data_read
from training.limits import Limits

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)

MIN_ROWS = 2  # usable training examples a run needs at least: KTO's KL term pairs each with a neighbour


class Skipped(Exception):
    """One document that is not of the method's shape; the message is the reason counted."""


def _part(doc: dict, field: str):
    if field not in doc:
        raise Skipped(f"no field {field!r}")
    value = doc[field]
    if isinstance(value, str) and value.strip():
        return value
    if is_messages(value):
        return clean_messages(value)
    raise Skipped(f"field {field!r} is neither non-empty text nor a list of {{role, content}} messages")


def label(value) -> bool:
    """KTO's label: a bool, or a finite nonzero number whose sign says good (positive) or bad."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and math.isfinite(value) and value != 0:
        return value > 0
    raise Skipped("label is neither a bool nor a nonzero number")


def to_row(doc: dict, method: str, key: list[str], chat: bool = True) -> dict:
    """One document as a row of trl's preference format; `Skipped` when it is not of the method's shape, or holds
    chat messages where the model has no chat template (`chat` false) to render them with."""
    names = KEYS[method]
    if method == DPO:
        row = {name: _part(doc, field) for name, field in zip(names, key)}
        # A text answer and the same answer as one assistant message are twins once shaped.
        if _turn("chosen", row["chosen"]) == _turn("rejected", row["rejected"]):
            raise Skipped("chosen and rejected are the same")
    else:
        prompt, completion, rated = key
        if rated not in doc:
            raise Skipped(f"no field {rated!r}")
        row = {"prompt": _part(doc, prompt), "completion": _part(doc, completion), "label": label(doc[rated])}
    if not chat and any(isinstance(value, list) for value in row.values()):
        raise Skipped("chat messages, and the model's tokenizer has no chat template to render them")
    return row


def _turn(name: str, value):
    """A text part as chat: the prompt the user's turn, an answer the assistant's; chat and labels stay."""
    if not isinstance(value, str):
        return value
    return [{"role": "user" if name == "prompt" else "assistant", "content": value}]


def one_shape(rows: list[dict]) -> list[dict]:
    """All text, or all chat when any row is chat."""
    if any(isinstance(value, list) for row in rows for value in row.values()):
        return [{name: _turn(name, value) for name, value in row.items()} for row in rows]
    return rows


def _rows(documents: list[dict], method: str, key: list[str], chat: bool = True
          ) -> tuple[list[tuple[dict, dict]], Counter]:
    usable, reasons = [], Counter()
    for doc in documents:
        try:
            usable.append((doc, to_row(doc, method, key, chat)))
        except Skipped as why:
            reasons[str(why)] += 1
    return usable, reasons


def _too_few(db, data: DataSpec, method: str, documents: list[dict], usable: int, train: int, reasons: Counter
             ) -> SpecError:
    names = ", ".join(f"{part}={field!r}" for part, field in zip(KEYS[method], data.key))
    fold = f", {train} of them in the training fold" if train != usable else ""
    why = "; ".join(f"{n} with {reason}" for reason, n in reasons.most_common(3))
    hint = present_fields(db, data) if not usable else ""
    return SpecError("data.key", f"only {usable} of {len(documents)} selected documents are usable for method "
                     f"{method} ({names}){fold}, and a run needs at least {MIN_ROWS} to train on; skipped: {why}{hint}")


def split_rows(documents: list[dict], data: DataSpec, method: str, key: list[str], chat: bool = True
               ) -> tuple[list[dict], list[dict], int, Counter]:
    """The usable rows of `documents` in the train and valid folds (`data`'s fold field, or its seeded split), how
    many were usable, and why the others were skipped."""
    usable, reasons = _rows(documents, method, key, chat)
    row_of = {id(doc): row for doc, row in usable}
    train, valid = split_folds([doc for doc, _ in usable], data) if usable else ([], [])
    return [row_of[id(doc)] for doc in train], [row_of[id(doc)] for doc in valid], len(usable), reasons


def _folds(db, data: DataSpec, method: str, limits: Limits, chat: bool = True
           ) -> tuple[list[dict], list[dict], list[dict], Counter]:
    """The selected documents, the usable rows of the train and valid folds, and why the others were skipped; the
    run's SpecError when fewer than `MIN_ROWS` rows are left to train on."""
    documents = load_documents(db, data, limits)
    train, valid, usable, reasons = split_rows(documents, data, method, data.key, chat)
    if len(train) < MIN_ROWS:
        raise _too_few(db, data, method, documents, usable, len(train), reasons)
    return documents, train, valid, reasons


def check_documents(db, data: DataSpec, method: str, limits: Limits) -> int:
    """How many documents the selection holds; the run's SpecError when too few of them train as `method`'s rows
    (without the model's tokenizer at hand, chat rows count as usable)."""
    return len(_folds(db, data, method, limits)[0])


def skipped(reasons: Counter) -> dict:
    """What a run's entry records of the documents it skipped."""
    return {"count": sum(reasons.values()), "reasons": [{"reason": r, "count": n} for r, n in reasons.most_common()]}


def datasets(train: list[dict], valid: list[dict]) -> tuple[Dataset, Dataset | None]:
    """The train and valid datasets of these rows, all of one shape."""
    from datasets import Dataset

    rows = one_shape(train + valid)
    train_rows, valid_rows = rows[:len(train)], rows[len(train):]
    return Dataset.from_list(train_rows), Dataset.from_list(valid_rows) if valid_rows else None


def read_datasets(db, data: DataSpec, method: str, limits: Limits, chat: bool = True
                  ) -> tuple[Dataset, Dataset | None, dict]:
    """The train and valid datasets of `method`'s rows, and what was read (`lineage.data_read`, with `skipped`);
    `chat`: whether the model's tokenizer has a chat template, without which chat rows are skipped."""
    documents, train, valid, reasons = _folds(db, data, method, limits, chat)
    if reasons:
        log.warning("skipped %d of %d documents not of method %s's shape: %s", sum(reasons.values()),
                    len(documents), method, dict(reasons))
    read = {**data_read(data.collection, data.filter, documents), "skipped": skipped(reasons)}
    return *datasets(train, valid), read
