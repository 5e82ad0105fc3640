"""Attacks a writer of documents can make, made for real against a real daemon on the test server.

Each test asserts the attack did nothing outside the listener's rules, that ordinary work beside it
was done, and that the daemon stayed up. Tests that need no setting of their own share the module's
daemon and database, each with its own model and request ids.
"""

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from listener.cli.main import cli
from listener.connection import redact
from listener.demo import load_samples
from listener.jobs import trim_log
from listener.processes import wait_until
from tests.conftest import finished, wait_for
from tests.documents import QUICK, model
from training import defaults
from training.checkpoints import LimitExceeded
from training.config import SpecError, parse_model
from training.limits import Limits
from training.models import load_model, load_tokenizer



def failed_on(collection, doc_id, field: str) -> dict:
    document = wait_for(collection, doc_id, finished, timeout_s=120)
    assert document["status"] == "failed", document
    assert document["error"]["field"] == field, document["error"]
    return document


def test_model_sources_are_the_operators_choice(module_samples, module_daemon, tiny_model_path, model_root):
    escape = Path(model_root) / f"link-{uuid.uuid4().hex[:6]}"
    escape.symlink_to("/etc")
    home = module_daemon.home
    models = module_samples[defaults.MODELS]
    models.insert_many([
        model("outside", "/etc"),
        model("own-folder", str(home / "serving")),  # the listener's home, where the serving cache lives
        model("through-a-link", str(escape)),
        model("relative", "../../etc/passwd"),
        model("fine-source", tiny_model_path),
    ])
    for doc_id in ("outside", "own-folder", "through-a-link", "relative"):
        error = failed_on(models, doc_id, "model_name_or_path")["error"]
        assert "/etc" not in error["message"] and str(home) not in error["message"]
    assert wait_for(models, "fine-source", finished, timeout_s=120)["status"] == "succeeded"
    assert module_daemon.process.poll() is None


def test_hub_ids_can_be_restricted_by_the_operator(limits):
    strict = limits.model_copy(update={"hub_models": ("HuggingFaceTB/*",)})
    document = {"_id": "m", "data": {"collection": "c"}}
    parse_model({**document, "model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}, strict)
    with pytest.raises(SpecError) as refused:
        parse_model({**document, "model_name_or_path": "someone/evil-model"}, strict)
    assert refused.value.field == "model_name_or_path" and "MONGOTUNE_HUB_MODELS" in refused.value.message


def hub_cache_with(tmp_path: Path, repo_id: str, folder: str) -> Path:
    """A Hugging Face hub cache holding `folder` as `repo_id`'s main revision, laid out as the hub client lays it."""
    cache = tmp_path / "hub"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache


def test_confined_a_hub_id_never_loads_a_folder_from_the_working_directory(db, start_daemon, tiny_model_path,
                                                                            tmp_path):
    load_samples(db)
    cwd = tmp_path / "cwd"
    shutil.copytree(tiny_model_path, cwd / "org" / "name")
    shutil.copytree(tiny_model_path, cwd / "solo")
    cache = hub_cache_with(tmp_path, "org/cached", tiny_model_path)
    start_daemon(env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}, cwd=cwd)
    models = db[defaults.MODELS]
    models.insert_many([model("in-cwd", "org/name"), model("solo-in-cwd", "solo"), model("hub", "org/cached")])
    for doc_id in ("in-cwd", "solo-in-cwd"):
        assert str(cwd) not in failed_on(models, doc_id, "model_name_or_path")["error"]["message"]
    assert wait_for(models, "hub", finished, timeout_s=120)["status"] == "succeeded"


def test_confined_a_tokenizer_named_by_hub_id_is_not_read_from_the_working_directory(tiny_model_path, tmp_path,
                                                                                      monkeypatch, limits):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_path, tmp_path / "org" / "name")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    spec = parse_model({"_id": "m", "model_name_or_path": "org/name", "data": {"collection": "c"}}, limits)
    with pytest.raises(SpecError) as refused:
        load_tokenizer(spec, limits)
    assert refused.value.field == "model_name_or_path"


