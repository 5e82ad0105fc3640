"""Getting training documents into a collection: local files, Hugging Face datasets, the shipped samples.

Every source becomes a stream of plain dicts whose values BSON can hold (numpy scalars, NaN, dates
and tuples are converted here), tagged with the fold the trainer reads (`data.fold_field`, "train" or
"valid"), and inserted in batches. Problems are `ImportFailed` with one line saying what to change.
"""

import contextlib
import datetime as dt
import decimal
import itertools
import math
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from bson import DBRef, Decimal128, MaxKey, MinKey, ObjectId, Regex, Timestamp, json_util
from bson.errors import BSONError
from pymongo.errors import BulkWriteError

FILE_FORMATS = (".json", ".jsonl", ".csv", ".parquet")
SAMPLES = ("pirate_chat", "pirate_prompt_response", "pirate_text")
TRAIN, VALID = "train", "valid"  # the fold values training/dataset.py reads
SPLIT_FOLDS = {"train": TRAIN, "training": TRAIN, "validation": VALID, "valid": VALID, "val": VALID,
               "test": VALID, "eval": VALID, "evaluation": VALID, "dev": VALID}
BATCH = 500  # documents per insert_many
BSON_NATIVE = (str, bool, int, bytes, dt.datetime, uuid.UUID, Decimal128, ObjectId, Regex, Timestamp, MinKey, MaxKey,
               DBRef)  # stored as they are (what json_util reads from extended JSON)


class ImportFailed(Exception):
    """An import that cannot go on: the message says what to change."""


@dataclass
class Part:
    """Documents from one source (a file, or one split of a dataset) and the fold they go to (None: as they are)."""

    name: str
    rows: Iterable[dict]
    total: int | None
    fold: str | None


def bson_value(value, where: str = "value"):
    """`value` as something BSON holds: numpy and pandas scalars unwrapped, NaN as null, tuples and sets as lists."""
    if value is None or isinstance(value, BSON_NATIVE):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): bson_value(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [bson_value(v, where) for v in value]
    if isinstance(value, decimal.Decimal):
        return Decimal128(value)
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day)
    for unwrap in ("to_pydatetime", "tolist", "item"):  # pandas timestamps, numpy arrays, numpy scalars
        if callable(getattr(value, unwrap, None)):
            return bson_value(getattr(value, unwrap)(), where)
    if value.__class__.__name__ in {"NAType", "NaTType"}:
        return None
    raise ImportFailed(f"{where}: a {type(value).__name__} cannot be stored in MongoDB; convert it to text or a number")


def document(row: dict, fold: str | None, fold_field: str) -> dict:
    if not isinstance(row, dict):
        raise ImportFailed(f"every record must be an object, not {type(row).__name__}")
    converted = bson_value(row, "document")
    if fold is not None:
        converted[fold_field] = fold
    return converted


def fold_of_split(split: str) -> str:
    try:
        return SPLIT_FOLDS[split.lower()]
    except KeyError:
        raise ImportFailed(f"split {split!r} has no fold: pick splits with --split and a fold with --fold train|valid "
                           f"(known: {', '.join(sorted(SPLIT_FOLDS))})") from None


