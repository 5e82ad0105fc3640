"""Operator settings: parsed once, one line when bad, and every one of them documented."""

from pathlib import Path

import pytest

from listener.settings import Settings, SettingsError
from training.limits import Limits

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_and_cap_is_in_the_readme():
    names = [n for n in Settings.model_fields if n != "limits"] + [n for n in Limits.model_fields
                                                                     if n != "private_roots"]
    missing = [Limits.setting(n) for n in names if Limits.setting(n) not in README]
    assert not missing


@pytest.mark.parametrize(("environ", "variable"), [
    ({"MONGOTUNE_LEASE_S": "abc"}, "MONGOTUNE_LEASE_S"),
    ({"MONGOTUNE_LEASE_S": "0"}, "MONGOTUNE_LEASE_S"),
    ({"MONGOTUNE_MAX_JOBS": "-1"}, "MONGOTUNE_MAX_JOBS"),
    ({"MONGOTUNE_MAX_STEPS": "1e9x"}, "MONGOTUNE_MAX_STEPS"),
    ({"MONGOTUNE_TRUST_REMOTE_CODE": "maybe"}, "MONGOTUNE_TRUST_REMOTE_CODE"),
    ({"MONGOTUNE_SERVING_MEMORY_BYTES": "1"}, "MONGOTUNE_SERVING_MEMORY_BYTES"),
])
def test_a_bad_value_is_one_line_naming_the_variable(environ, variable):
    with pytest.raises(SettingsError) as bad:
        Settings.load({}, environ)
    assert str(bad.value).startswith(variable) and "\n" not in str(bad.value)


def test_lists_and_the_listeners_own_folder(tmp_path):
    settings = Settings.load({}, {"MONGOTUNE_HOME": str(tmp_path), "MONGOTUNE_MODEL_ROOTS": "/srv/a:/srv/b",
                                  "MONGOTUNE_COLLECTIONS": "docs, pirate_*"})
    assert settings.limits.model_roots == (Path("/srv/a"), Path("/srv/b"))
    assert settings.limits.collections == ("docs", "pirate_*")
    assert settings.limits.private_roots == (tmp_path,)


def test_the_uri_can_come_from_a_file(tmp_path):
    secret = tmp_path / "uri"
    secret.write_text("mongodb://u:p@h/db?replicaSet=rs\n")
    assert Settings.load({"uri_file": secret}, {}).uri == "mongodb://u:p@h/db?replicaSet=rs"
    with pytest.raises(SettingsError):
        Settings.load({"uri_file": tmp_path / "missing"}, {})


def test_the_rendezvous_port_range():
    assert Settings.load({}, {}).rendezvous_ports == (29400, 29499)
    assert Settings.load({}, {"MONGOTUNE_RENDEZVOUS_PORTS": "30000-30009"}).rendezvous_ports == (30000, 30009)
    assert Settings.load({}, {"MONGOTUNE_RENDEZVOUS_PORTS": "30000"}).rendezvous_ports == (30000, 30000)
    for bad in ("30009-30000", "0-10", "a-b", "1-2-3", "1-70000", "29400,29499", ","):
        with pytest.raises(SettingsError) as refused:
            Settings.load({}, {"MONGOTUNE_RENDEZVOUS_PORTS": bad})
        assert str(refused.value).startswith("MONGOTUNE_RENDEZVOUS_PORTS")
