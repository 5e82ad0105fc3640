"""The serving worker: started, timed and killed by `listener.serving` (through `listener.forks`).

Rendering chat templates and generating run here, in a process of their own, so a template that
loops or a model that eats memory costs one killable process, never the daemon. The protocol runs
over a socket the daemon keeps the other end of, one JSON document (bson.json_util) per line:

- in, one command per line: `{op: "load" | "generate", model, checkpoint, prompts, params, timeout_s}`,
  `model` being the parsed model document, `checkpoint` its selected entry or null, `timeout_s` the
  requests' own limit or null (past it, their answers end as `timeout` errors; the worker goes on). A generate command
  for several models of one base names them in `groups: [{model, checkpoint}]` instead, and each
  prompt's group in `rows: [index]` (a mixed-adapter batch, see `inference.answer_rows`).
- out, one reply per command: `{ok: true}` for a load, `{ok: true, results: [{output, finish_reason, usage} |
  {error}]}` for a generation, `{ok: false, error: {type, message}}` when the whole command failed.
  A generate command with `stream: true` is answered first by any number of `{partial: [text | null]}`
  lines, the answers so far, one per prompt.

Its configuration (`{uri, db, work_dir, limits, disk_bytes, memory_bytes}`) is an argument, so the
URI is never in the environment, where the worker's descendants could read it. Logs go to stderr,
and so does anything a library prints.
"""

import logging
import os
import socket
import sys

from bson import json_util
from pymongo import MongoClient

from training import defaults, lifeline
from training.config import GenerationParams, SpecError, parse_model
from training.errors import public_message
from training.inert import inert_logging
from training.inference import Deadline, DiskCache, ModelCache, answer_rows
from training.limits import Limits

log = logging.getLogger(__name__)
MODEL_SHARE = 0.5  # of the worker's memory budget, for cached weights; the rest is torch, tokenizers, activations


def failure(kind: str, exc: BaseException) -> dict:
    """A reply for a command that failed as a whole; known errors already say what to change."""
    known = isinstance(exc, (SpecError, LookupError, ValueError)) and not isinstance(exc, KeyError)
    message = str(exc) if known else f"{type(exc).__name__}: {exc}"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        kind, message = "memory_limit", f"out of memory while serving ({message})"
    return {"ok": False, "error": {"type": kind, "message": public_message(message)}}


def handle(cache: ModelCache, command: dict, send=None) -> dict:
    """One command: loading fails as `model_unavailable`, generating as `generation_failed`; partial answers
    of a streamed generation go to `send` before the reply is returned."""
    deadline = Deadline.after(command["timeout_s"]) if command.get("timeout_s") else None
    groups = command.get("groups") or [{"model": command.get("model"), "checkpoint": command.get("checkpoint")}]
    try:
        views = [cache.get(parse_model(group["model"], cache.limits), group.get("checkpoint")) for group in groups]
    except Exception as exc:
        log.warning("cannot load model %r", (groups[0].get("model") or {}).get("_id"), exc_info=True)
        return failure("model_unavailable", exc)
    if command["op"] == "load":
        return {"ok": True}
    try:
        params = GenerationParams.model_validate(command["params"])
        on_partial = (lambda texts: send({"partial": texts})) if command.get("stream") and send else None
        rows = command.get("rows") or [0] * len(command["prompts"])
        return {"ok": True, "results": answer_rows(views, rows, command["prompts"], params, on_partial, deadline)}
    except Exception as exc:
        log.warning("generation failed", exc_info=True)
        return failure("generation_failed", exc)


def serve(connection: socket.socket, config: dict, env: dict[str, str]) -> None:
    """Answer the daemon's commands on `connection` until it closes it."""
    lifeline.adopt(env)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s worker %(levelname)s %(message)s",
                        force=True)
    inert_logging()
    db = MongoClient(config["uri"], **defaults.CODEC)[config["db"]]
    limits = Limits.model_validate(config["limits"])
    cache = ModelCache(db, limits, DiskCache(config["work_dir"], config["disk_bytes"]),
                       int(config["memory_bytes"] * MODEL_SHARE))
    commands, replies = connection.makefile("rb"), connection.makefile("w", encoding="utf-8")

    def send(reply: dict) -> None:
        replies.write(json_util.dumps(reply) + "\n")
        replies.flush()

    for line in commands:
        send(handle(cache, json_util.loads(line), send))
