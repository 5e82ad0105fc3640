""""Did you mean" hints from the names already in the database: collections, model ids, fields.

Every name here was written by someone untrusted (a collection's or a field's name, a model's `_id`),
so each is made inert and cut short, and a hint shows one name, or a few fields, never a listing.
"""

import difflib

from pymongo.errors import PyMongoError

from training.inert import inert

MAX_NAME_CHARS = 60  # one name as shown
MAX_CANDIDATES = 10_000  # names compared: difflib is linear in their count
MAX_COMPARED_CHARS = 255  # longer names are not compared (difflib is quadratic in length)
SAMPLE_DOCUMENTS = 20  # documents whose top-level fields a hint lists
MAX_FIELDS = 12  # fields listed, the rest counted
MAX_FIELDS_PER_DOCUMENT = 200  # field names read from one document


def shown(name) -> str:
    """A name quoted for a message: inert and bounded."""
    return f"'{inert(name if isinstance(name, str) else str(name), MAX_NAME_CHARS)}'"


def closest(name: str, names) -> str | None:
    """The one name in `names` closest to `name`, if any is close enough to be the one meant."""
    if not isinstance(name, str) or len(name) > MAX_COMPARED_CHARS:
        return None
    candidates = [n for n in names if isinstance(n, str) and n != name and len(n) <= MAX_COMPARED_CHARS]
    matches = difflib.get_close_matches(name, candidates[:MAX_CANDIDATES], n=1, cutoff=0.6)
    return matches[0] if matches else None


def user_collections(db, limits) -> list[str] | None:
    """The database's collections a document may train on (`MONGOTUNE_COLLECTIONS`; never `system.*` or
    mongotune's own, nor a view): a hint never names one outside them, another team's say; None if the server
    would not list them."""
    from training.config import COLLECTION_TYPES, collection_allowed

    try:
        names = db.list_collection_names(filter={"type": {"$in": list(COLLECTION_TYPES)}}, authorizedCollections=True)
    except PyMongoError:
        return None
    return sorted(n for n in names if isinstance(n, str) and collection_allowed(n, limits))


def did_you_mean(name: str, names) -> str:
    """'; did you mean 'X'?' naming the one of `names` closest to `name`, or ''."""
    close = closest(name, names or ())
    return f"; did you mean {shown(close)}?" if close else ""


def closest_model_id(models, model_id):
    """The `_id` in `models` closest to `model_id` (compared as text), or None.

    Only ids short enough to compare come back from the server, each at most `MAX_COMPARED_CHARS`
    long: a document's `_id` may be megabytes, and thousands of them would be read for one hint.
    """
    as_text = {"$toString": "$_id"}
    pipeline = [{"$match": {"_id": {"$type": ["string", "objectId", "int", "long"]}}}, {"$limit": MAX_CANDIDATES},
                {"$project": {"_id": 0, "text": {"$substrCP": [as_text, 0, MAX_COMPARED_CHARS + 1]},
                              "value": {"$cond": [{"$lte": [{"$strLenCP": as_text}, MAX_COMPARED_CHARS]}, "$_id", None]}}}]
    try:
        found = [d for d in models.aggregate(pipeline) if d.get("value") is not None]
    except PyMongoError:
        return None
    by_text = {}
    for row in found:
        by_text.setdefault(row["text"], row["value"])
    close = closest(model_id if isinstance(model_id, str) else str(model_id), by_text)
    return by_text[close] if close is not None else None


def field_names(collection, selection: dict) -> list[str]:
    """The top-level field names (not `_id`) of the first few selected documents, sorted; only names are read."""
    # Cut by the server: a field name may be megabytes long, and only a few characters of it are shown.
    names = {"$map": {"input": {"$objectToArray": "$$ROOT"}, "in": {"$substrCP": ["$$this.k", 0, MAX_COMPARED_CHARS]}}}
    pipeline = [{"$match": selection}, {"$sort": {"_id": 1}}, {"$limit": SAMPLE_DOCUMENTS},
                {"$project": {"_id": 0, "names": {"$slice": [names, MAX_FIELDS_PER_DOCUMENT]}}}]
    try:
        found = {name for doc in collection.aggregate(pipeline) for name in doc.get("names") or ()}
    except PyMongoError:
        return []
    return sorted(name for name in found if isinstance(name, str) and name != "_id")


def fields_hint(collection, selection: dict) -> str:
    """'; the documents have fields 'a', 'b' (and N more)', from a sample of the selected documents, or ''."""
    names = field_names(collection, selection)
    if not names:
        return ""
    listed = ", ".join(shown(name) for name in names[:MAX_FIELDS])
    more = f" and {len(names) - MAX_FIELDS} more" if len(names) > MAX_FIELDS else ""
    return f"; the documents have fields {listed}{more}"