@pytest.mark.parametrize(("source", "kwargs", "field"), [
    ("~/models/tiny", {}, "model_name_or_path"),
    ("~root", {}, "model_name_or_path"),
    ("./tiny", {}, "model_name_or_path"),
    ("tiny/../tiny", {}, "model_name_or_path"),
    ("/etc", {}, "model_name_or_path"),
    ("org/name\n", {}, "model_name_or_path"),
    ("org/na\x1b[31mme", {}, "model_name_or_path"),
    ("ROOT/tiny\0/etc", {}, "model_name_or_path"),
    ("ROOT/tiny\n", {}, "model_name_or_path"),
    ("ROOT/../etc", {}, "model_name_or_path"),
    ("org/name", {"revision": "main/../../../etc"}, "model_kwargs.revision"),
    ("ROOT/tiny", {"subfolder": ".."}, "model_kwargs.subfolder"),
    ("ROOT/tiny", {"gguf_file": "../x.gguf"}, "model_kwargs.gguf_file"),
])
def test_confined_every_form_of_a_path_is_refused_naming_its_field(source, kwargs, field, tiny_model_path,
                                                                   model_root, limits):
    source = source.replace("ROOT", str(model_root))
    document = {"_id": "m", "model_name_or_path": source, "data": {"collection": "c"}, "model_kwargs": kwargs}
    with pytest.raises(SpecError) as refused:
        load_model(parse_model(document, limits), limits)
    assert refused.value.field == field


def test_confined_a_hub_download_is_sized_by_every_file_it_fetches(limits):
    """Sizing counted .safetensors and .json only, while the snapshot also fetches tokenizer files at any depth
    and the GGUF file a document names: a hub repo whose 'q4.gguf' or 'notes.txt' held 100 GB passed
    max_download_bytes. The sum now matches the fetched files by the same patterns snapshot_download uses."""
    from huggingface_hub.hf_api import RepoSibling

    from training.config import ModelKwargs
    from training.models import download_bytes, hub_files

    huge = 100 * 2**30
    siblings = [RepoSibling("config.json", 600), RepoSibling("model.safetensors", 10**6),
                RepoSibling("pytorch_model.bin", huge), RepoSibling("other.gguf", huge), RepoSibling("modeling.py", huge)]
    plain = hub_files(ModelKwargs())
    assert download_bytes(siblings, plain) == 600 + 10**6
    assert download_bytes([*siblings, RepoSibling("deep/notes.txt", huge)], plain) > limits.max_download_bytes
    gguf = hub_files(ModelKwargs(gguf_file="q4.gguf"))
    assert download_bytes([*siblings, RepoSibling("q4.gguf", huge)], gguf) == 600 + 10**6 + huge
    assert not any(pattern.endswith(".py") for pattern in plain)


def huge_config_folder(root: Path) -> Path:
    """A few hundred bytes claiming a model of about a trillion parameters."""
    folder = root / f"huge-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 65536,
        "intermediate_size": 262144, "num_hidden_layers": 96, "num_attention_heads": 64, "num_key_value_heads": 8,
    }))
    return folder


def test_size_is_checked_before_any_weight_is_allocated(model_root, limits):
    folder = huge_config_folder(model_root)
    spec = parse_model({"_id": "huge", "model_name_or_path": str(folder), "data": {"collection": "c"}}, limits)
    started = time.monotonic()
    with pytest.raises(SpecError) as refused:
        load_model(spec, limits)
    assert time.monotonic() - started < 30, "refused from the configuration, not by trying"
    assert refused.value.field == "model_name_or_path"
    assert "MONGOTUNE_MAX_MODEL_PARAMS" in refused.value.message


def test_a_config_claiming_a_million_layers_is_refused_at_once(model_root, limits):
    folder = model_root / f"deep-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 1_000_000, "num_attention_heads": 1}))
    spec = parse_model({"_id": "deep", "model_name_or_path": str(folder), "data": {"collection": "c"}}, limits)
    with pytest.raises(SpecError) as refused:
        load_model(spec, limits)
    assert "MONGOTUNE_MAX_MODEL_PARAMS" in refused.value.message


