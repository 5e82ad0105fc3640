"""The document schema installed as a `$jsonSchema` validator, so any driver's bad insert is refused.

It is generated from the same pydantic models the daemon parses with (`training.config`), so the
two cannot drift apart; the daemon still parses every document, for servers that refuse
validators and for rules JSON Schema cannot say (such as `trust_remote_code`).
"""

import logging

from pymongo.errors import CollectionInvalid, OperationFailure

from listener.status import MODEL_TRANSITIONS, REQUEST_TRANSITIONS, Status
from training import defaults
from training.config import LISTENER_FIELDS, ModelSpec, RequestSpec
from training.errors import said
from training.limits import Limits

log = logging.getLogger(__name__)

BSON_TYPES = {
    "string": "string", "integer": ["int", "long"], "number": ["int", "long", "double", "decimal"],
    "boolean": "bool", "object": "object", "array": "array", "null": "null",
}
COPIED = ("required", "enum", "minimum", "maximum", "minLength", "maxLength", "pattern", "description")


def to_bson_schema(node: dict, defs: dict) -> dict:
    """Translate pydantic's JSON Schema (draft 2020-12) into MongoDB's `$jsonSchema` dialect."""
    if "$ref" in node:
        node = defs[node["$ref"].rsplit("/", 1)[-1]]
    out: dict = {key: node[key] for key in COPIED if key in node}
    if "type" in node:
        out["bsonType"] = BSON_TYPES[node["type"]]
    if "properties" in node:
        out["properties"] = {name: to_bson_schema(sub, defs) for name, sub in node["properties"].items()}
    if "items" in node:
        out["items"] = to_bson_schema(node["items"], defs)
    if "anyOf" in node:
        out["anyOf"] = [to_bson_schema(sub, defs) for sub in node["anyOf"]]
    if isinstance(node.get("additionalProperties"), bool):
        out["additionalProperties"] = node["additionalProperties"]
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound in node:
            out[plain], out[bound] = node[bound], True
    return out


def document_schema(spec: type, statuses: list[str]) -> dict:
    """The user's fields as the spec defines them; the listener's own fields allowed as it writes them."""
    source = spec.model_json_schema(by_alias=True)
    schema = to_bson_schema(source, source.get("$defs", {}))
    schema["properties"].update({name: {} for name in LISTENER_FIELDS})
    schema["properties"]["status"] = {"enum": statuses}
    schema["properties"]["_id"] = {}
    schema["required"] = [name for name in schema["required"] if name != "_id"]
    return {"$jsonSchema": schema}


# Where the operator's caps apply in each document: (collection, path, JSON Schema keyword, Limits field).
CAPS = [
    (defaults.MODELS, "trainer.max_steps", "maximum", "max_steps"),
    (defaults.MODELS, "trainer.per_device_train_batch_size", "maximum", "max_batch_size"),
    (defaults.MODELS, "trainer.per_device_eval_batch_size", "maximum", "max_batch_size"),
    (defaults.MODELS, "trainer.max_length", "maximum", "max_seq_length"),
    (defaults.MODELS, "trainer.max_seq_length", "maximum", "max_seq_length"),
    (defaults.MODELS, "trainer.save_total_limit", "maximum", "max_checkpoints"),
    (defaults.MODELS, "trainer.dataloader_num_workers", "maximum", "max_dataloader_workers"),
    (defaults.MODELS, "trainer.num_gpus", "maximum", "max_processes"),
    (defaults.MODELS, "trainer.num_processes", "maximum", "max_processes"),
    (defaults.MODELS, "trainer.num_nodes", "maximum", "max_nodes"),
    (defaults.REQUESTS, "params.max_new_tokens", "maximum", "max_new_tokens"),
    (defaults.REQUESTS, "input", "maxLength", "max_input_chars"),
    (defaults.REQUESTS, "input", "maxItems", "max_messages"),
]


def _apply_cap(schema: dict, path: str, keyword: str, value: int) -> None:
    """Set a bound on a property; JSON Schema applies it only to values of the type it concerns."""
    node = schema["$jsonSchema"]
    for part in path.split("."):
        node = node["properties"][part]
    node[keyword] = value


def validators(limits: Limits) -> dict[str, dict]:
    schemas = {
        defaults.MODELS: document_schema(ModelSpec, [s.value for s in MODEL_TRANSITIONS]),
        defaults.REQUESTS: document_schema(RequestSpec, sorted({s.value for v in REQUEST_TRANSITIONS.values()
                                                                for s in v} | {Status.PENDING.value})),
    }
    for collection, path, keyword, cap in CAPS:
        _apply_cap(schemas[collection], path, keyword, getattr(limits, cap))
    return schemas


async def install(db, limits: Limits) -> bool:
    """Install or update the validators; a server or a role that refuses them only loses the early check."""
    try:
        for name, validator in validators(limits).items():
            try:
                await db.create_collection(name, validator=validator, validationLevel="moderate")
            except CollectionInvalid:  # it exists (perhaps another daemon just made it): update it
                await db.command("collMod", name, validator=validator, validationLevel="moderate")
    except OperationFailure as exc:
        log.warning("could not install the $jsonSchema validators (%s); documents are still checked by the daemon",
                    said(exc))
        return False
    return True
