"""The ratings of a model's answers become the rows of its feedback runs (`trigger: "feedback"`).

A driver writes `feedback: {rating, better}` on a done request; the listener never writes it. A feedback
run reads this model's done requests with a rating, those `feedback.filter` selects (always within this
model's own: the filter is ANDed, so it can only narrow), newest first, at most the operator's
`max_feedback_rows`, of a shape a run uses (`usable`: the server checks it, so that nothing else is counted or
read). Each request's `feedback` is parsed here (`config.parse_feedback`); what still fails (a chat too long in
all, one the chat template refuses) is skipped and counted, never an error. `kto`: prompt = the request's
`input`, completion = its `output`, label = rating > 0 (0 is neutral: skipped). `dpo`: an answer with
`better` is a pair (better over the answer), and two answers to the same prompt rated one above 0 and one below
make a pair, each answer in at most one such pair. The rows then go through `training.preferences` like a
collection's documents. Ratings too few to train on when the run reads them (rewritten or deleted since a daemon
counted them) end the run without training (`NothingToTrain`), never the model: whoever writes `_requests` must not
be able to fail it.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from bson import ObjectId

from training import defaults, ids, preferences
from training.config import DPO, KTO, ModelSpec, parse_feedback
from training.lineage import data_read, from_feedback
from training.limits import Limits

if TYPE_CHECKING:
    from datasets import Dataset

# Any number in [-1, 1] (NaN is none): what a count and a read select; the run parses each one exactly.
RATED = {"$type": "number", "$gte": -1, "$lte": 1}
RATING_TYPES = ["int", "long", "double"]  # what `config.Feedback.rating` parses: a Decimal128 is never selected
STAMP_TYPES = ["int", "long"]  # a stamp the daemons write (`listener.feedback`): one run, never a list of runs
FIELDS = {"_id": 1, "input": 1, "output": 1, "feedback": 1, "completed_at": 1}  # all a run reads of a request
MAX_ID_CHARS = 250  # a string request id a run reads and names in its entry: 4 bytes a character stay under 1 KiB
ID_TYPES = (str, int, float, ObjectId)  # the plain ids (`ID_SCHEMA`): no document or array nests in a run's entry
ID_SCHEMA = {"bsonType": ["objectId", "string", "int", "long", "double"], "maxLength": MAX_ID_CHARS}
ROLE_CHARS = 64  # a message's role: a word the chat template knows
NEWEST_FIRST = [("completed_at", -1), ("_id", -1)]
# The request fields each method's rows are built from, in `config.KEYS` order.
KEYS = {KTO: ["input", "output", "rating"], DPO: ["input", "chosen", "rejected"]}
NEUTRAL = "rating 0 is neutral: neither good nor bad"


def run_spec(spec: ModelSpec, document: dict) -> ModelSpec:
    """The spec this run trains with: a feedback run's method is `feedback.method`, whatever the model's own is."""
    return spec.model_copy(update={"method": spec.feedback.method}) if from_feedback(document, spec) else spec


def usable(limits: Limits) -> dict:
    """The shape of a request a run can use, checked by the server (`$jsonSchema`) so that nothing else is counted,
    stamped or read: a plain `_id`; `feedback` holding a number `rating` (int, long or double) and at most a non-empty
    text `better`, what `config.parse_feedback` takes; an `input` of text or of at most `max_messages` messages
    `{role, content}`, texts within `max_input_chars` (a chat's sum is checked as it is read, `too_long`); a text
    `output`; no stamp, or one integer (`$eq` would match a list of runs toward each, counting one rating for all); a
    `completed_at`, which the newest-first read sorts on, that is a date as the listener writes it (a server may fail
    a sort on a value nested deep)."""
    text = {"bsonType": "string", "maxLength": limits.max_input_chars}
    message = {"bsonType": "object", "required": ["role", "content"], "additionalProperties": False,
               "properties": {"role": {"bsonType": "string", "maxLength": ROLE_CHARS}, "content": text}}
    return {"$jsonSchema": {"required": ["input", "output", "feedback"], "properties": {
        "_id": ID_SCHEMA, "output": text, "feedback_run": {"bsonType": STAMP_TYPES},
        "completed_at": {"bsonType": "date"},
        "input": {"bsonType": ["string", "array"], "maxLength": limits.max_input_chars,
                  "maxItems": limits.max_messages, "items": message},
        "feedback": {"bsonType": "object", "required": ["rating"], "additionalProperties": False,
                     "properties": {"rating": {"bsonType": RATING_TYPES}, "better": {**text, "minLength": 1}}}}}}


def _own(spec: ModelSpec, limits: Limits) -> dict:
    """This model's done requests with a rating, of a shape a run uses (`usable`)."""
    return {"model": ids.eq(spec.id), "status": defaults.Status.DONE.value, "feedback.rating": RATED,
            "output": {"$type": "string"}, **usable(limits)}


def selection(spec: ModelSpec, limits: Limits) -> dict:
    """This model's rated answers, narrowed by `feedback.filter` (ANDed: it can only narrow)."""
    own = _own(spec, limits)
    return {"$and": [own, spec.feedback.filter]} if spec.feedback.filter else own


UNSTAMPED = {"feedback_run": {"$exists": False}}
PASSED_OVER = 0  # the stamp of a rating no run reads: looked at once, never counted
# The scalar `_id`s of the requests passed over, which the driver reads and writes back as they are (`passed_over`).
STAMPED_ID_TYPES = ["objectId", "string", "int", "long", "double", "decimal", "date", "bool", "timestamp", "null",
                    "minKey", "maxKey", "binData", "javascript"]


def uncounted(spec: ModelSpec, limits: Limits) -> dict:
    """The rated answers no daemon has counted toward a run yet (`listener.feedback`)."""
    return {"$and": [selection(spec, limits), UNSTAMPED]}


def passed_over(spec: ModelSpec, limits: Limits, documents: bool = False) -> dict:
    """The rated requests of this model, ended and not counted yet, that no run reads: those `feedback.filter` does not
    select, and those of a shape no run uses (`usable`) or that did not end `done`. Stamped `PASSED_OVER`, so that
    each pass looks at new ratings only, however many of them a writer floods in: left unstamped, they would lie in
    the range of the feedback index that every pass reads (this model, no stamp, a rating). Those with a scalar `_id`
    (`STAMPED_ID_TYPES`), or with `documents` those whose `_id` is a document: each is stamped by the `_id` read
    back, and one document may fail every read that returns it (nested deeper than the server returns), so the two
    are read apart and such a one never stops the stamps of the scalar ones."""
    typed = {"$type": "object"} if documents else {"$type": STAMPED_ID_TYPES}
    ended = sorted(status.value for status in defaults.FINAL)
    return {"$and": [{"model": ids.eq(spec.id), "status": {"$in": ended}, "feedback.rating": RATED, "_id": typed},
                     UNSTAMPED, {"$nor": [selection(spec, limits)]}]}


def _source(doc: dict, **parts) -> dict:
    """A document of the method's shape made from a request: its `input` and what `parts` give."""
    return {"_id": doc.get("_id"), **({"input": doc["input"]} if "input" in doc else {}), **parts}


def _pairs(rated: list[tuple[dict, object]]) -> list[dict]:
    """DPO's pairs: each answer with its `better`, and answers to one prompt rated above and below 0."""
    pairs, by_prompt = [], {}
    for doc, feedback in rated:
        if feedback.better is not None:
            pairs.append(_source(doc, chosen=feedback.better, rejected=doc.get("output")))
        if feedback.rating:
            sides = by_prompt.setdefault(ids.key(doc.get("input")), ([], []))
            sides[feedback.rating < 0].append(doc)
    for good, bad in by_prompt.values():
        pairs += [_source(g, chosen=g.get("output"), rejected=b.get("output")) for g, b in zip(good, bad)]
    return pairs


UNUSABLE = "input, output, feedback or _id of a shape or length a run does not use"


def _message(value) -> bool:
    return (isinstance(value, dict) and value.keys() == {"role", "content"} and isinstance(value["role"], str)
            and len(value["role"]) <= ROLE_CHARS and isinstance(value["content"], str))


def _chars(value) -> int | None:
    """The characters of a text, or of a chat's contents; None for anything else."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list) and all(map(_message, value)):
        return sum(len(m["content"]) for m in value)
    return None


def too_long(doc: dict, limits: Limits) -> bool:
    """Whether a request is of no shape `usable` selects, or longer than the input bounds (`max_input_chars` for a
    chat's messages together, `max_messages`): the server checks the shape, and this what it cannot (a sum) for
    what a run or a daemon's check keeps, so that it stays within the operator's caps whatever anyone inserted."""
    rating = doc.get("feedback")
    if not (isinstance(rating, dict) and rating.keys() <= {"rating", "better"}
            and isinstance(rating.get("better", ""), str) and isinstance(doc.get("output"), str)):
        return True
    if not (isinstance(doc.get("_id"), ID_TYPES) and len(str(doc["_id"])) <= MAX_ID_CHARS):
        return True
    chars = [_chars(doc.get("input")), len(doc["output"]), len(rating.get("better", ""))]
    return (None in chars or max(chars) > limits.max_input_chars
            or (isinstance(doc["input"], list) and len(doc["input"]) > limits.max_messages))


def sources(requests: list[dict], method: str, limits: Limits) -> tuple[list[dict], Counter]:
    """Documents of the method's shape (`KEYS`) built from rated requests, and why the others were skipped."""
    rated, reasons = [], Counter()
    for doc in requests:
        if too_long(doc, limits):
            reasons[UNUSABLE] += 1
            continue
        try:
            rated.append((doc, parse_feedback(doc.get("feedback"), limits)))
        except ValueError as why:
            reasons[str(why)] += 1
    if method == DPO:
        return _pairs(rated), reasons
    built = []
    for doc, feedback in rated:
        if feedback.rating == 0:
            reasons[NEUTRAL] += 1
        else:
            built.append(_source(doc, output=doc.get("output"), rating=feedback.rating))
    return built, reasons


def folds(requests: list[dict], spec: ModelSpec, limits: Limits, chat: bool = True
          ) -> tuple[list[dict], list[dict], int, Counter]:
    """The train and valid rows of `feedback.method` from these requests (the seeded split of `data`'s
    `valid_fraction` and `seed`: a request carries no fold), how many were usable, and the skip reasons."""
    method = spec.feedback.method
    built, reasons = sources(requests, method, limits)
    data = spec.data.model_copy(update={"fold_field": "_fold"})  # no request holds it (they are read projected)
    train, valid, usable, more = preferences.split_rows(built, data, method, KEYS[method], chat)
    return train, valid, usable, reasons + more


def enough(requests: list[dict], spec: ModelSpec, limits: Limits) -> bool:
    """Whether these requests make enough rows for a run (DPO: pairs); chat counted as usable."""
    return len(folds(requests, spec, limits)[0]) >= preferences.MIN_ROWS


def rated_requests(db, spec: ModelSpec, limits: Limits) -> list[dict]:
    """The rated requests a feedback run reads, newest first, at most the operator's cap. One longer than the input
    caps (`too_long`: a chat the server passes, each message within them, may hold `max_messages` times more) is kept
    as its `_id` alone as it comes, so the run holds what the caps allow whatever anyone inserted; `sources` skips it
    as unusable, and the run's entry still names it."""
    return [doc if not too_long(doc, limits) else {"_id": doc.get("_id")}
            for doc in db[defaults.REQUESTS].find(selection(spec, limits), FIELDS, sort=NEWEST_FIRST,
                                                  limit=limits.max_feedback_rows)]


class NothingToTrain(Exception):
    """A feedback run whose ratings, as read, make too few rows: a `_requests` writer rewrote or deleted them after a
    daemon counted them. Whoever rates must not be able to fail a model: the run ends without training
    (`ChildExit.NOTHING_TO_TRAIN`), the model serves as before and counting goes on. `read`: what it read."""

    def __init__(self, message: str, read: dict):
        super().__init__(message)
        self.read = read


REFUSED = "chat the model's chat template refuses"


def rendered(rows: list[dict], tokenizer, reasons: Counter) -> list[dict]:
    """The rows (all of one shape, `preferences.one_shape`) the model's chat template renders, as the trainer will
    (the prompt for generation, and with each answer); one it refuses (two user turns in a row, for a template that
    raises on them) is skipped and counted in `reasons`: a rater's chat fails that row, never the run."""
    from jinja2.exceptions import TemplateError

    if not any(isinstance(value, list) for row in rows for value in row.values()):
        return rows
    kept = []
    for row in rows:
        try:
            tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            for answer in ("completion", "chosen", "rejected"):
                if answer in row:
                    tokenizer.apply_chat_template(row["prompt"] + row[answer], tokenize=False)
            kept.append(row)
        except TemplateError:
            reasons[REFUSED] += 1
    return kept


def read_datasets(db, spec: ModelSpec, limits: Limits, tokenizer) -> tuple[Dataset, Dataset | None, dict]:
    """A feedback run's train and valid datasets, and what it read for the run's entry (`feedback`); NothingToTrain
    when the rows are too few to train on."""
    requests = rated_requests(db, spec, limits)
    method = spec.feedback.method
    train, valid, usable, reasons = folds(requests, spec, limits, chat=bool(tokenizer().chat_template))
    if tokenizer().chat_template:
        rows, cut_at = preferences.one_shape(train + valid), len(train)
        train, valid = rendered(rows[:cut_at], tokenizer(), reasons), rendered(rows[cut_at:], tokenizer(), reasons)
        usable -= len(rows) - len(train) - len(valid)
    read = {"method": method, **data_read(defaults.REQUESTS, selection(spec, limits), requests),
            "order": "newest first", "skipped": preferences.skipped(reasons),
            "pairs" if method == DPO else "examples": usable}
    if len(train) < preferences.MIN_ROWS:
        why = "; ".join(f"{n} with {reason}" for reason, n in reasons.most_common(3)) or "none skipped"
        raise NothingToTrain(f"the {len(requests)} rated answers read make {usable} usable "
                             f"{'pairs' if method == DPO else 'examples'} for method {method} ({len(train)} to train "
                             f"on), and a run needs at least {preferences.MIN_ROWS} to train on; skipped: {why}", read)
    return *preferences.datasets(train, valid), read
