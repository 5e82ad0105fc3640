"""Mistakes with a hint (issue 23 §5): a misspelt collection or model id names the closest one in the database, a
`data.key` that fits no document lists the fields the documents have, and `apply --dry-run` checks the data."""

import pytest
from click.testing import CliRunner

from listener.cli.main import cli
from tests.conftest import finished, wait_for
from tests.documents import heartbeat
from training import defaults
from training.config import DataSpec, SpecError
from training.dataset import check_documents
from training.limits import Limits


def refused(db, **data) -> SpecError:
    """What the training child's data reading (`check_documents`, then `read_datasets`) raises."""
    with pytest.raises(SpecError) as info:
        check_documents(db, DataSpec.model_validate(data), Limits())
    return info.value


def invoke(server_uri, db, *args):
    return CliRunner().invoke(cli, [args[0], "--uri", server_uri, "--db", db.name, *args[1:]])


def first_line(result) -> str:
    return result.output.splitlines()[0] if result.output else ""


def test_a_misspelt_collection_names_the_closest_one_not_mongotunes_own(db):
    db.pirate_chat.insert_one({"text": "arr"})
    db[defaults.MODELS].insert_one({"_id": "m"})
    error = refused(db, collection="pirate_caht")
    assert error.field == "data.collection"
    assert error.message == (f"there is no collection 'pirate_caht' in database {db.name!r}; "
                             "did you mean 'pirate_chat'?")
    assert refused(db, collection="models").message == f"there is no collection 'models' in database {db.name!r}"


def test_an_empty_collection_names_a_close_one_with_documents(db):
    db.create_collection("pirate_chats")
    db.pirate_chat.insert_one({"text": "arr"})
    error = refused(db, collection="pirate_chats")
    assert error.field == "data.collection"
    assert error.message == ("collection 'pirate_chats' has no documents (check the name and the database); "
                             "did you mean 'pirate_chat'?")


def test_a_key_no_document_has_lists_the_fields_they_have(db):
    db.qa.insert_many([{"question": "q", "answer": "a"}, {"question": "q", "lang": "en"}])
    error = refused(db, collection="qa", key="text")
    assert error.field == "data.key"
    assert error.message == ("2 of 2 selected documents have no field 'text'; "
                             "the documents have fields 'answer', 'lang', 'question'")
    pair = refused(db, collection="qa", key=["question", "response"])
    assert pair.message.endswith("no field 'response'; the documents have fields 'answer', 'lang', 'question'")


def test_a_key_some_documents_have_lists_no_fields(db):
    db.qa.insert_many([{"text": "a"}, {"body": "b"}])
    assert refused(db, collection="qa").message == "1 of 2 selected documents have no field 'text'"


def test_the_fields_listed_are_few_short_and_inert(db):
    hostile = "\x1b]0;owned\x07[bold red]x" + "y" * 500
    db.wide.insert_one({**{f"f{i:02}": i for i in range(30)}, hostile: 1})
    message = refused(db, collection="wide", key="text").message
    assert message.endswith("'f09', 'f10' and 19 more") and "'f11'" not in message  # the hostile name sorts first
    assert "\\x1b]0;owned\\x07\\[bold red]xyy" in message and "\x1b" not in message and "y" * 100 not in message
    # beyond the sample of 20 documents, fields are not read
    db.many.insert_many([{"_id": i, "body": "b"} for i in range(20)] + [{"_id": 20, "late": "x", "body": "b"}])
    assert refused(db, collection="many", key="text").message.endswith("the documents have fields 'body'")


def test_a_misspelt_model_id_names_the_closest_one_in_every_command(server_uri, db, tmp_path):
    db[defaults.MODELS].insert_many([{"_id": "pirate", "status": "succeeded"}, {"_id": "parrot"}])
    heartbeat(db)  # predict asks only when a daemon would answer
    commands = [("logs",), ("logs", "--follow"), ("cancel",), ("retrain",), ("checkpoints",), ("delete", "--yes"),
                ("export", str(tmp_path / "out")), ("plot", "-o", str(tmp_path / "p.png")),
                ("export-template", str(tmp_path / "t")), ("predict", "ahoy")]
    for command, *args in commands:
        result = invoke(server_uri, db, command, "pirat", *args)
        assert result.exit_code == 1, (command, result.output)
        assert first_line(result) == (f"Error: no model with _id 'pirat' in {db.name}._models: "
                                      "did you mean 'pirate'?"), (command, result.output)
    far = invoke(server_uri, db, "logs", "kraken")
    assert first_line(far) == f"Error: no model with _id 'kraken' in {db.name}._models: `listener status` lists them"
    assert db[defaults.REQUESTS].count_documents({}) == 0 and db[defaults.MODELS].count_documents({}) == 2
    assert not (tmp_path / "out").exists() and not (tmp_path / "t").exists()