def test_huge_models_fail_in_training_and_serving_while_others_go_on(module_samples, module_daemon, tiny_model_path,
                                                                    model_root):
    db = module_samples
    folder = huge_config_folder(model_root)
    db[defaults.MODELS].insert_many([model("huge", str(folder)), model("fine-beside-huge", tiny_model_path)])
    db[defaults.REQUESTS].insert_one({"_id": "ask-huge", "model": "huge", "input": "hi", "checkpoint": "base"})
    assert "MONGOTUNE_MAX_MODEL_PARAMS" in failed_on(db[defaults.MODELS], "huge", "model_name_or_path")["error"][
        "message"]
    assert wait_for(db[defaults.REQUESTS], "ask-huge", finished, timeout_s=120)["status"] == "failed"
    assert wait_for(db[defaults.MODELS], "fine-beside-huge", finished, timeout_s=120)["status"] == "succeeded"
    assert module_daemon.process.poll() is None


@pytest.mark.parametrize(("trainer", "field", "setting"), [
    ({"max_steps": 1_000_000_000, "save_steps": 1}, "trainer.max_steps", "MONGOTUNE_MAX_STEPS"),
    ({"dataloader_num_workers": 48}, "trainer.dataloader_num_workers", "MONGOTUNE_MAX_DATALOADER_WORKERS"),
    ({"per_device_train_batch_size": 100_000}, "trainer.per_device_train_batch_size", "MONGOTUNE_MAX_BATCH_SIZE"),
    ({"max_seq_length": 10_000_000}, "trainer.max_seq_length", "MONGOTUNE_MAX_SEQ_LENGTH"),
    ({"save_total_limit": 10_000}, "trainer.save_total_limit", "MONGOTUNE_MAX_CHECKPOINTS"),
    ({"num_gpus": 64}, "trainer.num_gpus", "MONGOTUNE_MAX_PROCESSES"),
    ({"num_processes": 9}, "trainer.num_processes", "MONGOTUNE_MAX_PROCESSES"),
])
def test_each_cap_names_itself_and_its_setting(limits, trainer, field, setting):
    with pytest.raises(SpecError) as refused:
        parse_model({"_id": "m", "model_name_or_path": "org/m", "data": {"collection": "c"}, "trainer": trainer}, limits)
    assert refused.value.field == field and setting in refused.value.message


def test_a_run_over_the_cap_never_holds_the_slot_from_a_waiting_job(db, start_daemon, tiny_model_path):
    load_samples(db)
    start_daemon(max_jobs=1)
    models = db[defaults.MODELS]
    models.insert_one(model("greedy", tiny_model_path, {**QUICK, "max_steps": 10**9, "save_steps": 1}))
    models.insert_one(model("waiting", tiny_model_path))
    assert "MONGOTUNE_MAX_STEPS" in failed_on(models, "greedy", "trainer.max_steps")["error"]["message"]
    assert wait_for(models, "waiting", finished, timeout_s=120)["status"] == "succeeded"
    assert db[f"{defaults.CHECKPOINTS}.files"].count_documents({"metadata.model": "greedy"}) == 0


def test_the_wall_clock_cap_stops_a_run_and_keeps_its_checkpoint(db, start_daemon, tiny_model_path):
    load_samples(db)
    start_daemon(env={"MONGOTUNE_MAX_RUN_S": "12", "MONGOTUNE_LEASE_S": "4"})
    models = db[defaults.MODELS]
    models.insert_one(model("slow", tiny_model_path, {**QUICK, "max_steps": 100_000, "save_steps": 20}))
    document = wait_for(models, "slow", finished, timeout_s=180)
    assert document["status"] == "failed" and document["error"]["type"] == "limit_exceeded"
    assert "MONGOTUNE_MAX_RUN_S" in document["error"]["message"]
    assert document["checkpoints"] and document["checkpoints"][-1]["step"] < 100_000, "it stopped, keeping checkpoints"


