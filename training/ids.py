"""Document ids as exact values: one type and value, never a pattern, never confused with a look-alike.

`ObjectId("...")` and the string of its hex are two models; so are `1` and `"1"`. But `5` and
`Int64(5)` are one: the server's `$eq` and its unique `_id` index take integers by value, whatever
their width, so `key` does too. Everything that keys, batches, caches, locks or names by id goes
through `key` (canonical extended JSON keeps every other BSON type) or `file_name` (a readable
prefix plus a hash of that key, so names are one-to-one). Ids enter queries only through `eq`, as literals.
"""

import hashlib
import re
import uuid

from bson import Int64, ObjectId, json_util
from bson.binary import Binary
from bson.raw_bson import RawBSONDocument
from bson.json_util import CANONICAL_JSON_OPTIONS

PLAIN_ID_TYPES = (str, int, Int64, ObjectId, uuid.UUID)
MAX_ID_CHARS = 512


class BadId(ValueError):
    """An id that is not a plain value; the message says what to use instead."""


def check(value):
    """The id itself if it is a plain value (string, integer, ObjectId, UUID); BadId otherwise."""
    if isinstance(value, Binary) and value.subtype == 4:
        return value
    if isinstance(value, bool) or not isinstance(value, PLAIN_ID_TYPES):
        raise BadId(f"must be a plain id (a string, an integer or an ObjectId), not {type(value).__name__}")
    if isinstance(value, str) and not (0 < len(value) <= MAX_ID_CHARS):
        raise BadId(f"must be a string of 1 to {MAX_ID_CHARS} characters")
    if isinstance(value, str) and value.startswith("$"):
        raise BadId("must not start with '$', which MongoDB reads as an operator")
    return value


def key(value) -> str:
    """A string that differs whenever the value differs, or its BSON type (integers of either width are one type).

    An id read raw (a document or array, as `listener.records.raw_id` gives one, perhaps nested deeper than the
    driver decodes) is keyed by its bytes: an Int32 and an Int64 of one value inside it give two keys, as do two
    orders of its fields. That is safe because a raw id is keyed only where its document cannot be decoded (to log
    it once): its key is never compared with a decoded id's, and one document's raw id always has the same bytes."""
    if isinstance(value, RawBSONDocument):
        return f"raw:{hashlib.sha256(value.raw).hexdigest()}"
    return json_util.dumps(_one_integer_type(value), json_options=CANONICAL_JSON_OPTIONS)


def _one_integer_type(value):
    """`value` with every Int64 as a plain int, at any depth: json_util then writes each integer alike."""
    if type(value) is Int64:
        return int(value)
    if isinstance(value, (list, tuple)):
        return [_one_integer_type(item) for item in value]
    if isinstance(value, dict):
        return {name: _one_integer_type(item) for name, item in value.items()}
    return value


def digest(id_key: str, chars: int = 32) -> str:
    """A `key` of a fixed size, whatever the id (hex of its SHA-256): for names and records that must stay small."""
    return hashlib.sha256(id_key.encode()).hexdigest()[:chars]


def file_name(value, suffix: str = "") -> str:
    """A file name for an id: readable where it can be, and one-to-one through a hash of `key`."""
    readable = re.sub(r"[^A-Za-z0-9_.-]", "_", str(value))[:60].lstrip(".") or "id"
    return f"{readable}-{digest(key(value), 16)}{suffix}"


def eq(value) -> dict:
    """The query condition that matches exactly this id, whatever it looks like."""
    return {"$eq": value}
