"""Nothing from a document runs, nothing pickled is loaded, and credentials never leak."""

import io
import os
import pickle
import tarfile
import uuid

import pytest
from bson import json_util
from gridfs import GridFSBucket
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from listener.demo import load_samples
from tests.conftest import DaemonProcess, finished, wait_for
from training import defaults


class Exploit:
    """Unpickling this runs a command: the proof is a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_checkpoint_is_never_loaded(module_db, module_daemon, tiny_model_path, tmp_path):
    db = module_db
    marker = tmp_path / "pwned"
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name, data in (("adapter_config.json", b'{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}'),
                           ("adapter_model.bin", pickle.dumps(Exploit(marker)))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    files_id = GridFSBucket(db, defaults.CHECKPOINTS).upload_from_stream("evil.tar", archive.getvalue(),
                                                                         metadata={"model": "pickled", "run": 1, "step": 1})
    db[defaults.MODELS].insert_one({
        "_id": "pickled", "model_name_or_path": tiny_model_path, "data": {"collection": "c"}, "status": "succeeded",
        "run": 1, "checkpoints": [{"run": 1, "step": 1, "files_id": files_id}], "best_checkpoint": {"run": 1, "step": 1},
    })
    db[defaults.REQUESTS].insert_one({"_id": "pickled", "model": "pickled", "input": "hi"})
    answer = wait_for(db[defaults.REQUESTS], "pickled", finished, timeout_s=60)
    assert answer["status"] == "failed" and "safetensors" in answer["error"]["message"]
    assert not marker.exists()


def test_credentials_never_appear_in_logs_or_documents(db, server_uri, tiny_model_path, model_root, tmp_path):
    user, password = f"tuner{uuid.uuid4().hex[:6]}", f"pw-{uuid.uuid4().hex}"
    admin = MongoClient(server_uri).admin
    try:
        admin.command("createUser", user, pwd=password, roles=["root"])
    except OperationFailure as exc:
        pytest.skip(f"this server does not let the test create a user: {exc}")
    uri = server_uri.replace("mongodb://", f"mongodb://{user}:{password}@", 1)
    uri += ("&" if "?" in uri else "?") + "authSource=admin"  # the user lives in admin, not the URI's database
    load_samples(db)
    daemon = DaemonProcess(None, db.name, tmp_path, "secretive", env={defaults.ENV_URI: uri}, model_root=model_root)
    try:
        db[defaults.MODELS].insert_many([
            {"_id": "good", "model_name_or_path": tiny_model_path, "trainer": {"max_steps": 1},
             "data": {"collection": "pirate_chat", "key": "messages"}},
            {"_id": "bad", "model_name_or_path": "/no/such/model", "data": {"collection": "pirate_chat"}},
        ])
        db[defaults.REQUESTS].insert_one({"_id": "r", "model": "nobody", "input": "hi"})
        for doc_id in ("good", "bad"):
            wait_for(db[defaults.MODELS], doc_id, finished, timeout_s=120)
        wait_for(db[defaults.REQUESTS], "r", finished, timeout_s=60)
    finally:
        daemon.stop()
        admin.command("dropUser", user)
    logs = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*.log"))
    assert f"{user}:***@" in logs, "the URI is logged, redacted"
    written = json_util.dumps([list(db[name].find()) for name in
                               (defaults.MODELS, defaults.REQUESTS, defaults.LISTENER)])
    assert password not in logs and password not in written


def test_a_checkpoint_entry_cannot_point_the_listener_at_a_path(module_db, module_daemon, tiny_model_path, tmp_path):
    db = module_db
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "optimizer.pt").write_bytes(b"keep me")
    db[defaults.MODELS].insert_one({
        "_id": "pathed", "model_name_or_path": tiny_model_path, "data": {"collection": "c"}, "status": "succeeded",
        "run": 1, "checkpoints": [{"run": 1, "step": 1, "files_id": str(victim)}],
    })
    db[defaults.REQUESTS].insert_one({"_id": "pathed", "model": "pathed", "input": "hi", "checkpoint": "latest"})
    answer = wait_for(db[defaults.REQUESTS], "pathed", finished, timeout_s=60)
    assert answer["status"] == "failed" and "is not in _checkpoints" in answer["error"]["message"]
    assert (victim / "optimizer.pt").read_bytes() == b"keep me"
