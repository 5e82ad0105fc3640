"""The `runs` list of a model document: one entry per run, enough to say what it was and to redo it.

The training child writes an entry when its run starts (trigger, the data it read, the resolved
arguments, library versions, the base model's fingerprint, host and devices) and adds to it as the run
goes (its own best checkpoint, the promotion decision); the daemon writes the outcome. Entries are
addressed by their `number` (the document's `run`) with array filters, never by position, since users
can write the document. A run resumed after a crash keeps the entry its first attempt wrote.
"""

import hashlib
import importlib.metadata
import logging
import os
import platform
import socket
from pathlib import Path

from bson import json_util
from pymongo.errors import PyMongoError

from training import ids
from training.defaults import Status, now

log = logging.getLogger(__name__)

LIBRARIES = ("mongotune", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "deepspeed")
TRIGGERS = ("insert", "new_documents", "schedule", "user", "definition", "feedback")
MAX_CHANGED, MAX_PATH_CHARS = 100, 200  # a replaced definition's changed fields, as a run's entry records them
NOTHING_TO_TRAIN = "nothing_to_train"  # a feedback run's outcome when its ratings, as read, made no run: it served on
FINAL_OUTCOMES = (*(s.value for s in (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)), NOTHING_TO_TRAIN)


def data_read(collection: str, query: dict, documents: list[dict]) -> dict:
    """What a run read, in `_id` order as `training.dataset` reads it: count, first and last `_id`, and a
    sha256 of the ids in that order (canonical extended JSON, so the BSON type counts)."""
    return {"collection": collection, "filter": query, "count": len(documents),
            "first_id": documents[0].get("_id") if documents else None,
            "last_id": documents[-1].get("_id") if documents else None, "ids_sha256": ids_sha256(documents)}


def ids_sha256(documents: list[dict]) -> str:
    """A sha256 of the documents' ids in their order (canonical extended JSON, so the BSON type counts)."""
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(ids.key(doc.get("_id")).encode() + b"\n")
    return digest.hexdigest()


def versions() -> dict:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"python": platform.python_version(), **found}


def base_fingerprint(name: str, resolved: str, revision: str | None) -> dict:
    """The base model's revision, or a sha256 of its files' names and sizes: cheap, never reads the weights.

    `name` is what the document wrote; `resolved` (where it loads from, perhaps an operator's folder) is
    hashed, never written."""
    out = {"source": name, "revision": revision}
    folder = Path(resolved)
    if not folder.is_dir():
        return out
    if folder.parent.name == "snapshots":  # a hub cache folder is named by its commit
        out["revision"] = revision or folder.name
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder)}\0{path.stat().st_size}\n".encode())
    out["files_sha256"] = digest.hexdigest()
    return out


def host() -> dict:
    import torch

    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"hostname": socket.gethostname(), "cpus": os.cpu_count(), "devices": devices or ["cpu"],
            "world_size": int(os.environ.get("WORLD_SIZE", "1"))}


def trigger_of(document: dict) -> str:
    """Why this run started: the retraining trigger the daemon wrote, else "insert" for run 1 and "user" after."""
    trigger = document.get("trigger")
    if trigger in TRIGGERS:
        return trigger
    return "insert" if document.get("run") == 1 else "user"


def from_feedback(document: dict, spec) -> bool:
    """Whether this run trains on the ratings of the model's answers (`training.feedback`): the feedback trigger
    started it, and the model still has `feedback`."""
    return trigger_of(document) == "feedback" and spec.feedback is not None


def changed_fields(document: dict) -> list[str]:
    """The fields a replaced definition changed (`listener.definitions`), for a run it started; only what reads as
    field paths, bounded: anyone who may write the document may write `changed`, and it goes into the run's entry."""
    changed = document.get("changed") if trigger_of(document) == "definition" else None
    if not isinstance(changed, list):
        return []
    return [path[:MAX_PATH_CHARS] for path in changed if isinstance(path, str)][:MAX_CHANGED]


def entry(document: dict, **recorded) -> dict:
    """A new run entry; `recorded` holds what `training.child` measured (data, arguments, base, init_from...).

    A run started by a replaced definition records which fields changed (`listener.definitions`)."""
    trigger = trigger_of(document)
    changed = {"changed": changed_fields(document)} if trigger == "definition" else {}
    return {"number": document["run"], "trigger": trigger, "started_at": now(), "versions": versions(),
            "host": host(), **changed, **recorded}