@pytest.mark.parametrize("collection", ["_listener", "_models", "_checkpoints.files", "system.users", "_secret"])
def test_listener_and_system_collections_cannot_be_trained_on(limits, collection):
    with pytest.raises(SpecError) as refused:
        parse_model({"_id": "m", "model_name_or_path": "org/m", "data": {"collection": collection}}, limits)
    assert refused.value.field == "data.collection" and collection not in refused.value.message


def test_the_operator_lists_the_collections_documents_may_read(limits):
    listed = limits.model_copy(update={"collections": ("pirate_*",)})
    parse_model({"_id": "m", "model_name_or_path": "org/m", "data": {"collection": "pirate_chat"}}, listed)
    with pytest.raises(SpecError) as refused:
        parse_model({"_id": "m", "model_name_or_path": "org/m", "data": {"collection": "payroll"}}, listed)
    assert "MONGOTUNE_COLLECTIONS" in refused.value.message


def test_ignored_settings_are_listed_in_warnings(module_samples, module_daemon, tiny_model_path):
    models = module_samples[defaults.MODELS]
    models.insert_one(model("copied", tiny_model_path, {**QUICK, "output_dir": "/etc/evil", "overwrite_output_dir": True}))
    document = wait_for(models, "copied", finished, timeout_s=120)
    assert document["status"] == "succeeded", document.get("error")
    assert [w.split(":")[0] for w in document["warnings"]] == ["trainer.output_dir", "trainer.overwrite_output_dir"]
    assert not Path("/etc/evil").exists()


def test_the_training_child_never_holds_the_uri_in_its_environment(db, server_uri, start_daemon, tiny_model_path):
    load_samples(db)
    daemon = start_daemon(env={defaults.ENV_URI: server_uri})
    models = db[defaults.MODELS]
    models.insert_one(model("slow", tiny_model_path, {**QUICK, "max_steps": 400, "save_steps": 10_000}))
    wait_for(models, "slow", lambda d: (d.get("progress") or {}).get("step", 0) >= 1, timeout_s=120)
    pid = int(re.search(r"run 1 started \(pid (\d+)", daemon.log()).group(1))
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert server_uri.encode() not in environ and b"MONGOTUNE_URI=" not in environ
    models.update_one({"_id": "slow"}, {"$set": {"cancel": True}})
    assert wait_for(models, "slow", finished, timeout_s=60)["status"] == "cancelled"


def test_a_password_in_uri_warns_and_every_secret_option_is_redacted(tmp_path):
    runner = CliRunner(env={defaults.ENV_HOME: str(tmp_path)})
    result = runner.invoke(cli, ["start", "--uri", "mongodb://u:secret@127.0.0.1:1/?serverSelectionTimeoutMS=200"])
    assert result.exit_code != 0
    assert "holds a password" in result.output and "secret" not in result.output
    shown = redact("mongodb://u:pw@h/db?replicaSet=rs&authMechanismProperties=AWS_SESSION_TOKEN:tok"
                   "&tlsCertificateKeyFilePassword=kp&secretThing=s")
    assert not any(secret in shown for secret in ("pw", "tok", "kp", "=s")) and "replicaSet=rs" in shown


def test_work_folders_of_killed_children_are_removed_at_start(db, start_daemon, tmp_path):
    dead = tmp_path / "work" / "999999999"
    (dead / "output").mkdir(parents=True)
    (dead / "output" / "optimizer.pt").write_bytes(b"x" * 1000)
    start_daemon()
    wait_until(lambda: not dead.exists(), 60, "the dead child's work folder removed")


def test_job_logs_are_capped_keeping_the_newest_lines(tmp_path):
    log = tmp_path / "job.log"
    log.write_bytes(b"old line\n" * 100_000 + b"newest line\n")
    trim_log(log, 64 * 1024)
    text = log.read_bytes()
    assert len(text) <= 64 * 1024 and text.endswith(b"newest line\n") and b"trimmed" in text


def test_a_job_log_its_child_has_not_opened_yet_is_left_alone_quietly(tmp_path, caplog):
    """The supervisor trims at every lease renewal, from before the child (importing) has opened its log."""
    trim_log(tmp_path / "not-yet.log", 64 * 1024)
    assert not (tmp_path / "not-yet.log").exists() and not caplog.records


