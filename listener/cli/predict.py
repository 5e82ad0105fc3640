import json

import click
from bson import ObjectId

from listener.cli.alive import no_daemon
from listener.cli.options import connection_options, find_model, model_argument, open_database, operator_settings
from listener.follow import finished, wait_for
from listener.processes import wait_until
from listener.status import Status
from training import defaults
from training.config import parse_request
from training.inert import MAX_ANSWER_CHARS, MAX_LINE_CHARS, inert


@click.command()
@connection_options
@model_argument
@click.argument("prompt")
@click.option("--chat/--text", default=True, show_default=True, help="Send the prompt as a user message or raw text.")
@click.option("--checkpoint", default="best", show_default=True, help='"best", "latest", "base" or RUN:STEP.')
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1),
              help="Capped by the listener (MONGOTUNE_MAX_NEW_TOKENS).")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for an answer.")
@click.option("--stream", is_flag=True, help="Print the answer as it grows, watching the request's change stream.")
def predict(uri, db, model, prompt, chat, checkpoint, max_new_tokens, timeout, stream):
    """Ask MODEL: insert a `_requests` document and print the answer a listener writes back."""
    if ":" in checkpoint:
        run, _, step = checkpoint.partition(":")
        if not (run.isdigit() and step.isdigit()):
            raise click.BadParameter("use best, latest, base or RUN:STEP such as 1:45", param_hint="--checkpoint")
        checkpoint = {"run": int(run), "step": int(step)}
    settings = operator_settings(uri=uri, db=db)
    database = open_database(uri, db)
    requests = database[defaults.REQUESTS]
    document = {"_id": ObjectId(), "model": model, "input": [{"role": "user", "content": prompt}] if chat else prompt,
                "params": {"max_new_tokens": max_new_tokens}, "checkpoint": checkpoint, "stream": stream}
    parse_request(document, settings.limits)
    idle = no_daemon(database)
    if idle:
        raise click.ClickException(f"{idle}; nothing would answer this request")
    find_model(database[defaults.MODELS], model, {"_id": 1})  # a misspelt id fails here, with the closest one
    if stream:
        answer, shown = streamed(requests, document, timeout), True
    else:
        requests.insert_one(document)
        answer, shown = wait_for(requests, document["_id"], finished, timeout), False
    if answer["status"] != Status.DONE:
        error = answer.get("error") if isinstance(answer.get("error"), dict) else {}
        raise click.ClickException(f"request {inert(answer['status'])}: {inert(error.get('message'), MAX_LINE_CHARS)}")
    if not shown:
        click.echo(inert(answer.get("output", ""), MAX_ANSWER_CHARS, newlines=True))
    usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
    if answer.get("finish_reason") == "length":
        click.echo(f"(cut at the token limit, {inert(usage.get('completion_tokens'), 20)} tokens: ask again with a "
                   "larger --max-new-tokens, within the operator's MONGOTUNE_MAX_NEW_TOKENS)", err=True)
    click.echo(inert(json.dumps({"usage": usage, "finish_reason": answer.get("finish_reason"),
                                 "latency_ms": answer.get("latency_ms"), "checkpoint": answer.get("checkpoint_used")},
                                default=str), MAX_LINE_CHARS), err=True)


def streamed(requests, document: dict, timeout_s: float) -> dict:
    """Insert the request and print its `output` as the listener grows it; the final document.

    The change stream is opened before the insert, so no update is missed.
    """
    printed = ""

    def answered() -> dict | None:
        nonlocal printed
        current = ((changes.try_next() or {}).get("fullDocument")) or {}  # waits up to max_await_time_ms
        text = current.get("output")
        if isinstance(text, str) and text != printed:
            click.echo(inert(text[len(printed):] if text.startswith(printed) else f"\n{text}", MAX_ANSWER_CHARS,
                             newlines=True), nl=False)
            printed = text
        return current if finished(current) else None

    with requests.watch([{"$match": {"documentKey._id": document["_id"]}}], full_document="updateLookup",
                        max_await_time_ms=500) as changes:
        requests.insert_one(document)
        try:
            current = wait_until(answered, timeout_s, "an answer", poll_s=0)
        except TimeoutError:
            raise click.ClickException(f"no answer within {timeout_s:g} s; request {document['_id']} is still in "
                                       f"{defaults.REQUESTS}") from None
    if current["status"] == Status.DONE:
        click.echo()
    return current
