"""The document schema installed as a `$jsonSchema` validator, so any driver's bad insert is refused.

It is generated from the same pydantic models the daemon parses with (`training.config`), so the
two cannot drift apart; the daemon still parses every document, for servers that refuse
validators and for rules JSON Schema cannot say (such as `trust_remote_code`).
"""

import logging

from pymongo.errors import CollectionInvalid, OperationFailure

from listener import defaults
from listener.status import MODEL_TRANSITIONS, REQUEST_TRANSITIONS
from training.config import LISTENER_FIELDS, ModelSpec, RequestSpec

log = logging.getLogger("mongotune.listener")

BSON_TYPES = {
    "string": "string", "integer": ["int", "long"], "number": ["int", "long", "double", "decimal"],
    "boolean": "bool", "object": "object", "array": "array", "null": "null",
}
COPIED = ("required", "enum", "minimum", "maximum", "minLength", "maxLength", "description")


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


def validators() -> dict[str, dict]:
    return {
        defaults.MODELS: document_schema(ModelSpec, [s.value for s in MODEL_TRANSITIONS]),
        defaults.REQUESTS: document_schema(RequestSpec, sorted({s.value for v in REQUEST_TRANSITIONS.values()
                                                                for s in v} | {"pending"})),
    }


async def install(db) -> bool:
    """Install or update the validators; a server or a role that refuses them only loses the early check."""
    try:
        for name, validator in validators().items():
            try:
                await db.create_collection(name, validator=validator, validationLevel="moderate")
            except CollectionInvalid:  # it exists (perhaps another daemon just made it): update it
                await db.command("collMod", name, validator=validator, validationLevel="moderate")
    except OperationFailure as exc:
        log.warning("could not install the $jsonSchema validators (%s); documents are still checked by the daemon",
                    (exc.details or {}).get("errmsg", exc))
        return False
    return True