def test_errors_written_to_documents_carry_no_host_paths(module_samples, module_daemon, model_root):
    db = module_samples
    empty = Path(model_root) / f"empty-{uuid.uuid4().hex[:6]}"
    empty.mkdir()
    (empty / "config.json").write_text("{not json")
    db[defaults.MODELS].insert_one(model("broken", str(empty)))
    db[defaults.REQUESTS].insert_one({"_id": "ask-broken", "model": "broken", "input": "hi", "checkpoint": "base"})
    for collection, doc_id in ((db[defaults.MODELS], "broken"), (db[defaults.REQUESTS], "ask-broken")):
        document = wait_for(collection, doc_id, finished, timeout_s=120)
        assert document["status"] == "failed"
        text = json.dumps(document["error"])
        assert str(model_root) not in text.replace(str(empty), "") and "/tmp" not in text.replace(str(empty), "")
        assert ".venv" not in text and "site-packages" not in text
    shutil.rmtree(empty)


def test_bad_operator_settings_fail_in_one_line_and_help_always_works(tmp_path):
    env = {**os.environ, "MONGOTUNE_LEASE_S": "abc", defaults.ENV_HOME: str(tmp_path)}
    runner = CliRunner(env=env)
    assert runner.invoke(cli, ["--help"]).exit_code == 0
    assert runner.invoke(cli, ["start", "--help"]).exit_code == 0
    result = runner.invoke(cli, ["start", "--uri", "mongodb://127.0.0.1:1/"])
    assert result.exit_code != 0 and "MONGOTUNE_LEASE_S" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    zero = runner.invoke(cli, ["start", "--set", "max_steps=0"], env={"MONGOTUNE_LEASE_S": "5"})
    assert zero.exit_code != 0 and "--set max_steps" in zero.output and "Traceback" not in zero.output


def test_operator_caps_come_from_options_over_environment_over_defaults():
    from listener.settings import Settings

    assert Settings.load({}, {}).limits.max_steps == Limits().max_steps
    assert Settings.load({}, {"MONGOTUNE_MAX_STEPS": "50"}).limits.max_steps == 50
    assert Settings.load({"limits": {"max_steps": 7}}, {"MONGOTUNE_MAX_STEPS": "50"}).limits.max_steps == 7


def test_the_metrics_a_document_keeps_are_bounded(db, monkeypatch):
    """`logging_steps: 1` over the cap's 100,000 steps would pass MongoDB's 16 MB a document: the newest are kept."""
    from training.progress import MongoProgress

    monkeypatch.setattr(defaults, "MAX_METRICS", 5)
    db[defaults.MODELS].insert_one({"_id": "m", "run": 1, "metrics": [{"step": -1}] * 3})
    progress = MongoProgress(db, "m", 1, keep=1, daemon=os.getppid(), owner=None)
    state, control = SimpleNamespace(max_steps=50, global_step=0, epoch=0.0), SimpleNamespace()
    progress.on_train_begin(None, state, control)
    for step in range(1, 9):
        state.global_step = step
        progress.on_log(None, state, control, logs={"loss": 1.0, "eval_loss": 1.0})  # an eval: written at once
    assert [m["step"] for m in db[defaults.MODELS].find_one({"_id": "m"})["metrics"]] == [4, 5, 6, 7, 8]


@pytest.mark.parametrize(("steps", "error", "field"), [
    (0, SpecError, "trainer.num_train_epochs"), (Limits().max_steps + 1, LimitExceeded, "trainer.num_train_epochs")])
def test_the_steps_epochs_come_to_are_held_to_the_caps_when_training_begins(db, steps, error, field):
    """Epochs become steps only inside the trainer: zero steps is an error, never `succeeded`."""
    from training.progress import MongoProgress

    progress = MongoProgress(db, "m", 1, keep=1, daemon=os.getppid(), owner=None)
    with pytest.raises(error) as refused:
        progress.on_train_begin(None, SimpleNamespace(max_steps=steps, global_step=0), None)
    assert refused.value.field == field