def _json_rows(text: str, name: str) -> list:
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            return json_util.loads(text)
        return [json_util.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as exc:
        raise ImportFailed(f"{name} is not JSON (an array, or one object per line): {exc}") from None


def _csv_rows(path: Path) -> list[dict]:
    import pandas

    try:
        frame = pandas.read_csv(path)
    except (ValueError, pandas.errors.ParserError) as exc:
        raise ImportFailed(f"{path.name} is not readable CSV: {str(exc).splitlines()[0]}") from None
    return frame.to_dict("records")


def _parquet_rows(path: Path) -> list[dict]:
    import pyarrow
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as exc:
        raise ImportFailed(f"{path.name} is not readable Parquet: {exc}") from None


def file_part(path: Path, fold: str | None) -> Part:
    """A local .json, .jsonl, .csv or .parquet file."""
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise ImportFailed(f"{path.name}: import reads {', '.join(FILE_FORMATS)} files or a Hugging Face dataset id")
    if suffix == ".csv":
        rows = _csv_rows(path)
    elif suffix == ".parquet":
        rows = _parquet_rows(path)
    else:
        try:
            rows = _json_rows(path.read_text(encoding="utf-8"), path.name)
        except UnicodeDecodeError:
            raise ImportFailed(f"{path.name} is not UTF-8 text") from None
        rows = rows if isinstance(rows, list) else [rows]
    return Part(path.name, rows, len(rows), fold)


def sample_parts(names: Iterable[str], fold: str | None) -> list[Part]:
    """The sample datasets shipped in `listener/samples/` (their documents already carry `_fold`)."""
    parts = []
    for name in names:
        if name not in SAMPLES:
            raise ImportFailed(f"no sample named {name!r}; the samples are {', '.join(SAMPLES)}")
        text = resources.files("listener").joinpath("samples", f"{name}.jsonl").read_text(encoding="utf-8")
        rows = _json_rows(text, name)
        parts.append(Part(name, rows, len(rows), fold))
    return parts


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """HF_HUB_OFFLINE for one load, even when `datasets` was imported (and read the variable) before."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    if offline:
        datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def dataset_parts(source: str, config: str | None, splits: tuple[str, ...], fold: str | None,
                  offline: bool) -> list[Part]:
    """A Hugging Face dataset (a hub id, or a local folder `datasets` can read), one part per split."""
    import datasets

    try:
        with _hub_offline(offline):
            loaded = datasets.load_dataset(source, config)
    except (ConnectionError, FileNotFoundError) as exc:
        if Path(source).is_dir():
            raise ImportFailed(f"folder {source} holds no data files `datasets` can read ({exc})") from None
        raise ImportFailed(f"dataset {source!r} is neither a local file nor in the local Hugging Face cache, and the "
                           f"Hub could not provide it ({exc.__class__.__name__}); check the id, or download it once "
                           "on a host that reaches the Hub") from None
    except (ValueError, OSError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise ImportFailed(f"dataset {source!r} cannot be loaded: {str(exc).splitlines()[0]}") from None
    unknown = [s for s in splits if s not in loaded]
    if unknown:
        raise ImportFailed(f"dataset {source!r} has no split {unknown[0]!r}; it has {', '.join(loaded)}")
    return [Part(f"{source}[{split}]", loaded[split], loaded[split].num_rows, fold or fold_of_split(split))
            for split in (splits or tuple(loaded))]


def parts_of(source: str, *, config: str | None = None, splits: tuple[str, ...] = (), fold: str | None = None,
             offline: bool = False) -> list[Part]:
    """What SOURCE names: a local file when one exists there, else a dataset for `datasets`."""
    path = Path(source)
    if path.is_file():
        if splits or config:
            raise ImportFailed("--split and --config are for Hugging Face datasets, not for a local file")
        return [file_part(path, fold)]
    if not path.is_dir() and (path.suffix.lower() in FILE_FORMATS or path.is_absolute() or source.startswith(".")
                              or source.count("/") > 1):
        raise ImportFailed(f"no file {source}: give a file that exists, or a Hugging Face dataset id like owner/name")
    return dataset_parts(source, config, splits, fold, offline)


def _batches(rows: Iterable[dict], size: int) -> Iterator[list[dict]]:
    iterator = iter(rows)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def insert(collection, part: Part, *, fold_field: str = "_fold", limit: int | None = None, batch: int = BATCH,
           advance: Callable[[int], None] = lambda n: None) -> int:
    """Insert one part in batches (at most `limit` documents); returns how many went in."""
    rows = itertools.islice(part.rows, limit) if limit is not None else part.rows
    done = 0
    for chunk in _batches(rows, batch):
        documents = [document(row, part.fold, fold_field) for row in chunk]
        try:
            collection.insert_many(documents, ordered=True)
        except (BSONError, OverflowError) as exc:
            raise ImportFailed(f"{part.name}: a document cannot be stored in MongoDB ({exc})") from None
        except BulkWriteError as exc:  # a refused document; connection trouble goes up to the CLI's one line
            first = (exc.details.get("writeErrors") or [{}])[0]
            raise ImportFailed(f"{part.name}: the server refused document {done + first.get('index', 0) + 1} "
                               f"({first.get('errmsg', exc)}); {done + first.get('index', 0)} went in") from None
        done += len(documents)
        advance(len(documents))
    return done
