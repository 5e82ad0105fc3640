import json

import click
from pymongo import MongoClient

from listener.cli.options import connection_options, resolve
from listener.follow import finished, wait_for
from training import defaults


@click.command()
@connection_options
@click.argument("model")
@click.argument("prompt")
@click.option("--chat/--text", default=True, show_default=True, help="Send the prompt as a user message or raw text.")
@click.option("--checkpoint", default="best", show_default=True, help='"best", "latest", "base" or RUN:STEP.')
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1),
              help="Capped by the listener (MONGOTUNE_MAX_NEW_TOKENS).")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for an answer.")
def predict(uri, db, model, prompt, chat, checkpoint, max_new_tokens, timeout):
    """Ask MODEL: insert a `_requests` document and print the answer a listener writes back."""
    if ":" in checkpoint:
        run, _, step = checkpoint.partition(":")
        if not (run.isdigit() and step.isdigit()):
            raise click.BadParameter("use best, latest, base or RUN:STEP such as 1:45", param_hint="--checkpoint")
        checkpoint = {"run": int(run), "step": int(step)}
    uri, name = resolve(uri, db)
    requests = MongoClient(uri)[name][defaults.REQUESTS]
    request_id = requests.insert_one({
        "model": model, "input": [{"role": "user", "content": prompt}] if chat else prompt,
        "params": {"max_new_tokens": max_new_tokens}, "checkpoint": checkpoint,
    }).inserted_id
    answer = wait_for(requests, request_id, finished, timeout)
    if answer["status"] != "done":
        raise click.ClickException(f"request {answer['status']}: {(answer.get('error') or {}).get('message')}")
    click.echo(answer["output"])
    click.echo(json.dumps({"usage": answer["usage"], "latency_ms": answer["latency_ms"],
                           "checkpoint": answer["checkpoint_used"]}), err=True)
