"""`listener.connection`: redaction, database name resolution and the replica-set check, on real servers."""

import asyncio
import time

import click
import pytest
from click.testing import CliRunner

from listener.cli.options import connection_options
from listener.connection import ConnectionProblem, connect, database_name, redact
from listener.embedded import free_port
from training import defaults

# --- redact --------------------------------------------------------------------------------------


@pytest.mark.parametrize("uri, expected", [
    ("mongodb://alice:s3cret@db.example.com:27017/app?replicaSet=rs0",
     "mongodb://alice:***@db.example.com:27017/app?replicaSet=rs0"),
    ("mongodb+srv://alice:s3cret@cluster0.abc.mongodb.net/app?retryWrites=true",
     "mongodb+srv://alice:***@cluster0.abc.mongodb.net/app?retryWrites=true"),
    ("mongodb://alice:p%40ss%3Aw%2Frd%21@h1:1,h2:2/?replicaSet=rs0", "mongodb://alice:***@h1:1,h2:2/?replicaSet=rs0"),
    ("mongodb://alice:pa:ss/word@h/", "mongodb://alice:***@h/"),
    ("mongodb://alice:@h/", "mongodb://alice:***@h/"),
])
def test_redact_hides_passwords(uri, expected):
    assert redact(uri) == expected


@pytest.mark.parametrize("secret", ["s3cret", "p%40ss%3Aw%2Frd%21", "pa:ss/word", "x!#$%25^&*()"])
@pytest.mark.parametrize("scheme", ["mongodb", "mongodb+srv"])
def test_redacted_uri_never_holds_the_password(secret, scheme):
    redacted = redact(f"{scheme}://someone:{secret}@host.example.com/db?authSource=admin")
    assert secret not in redacted
    assert redacted.startswith(f"{scheme}://someone:***@host.example.com")


@pytest.mark.parametrize("uri", [
    "mongodb://127.0.0.1:27017/?replicaSet=rs0",
    "mongodb://h1:1,h2:2/app",
    "mongodb+srv://cluster0.abc.mongodb.net/app?retryWrites=true",
    "mongodb://alice@h/?authMechanism=MONGODB-X509",
])
def test_redact_leaves_uris_without_password_alone(uri):
    assert redact(uri) == uri


def test_redact_hides_a_password_with_an_unescaped_at():
    assert "ss" not in redact("mongodb://u:p@ss@h/").removeprefix("mongodb://u:***@")


def test_redact_hides_tls_key_password_option():
    assert "s3cret" not in redact("mongodb://h/?tls=true&tlsCertificateKeyFilePassword=s3cret&replicaSet=rs")


# --- database_name -------------------------------------------------------------------------------


def test_database_name_precedence(monkeypatch):
    monkeypatch.setenv(defaults.ENV_DB, "from_env")
    assert database_name("mongodb://h/from_uri?replicaSet=rs", "from_flag") == "from_flag"
    assert database_name("mongodb://h/from_uri?replicaSet=rs", None) == "from_uri"
    assert database_name("mongodb://h1:1,h2:2/from_uri", None) == "from_uri"
    assert database_name("mongodb://h/?replicaSet=rs", None) == "from_env"
    assert database_name("mongodb://h", None) == "from_env"
    monkeypatch.delenv(defaults.ENV_DB)
    assert database_name("mongodb://h/?replicaSet=rs", None) == defaults.DEFAULT_DB
    assert database_name("mongodb://h/?replicaSet=rs", "") == defaults.DEFAULT_DB


def test_database_name_of_an_unparsable_uri_falls_back(monkeypatch):
    monkeypatch.delenv(defaults.ENV_DB, raising=False)
    assert database_name("not a uri", None) == defaults.DEFAULT_DB


def test_database_name_from_an_srv_uri_needs_no_dns(monkeypatch):
    monkeypatch.delenv(defaults.ENV_DB, raising=False)
    assert database_name("mongodb+srv://alice:pw@cluster0.example.invalid/from_uri", None) == "from_uri"


@click.command()
@connection_options
def _which_db(uri, db):
    click.echo(database_name(uri, db))


def test_cli_flag_beats_uri_path(monkeypatch):
    monkeypatch.delenv(defaults.ENV_DB, raising=False)
    result = CliRunner().invoke(_which_db, ["--uri", "mongodb://h/from_uri", "--db", "from_flag"])
    assert result.output.strip() == "from_flag"
    result = CliRunner().invoke(_which_db, ["--uri", "mongodb://h/from_uri"])
    assert result.output.strip() == "from_uri"


def test_cli_uri_path_beats_environment(monkeypatch):
    monkeypatch.setenv(defaults.ENV_DB, "from_env")
    result = CliRunner().invoke(_which_db, ["--uri", "mongodb://h/from_uri"])
    assert result.output.strip() == "from_uri"


# --- connect -------------------------------------------------------------------------------------


def test_connect_to_the_replica_set(server_uri):
    async def check():
        client = await connect(server_uri, timeout_s=10)
        try:
            hello = await client.admin.command("hello")
            assert hello.get("setName")
            await client["mongotune_connect_check"].probe.insert_one({"ok": 1})
            assert await client["mongotune_connect_check"].probe.count_documents({}) >= 1
        finally:
            await client.drop_database("mongotune_connect_check")
            await client.close()

    asyncio.run(check())


def test_connect_to_a_standalone_is_refused(standalone_uri):
    with pytest.raises(ConnectionProblem) as info:
        asyncio.run(connect(standalone_uri, timeout_s=10))
    message = str(info.value)
    assert "replica set" in message
    assert "standalone" in message
    assert f"127.0.0.1:{standalone_uri.rsplit(':', 1)[1].strip('/')}" in message


def test_connect_to_a_closed_port_fails_quickly_and_redacted():
    uri = f"mongodb://alice:Hunter2Secret@127.0.0.1:{free_port()}/app?replicaSet=rs0"
    started = time.monotonic()
    with pytest.raises(ConnectionProblem) as info:
        asyncio.run(connect(uri, timeout_s=1))
    assert time.monotonic() - started < 8
    message = str(info.value)
    assert "Hunter2Secret" not in message
    assert "alice:***@127.0.0.1" in message
    assert "cannot reach" in message


def test_connect_with_a_malformed_uri_is_a_connection_problem():
    with pytest.raises(ConnectionProblem):
        asyncio.run(connect("mongodb://alice:p@ss@127.0.0.1:1/", timeout_s=1))