def begin(models, match: dict, document: dict, new_entry: dict) -> bool:
    """Add the run's entry unless a first attempt already did (then the host and nodes it runs on now replace the
    earlier attempt's: any daemon resumes a run, a gang on whichever daemons join it); False when the fence no longer
    matches."""
    runs = document.get("runs")
    if isinstance(runs, list) and any(isinstance(r, dict) and r.get("number") == document["run"] for r in runs):
        update, filters = set_fields(document["run"], {"resumed_at": now(), "host": new_entry["host"],
                                                       **({"nodes": new_entry["nodes"]} if "nodes" in new_entry else {})})
        return models.find_one_and_update(match, update, array_filters=filters) is not None
    update = {"$push": {"runs": new_entry}} if isinstance(runs, list) else {"$set": {"runs": [new_entry]}}
    return models.find_one_and_update(match, update) is not None


def set_fields(run: int, fields: dict) -> tuple[dict, list[dict]]:
    """An update setting `fields` on run `run`'s entry, and the array filter that finds it."""
    return {"$set": {f"runs.$[r].{name}": value for name, value in fields.items()}}, [{"r.number": run}]


async def record_outcome(models, model_id, run: int, outcome: str, owner: str | None = None) -> None:
    """The daemon's write when a run has ended, just before the status that says so: its outcome (an entry of its
    own if the child wrote none, as when it failed before its first step). With `owner`, only while that daemon
    holds the run's lease: one that lost it writes no outcome for a run another daemon goes on with."""
    if outcome not in FINAL_OUTCOMES:
        return  # not over: it resumes later
    fields = {"outcome": outcome, "ended_at": now()}
    query = {"_id": ids.eq(model_id), "run": run, **({"lease.owner": {"$eq": owner}} if owner is not None else {})}
    update, filters = set_fields(run, fields)
    try:
        done = await models.update_one({**query, "runs.number": run}, update, array_filters=filters)
        if not done.matched_count:
            await models.update_one({**query, "runs.number": {"$ne": run}}, {"$push": {"runs": {"number": run, **fields}}})
    except PyMongoError as exc:  # lineage is a record, never a reason for the daemon to stop
        log.warning("could not record the outcome of run %d of %r: %s", run, model_id, exc)


def arguments(spec, resolved: dict) -> dict:
    """The training arguments as given, and the listener's defaults that filled in the rest."""
    from training.arguments import translate

    given = translate(spec.trainer.training_arguments())
    applied = {k: v for k, v in resolved.items() if k not in given and k != "output_dir"}
    own = spec.trainer.model_dump(exclude=set(spec.trainer.training_arguments()) | {"training_kwargs"})
    return {"given": given, "defaults": applied, "trainer": own}


def _stored(read: dict) -> dict:
    """What a run read, as its entry stores it: "$" operators cannot be field names in an update."""
    return {**read, "filter": json_util.dumps(read["filter"])}


def nothing_to_train(models, match: dict, document: dict, read: dict, why: str) -> bool:
    """The entry of a feedback run that read too few rows to train on (rank 0 alone): what it read and why it
    trained nothing; the daemon then writes its outcome, `NOTHING_TO_TRAIN`. False when the fence no longer matches."""
    return begin(models, match, document, entry(document, method=read["method"], feedback=_stored(read),
                                                nothing_to_train=why))


def start(models, match: dict, document: dict, spec, resolved: dict, read: dict, started: dict | None,
          source: str, nodes: list | None = None) -> bool:
    """Write the run's entry at its start (rank 0 alone); False when the fence no longer matches. `nodes`: each node's
    name, host and devices, for a job of several (its daemons gave them)."""
    read = _stored(read)
    recorded = entry(document, method=spec.method, **{"feedback" if from_feedback(document, spec) else "data": read},
                     arguments=arguments(spec, resolved),
                     init_from=started, base=base_fingerprint(spec.model_name_or_path, source, spec.model_kwargs.revision),
                     **({"nodes": nodes} if nodes else {}))
    return begin(models, match, document, recorded)
