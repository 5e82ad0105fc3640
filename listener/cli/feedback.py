import re

import click
from bson import ObjectId

from listener.cli.options import connection_options, exact_id, model_argument, open_database, operator_settings
from training import defaults, ids
from training.config import parse_feedback
from training.inert import MAX_LINE_CHARS, inert

INTEGER = re.compile(r"-?[0-9]{1,19}")


def request_ids(text: str) -> list:
    """What REQUEST_ID may mean: extended JSON is that exact `_id` (as for MODEL, `exact_id`); otherwise, in the order
    tried, an ObjectId (24 hex digits), an integer, the text itself."""
    if text.startswith("{"):
        try:
            return [exact_id(text)]
        except ValueError as exc:
            raise click.BadParameter(f"{text!r} is not a request id: {exc}", param_hint="REQUEST_ID") from None
    found = [ObjectId(text)] if ObjectId.is_valid(text) and len(text) == 24 else []
    # An integer as written: ASCII digits, within BSON's 64 bits. Python's int() also reads "4_2", " 42" and other
    # scripts' digits, which would name another request than the text typed.
    if INTEGER.fullmatch(text) and -2**63 <= int(text) < 2**63:
        found.append(int(text))
    return [*found, text]


def done_request(requests, model, request_id: str) -> dict:
    """The one done request of MODEL that REQUEST_ID reads as (its `_id`, `model` and `status`); a ClickException, in
    one line, for none, several (anyone may plant a look-alike), another model's, or one not done yet."""
    matches = [doc for rid in request_ids(request_id)
               if (doc := requests.find_one({"_id": ids.eq(rid)}, {"model": 1, "status": 1}))]
    if not matches:
        raise click.ClickException(f"no request with _id {request_id!r} in {requests.database.name}.{requests.name}")
    if len(matches) > 1:  # never rate a request the user did not mean
        kinds = ", ".join(type(doc["_id"]).__name__ for doc in matches)
        raise click.ClickException(f"{len(matches)} requests have an _id that reads {request_id!r} ({kinds}): "
                                   "give the exact one as extended JSON, e.g. '{\"$oid\": \"...\"}' or "
                                   "'{\"$numberInt\": \"7\"}'")
    [found] = matches
    if ids.key(found.get("model")) != ids.key(model):
        raise click.ClickException(f"request {request_id!r} is for another model, not {model!r}")
    if found.get("status") != defaults.Status.DONE.value:
        raise click.ClickException(f"request {request_id!r} is {found.get('status') or 'pending'}, not done yet: "
                                   "rate it once it has its answer")
    return found


def rate(requests, found: dict, model, rating: dict, request_id: str) -> None:
    """Write `rating` on the request `done_request` found, only while it is still MODEL's and done: it may have been
    requeued, deleted or given to another model since it was read; then nothing is rated (a ClickException)."""
    done = {"_id": ids.eq(found["_id"]), "model": ids.eq(model), "status": defaults.Status.DONE.value}
    if not requests.update_one(done, {"$set": {"feedback": rating}}).matched_count:
        raise click.ClickException(f"request {request_id!r} changed while it was being rated (requeued, deleted or "
                                   "another model's): nothing was rated")


@click.command()
@connection_options
@model_argument
@click.argument("request_id")
@click.option("--good/--bad", default=None, help="The answer was good (rating 1) or bad (rating -1).")
@click.option("--better", metavar="TEXT", help="A better answer: with method dpo, a pair (this over the answer).")
def feedback(uri, db, model, request_id, good, better):
    """Rate MODEL's answer to REQUEST_ID: sets the request's `feedback`, as any driver may once it is done.

    With `feedback: {method, every}` on the model, every N ratings start a preference run on them.
    REQUEST_ID is an ObjectId's hex, an integer or the text as it is: the one request that matches; where
    several do (an id of each type), none is rated. Extended JSON ('{"$oid": "..."}') names one exactly.

    \b
    Example:
      listener feedback my-model 6571f0c2a1b2c3d4e5f60718 --bad --better "Paris."
    """
    if good is None:
        raise click.UsageError("say --good or --bad")
    rating = {"rating": 1 if good else -1, **({"better": better} if better is not None else {})}
    try:
        parse_feedback(rating, operator_settings(uri=uri, db=db).limits)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--better") from None
    requests = open_database(uri, db)[defaults.REQUESTS]
    rate(requests, done_request(requests, model, request_id), model, rating, request_id)
    click.echo(inert(f"rated request {request_id!r} of model {model!r} {'good' if good else 'bad'}"
                     + (" with a better answer" if better is not None else ""), MAX_LINE_CHARS))
