"""`listener import-data`: every source format into a real collection, with the folds the trainer reads."""

import decimal
import json
import math

import numpy as np
import pandas
import pytest
from bson import Decimal128, json_util
from click.testing import CliRunner

from listener import imports
from listener.cli.main import cli

ROWS = [{"prompt": "Hi?", "response": "Ahoy!", "score": 1.5}, {"prompt": "Bye?", "response": "Arr!", "score": 2.0}]


def run(server_uri, db, *args):
    return CliRunner().invoke(cli, ["import-data", "--uri", server_uri, "--db", db.name, *args])


def stored(db, collection: str) -> list[dict]:
    return [{k: v for k, v in d.items() if k != "_id"} for d in db[collection].find().sort("prompt", -1)]


@pytest.mark.parametrize("name, write", [
    ("array.json", lambda path: path.write_text(json.dumps(ROWS))),
    ("lines.json", lambda path: path.write_text("\n".join(json.dumps(r) for r in ROWS))),
    ("rows.jsonl", lambda path: path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")),
    ("rows.csv", lambda path: pandas.DataFrame(ROWS).to_csv(path, index=False)),
    ("rows.parquet", lambda path: pandas.DataFrame(ROWS).to_parquet(path)),
])
def test_each_file_format_lands_as_the_same_documents(server_uri, db, tmp_path, name, write):
    write(tmp_path / name)
    result = run(server_uri, db, str(tmp_path / name), "--collection", "pairs")
    assert result.exit_code == 0, result.output
    assert f"2 documents in {db.name}.pairs" in result.output
    assert stored(db, "pairs") == ROWS


def test_csv_gaps_and_numpy_values_are_converted_not_crashed_on(server_uri, db, tmp_path):
    (tmp_path / "gaps.csv").write_text("text,count\nfirst,1\nsecond,\n,3\n")
    result = run(server_uri, db, str(tmp_path / "gaps.csv"), "--collection", "gaps", "--fold", "train")
    assert result.exit_code == 0, result.output
    texts = [(d["text"], d["count"], d["_fold"]) for d in db["gaps"].find()]
    assert texts == [("first", 1.0, "train"), ("second", None, "train"), (None, 3.0, "train")]

    converted = imports.bson_value({"n": np.int64(7), "x": np.float32(0.5), "v": np.arange(3), "nan": float("nan"),
                                    "t": (1, 2), "d": pandas.Timestamp("2026-01-02"), "m": pandas.NA})
    assert converted["n"] == 7 and type(converted["n"]) is int
    assert converted["x"] == 0.5 and converted["v"] == [0, 1, 2] and converted["t"] == [1, 2]
    assert converted["nan"] is None and converted["m"] is None and converted["d"].year == 2026
    assert isinstance(imports.bson_value(decimal.Decimal("1.10")), Decimal128)
    extended = json_util.loads('{"_id": {"$oid": "65a1b2c3d4e5f60718293a4b"}, "at": {"$date": "2026-01-02T00:00:00Z"}}')
    assert imports.bson_value(extended) == extended
    with pytest.raises(imports.ImportFailed, match=r"document\.f: a builtin_function_or_method cannot be stored"):
        imports.bson_value({"f": math.sqrt}, "document")


def test_dataset_splits_become_folds(server_uri, db, tmp_path):
    """A folder `datasets` reads offline, as a cached hub dataset is: train → train, validation/test → valid."""
    folder = tmp_path / "dataset"
    folder.mkdir()
    for split, count in (("train", 5), ("validation", 2), ("test", 3)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": f"{split} {i}"}) + "\n"
                                                       for i in range(count)))
    result = run(server_uri, db, str(folder), "--collection", "texts", "--offline")
    assert result.exit_code == 0, result.output
    folds = {d["text"]: d["_fold"] for d in db["texts"].find()}
    assert len(folds) == 10
    assert {t.split()[0]: f for t, f in folds.items()} == {"train": "train", "validation": "valid", "test": "valid"}

    only = run(server_uri, db, str(folder), "--collection", "train_only", "--split", "train", "--limit", "4",
               "--fold-field", "part", "--offline")
    assert only.exit_code == 0, only.output
    assert [d["part"] for d in db["train_only"].find()] == ["train"] * 4

    missing = run(server_uri, db, str(folder), "--collection", "x", "--split", "dev", "--offline")
    assert missing.exit_code == 1 and "has no split 'dev'; it has train, validation, test" in missing.output


def test_samples_load_into_any_database_and_collection(server_uri, db):
    everything = run(server_uri, db, "--samples")
    assert everything.exit_code == 0, everything.output
    for name in imports.SAMPLES:
        lines = len(imports.sample_parts([name], None)[0].rows)
        assert db[name].count_documents({}) == lines > 0
    assert db["pirate_chat"].count_documents({"_fold": "valid"}) > 0

    run(server_uri, db, "--samples", "pirate_text", "--collection", "logbook")
    again = run(server_uri, db, "--samples", "pirate_text", "--collection", "logbook", "--drop")
    assert again.exit_code == 0, again.output
    assert db["logbook"].count_documents({}) == db["pirate_text"].count_documents({})

    mixed = run(server_uri, db, "--samples", "--collection", "everything")
    assert mixed.exit_code == 2 and "with --collection, name one sample" in mixed.output
    assert "everything" not in db.list_collection_names()


def broken_file(content: str):
    def write(folder):
        (folder / "broken.json").write_text(content)
        return str(folder / "broken.json")
    return write


@pytest.mark.parametrize("source, args, message", [
    (broken_file("{not json"), (), "broken.json is not JSON"),
    (broken_file("[1, 2]"), (), "every record must be an object, not int"),
    (broken_file("{}"), ("--split", "train"), "--split and --config are for Hugging Face datasets"),
    (broken_file("{}"), ("--collection", "_models"), "use a plain name"),
    (lambda folder: "nobody/no-such-dataset", ("--offline",), "is neither a local file nor in the local Hugging Face"),
    (lambda folder: str(folder / "missing.jsonl"), (), "no file"),
    (lambda folder: str(folder), ("--offline",), "holds no data files `datasets` can read"),
])
def test_a_bad_source_fails_in_one_line(server_uri, db, tmp_path, source, args, message):
    target = () if "--collection" in args else ("--collection", "c")
    result = run(server_uri, db, source(tmp_path), *target, *args)
    assert result.exit_code == 1
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert db.list_collection_names() == []


def test_a_document_the_server_refuses_says_which_and_how_many_went_in(server_uri, db, tmp_path):
    (tmp_path / "twice.jsonl").write_text('{"_id": 1, "text": "a"}\n{"_id": 2, "text": "b"}\n{"_id": 1, "text": "c"}\n')
    result = run(server_uri, db, str(tmp_path / "twice.jsonl"), "--collection", "twice")
    assert result.exit_code == 1 and "twice.jsonl: the server refused document 3 (" in result.output
    assert "duplicate key" in result.output and result.output.strip().endswith("2 went in")
    assert len(result.output.strip().splitlines()) == 1
    assert db["twice"].count_documents({}) == 2