@pytest.fixture
def template(server_uri, db, tmp_path, model_root, monkeypatch):
    """A model template exported from a stored model, with variables for the collection and the key."""
    monkeypatch.setenv("MONGOTUNE_MODEL_ROOTS", str(model_root))
    db[defaults.MODELS].insert_one({"_id": "pirate", "model_name_or_path": str(model_root / "base"),
                                    "data": {"collection": "pirate_chat", "key": "text"},
                                    "trainer": {"max_steps": 2}})
    folder = tmp_path / "pirate-template"
    exported = invoke(server_uri, db, "export-template", "pirate", str(folder), "--var",
                      "collection=data.collection", "--var", "key=data.key")
    assert exported.exit_code == 0, exported.output
    return folder


def test_apply_dry_run_checks_the_data_and_inserts_nothing(server_uri, db, template):
    db.pirate_chat.insert_many([{"prompt": "p", "response": "arr"} for _ in range(3)])
    cases = [
        (("--set", "collection=pirate_caht"), "Error: the data it would train on does not fit: data.collection: there"
         f" is no collection 'pirate_caht' in database {db.name!r}; did you mean 'pirate_chat'?"),
        ((), "Error: the data it would train on does not fit: data.key: 3 of 3 selected documents have no field "
             "'text'; the documents have fields 'prompt', 'response'"),
    ]
    for args, line in cases:
        result = invoke(server_uri, db, "apply", str(template), "--dry-run", "--id", "new", *args)
        assert result.exit_code == 1 and first_line(result) == line, result.output
        assert len(result.output.strip().splitlines()) == 1
    fits = invoke(server_uri, db, "apply", str(template), "--dry-run", "--id", "new", "--set", "key=response")
    assert fits.exit_code == 0, fits.output
    assert fits.stdout.splitlines()[0] == "_id: new"
    assert "checked the data: 3 selected document(s) in collection 'pirate_chat'" in fits.stderr
    assert db[defaults.MODELS].count_documents({}) == 1


def test_a_daemon_writes_the_hint_into_the_failed_models_error(db, start_daemon, tiny_model_path):
    db.pirate_chat.insert_one({"text": "arr"})
    start_daemon()
    db[defaults.MODELS].insert_one({"_id": "typo", "model_name_or_path": tiny_model_path,
                                    "data": {"collection": "pirate_caht"}, "trainer": {"max_steps": 1}})
    document = wait_for(db[defaults.MODELS], "typo", finished, timeout_s=180)
    assert document["status"] == "failed"
    assert document["error"]["field"] == "data.collection"
    assert document["error"]["message"].endswith("did you mean 'pirate_chat'?")


def test_a_hint_names_only_collections_the_operator_lets_documents_train_on(db):
    """With MONGOTUNE_COLLECTIONS set, a hint is an oracle for the names of collections outside it (another
    team's): a document naming an allowed but missing collection must not learn the closest forbidden one."""
    db.team_b_payroll.insert_one({"text": "salary"})
    db.team_a_chat.insert_one({"text": "arr"})
    limits = Limits(collections=("team_a_*",))
    with pytest.raises(SpecError) as info:
        check_documents(db, DataSpec.model_validate({"collection": "team_a_payroll"}), limits)
    assert "team_b" not in info.value.message, info.value.message
    with pytest.raises(SpecError) as info:
        check_documents(db, DataSpec.model_validate({"collection": "team_a_caht"}), limits)
    assert info.value.message.endswith("did you mean 'team_a_chat'?"), info.value.message


def test_field_names_are_cut_where_they_are_read(db):
    """Twenty documents with a 4 MB field name each would be 80 MB read into the training child for a hint that
    shows 60 characters of one: names are cut by the server."""
    from training.hints import MAX_COMPARED_CHARS, field_names

    db.huge.insert_many([{"_id": i, "body": "b", f"{i:02}" + "n" * 4_000_000: 1} for i in range(20)])
    names = field_names(db.huge, {})
    assert len(names) == 21 and max(len(name) for name in names) <= MAX_COMPARED_CHARS


def test_model_ids_are_cut_where_they_are_read(db):
    """Models with 4 MB `_id`s would be read whole for a "did you mean" that compares 255 characters: the server
    sends only ids short enough to compare, and ObjectIds as their hex."""
    from bson import ObjectId

    from training.hints import closest_model_id

    oid = ObjectId()
    db[defaults.MODELS].insert_many([{"_id": f"{i}" + "x" * 4_000_000} for i in range(3)] + [{"_id": "pirate"},
                                                                                           {"_id": oid}])
    assert closest_model_id(db[defaults.MODELS], "pirat") == "pirate"
    typo = str(oid)[:-1] + ("1" if str(oid).endswith("0") else "0")
    assert closest_model_id(db[defaults.MODELS], typo) == oid
    assert closest_model_id(db[defaults.MODELS], "0" + "x" * 300) is None
