"""`training.checkpoints`: GridFS round trips on the real server, selection and pruning."""

import io
import math
import tarfile

import gridfs
import pytest

from listener import defaults
from training import checkpoints
from training.checkpoints import best_of, select, to_prune

FILES = {
    "adapter_model.safetensors": bytes(range(256)) * 40,
    "adapter_config.json": b'{"r": 8, "lora_alpha": 16}',
    "tokenizer_config.json": b"{}",
}


def checkpoint_folder(tmp_path):
    folder = tmp_path / "checkpoint-10"
    folder.mkdir()
    for name, content in FILES.items():
        (folder / name).write_bytes(content)
    (folder / "training_args.bin").write_bytes(b"\x80\x04pickled, never stored")
    (folder / "subdir").mkdir()  # folders are not part of a checkpoint archive
    return folder


def test_upload_download_round_trip(db, tmp_path):
    entry = checkpoints.upload(db, checkpoint_folder(tmp_path), model_id="llm", run=2, step=10)
    assert entry["run"] == 2 and entry["step"] == 10
    assert entry["size"] > sum(len(content) for content in FILES.values())
    assert entry["created_at"].tzinfo is not None
    dest = checkpoints.download(db, entry["files_id"], tmp_path / "elsewhere" / "ckpt")
    assert sorted(p.name for p in dest.iterdir()) == sorted(FILES)
    for name, content in FILES.items():
        assert (dest / name).read_bytes() == content
    assert not (dest / "training_args.bin").exists()


def test_gridfs_metadata(db, tmp_path):
    entry = checkpoints.upload(db, checkpoint_folder(tmp_path), model_id="llm", run=3, step=40)
    stored = db[f"{defaults.CHECKPOINTS}.files"].find_one({"_id": entry["files_id"]})
    assert stored["metadata"]["model"] == "llm"
    assert stored["metadata"]["run"] == 3
    assert stored["metadata"]["step"] == 40
    assert sorted(stored["metadata"]["files"]) == sorted(FILES)
    assert stored["filename"] == "llm/run-3/step-40.tar"
    assert stored["length"] == entry["size"]
    assert db[f"{defaults.CHECKPOINTS}.chunks"].count_documents({"files_id": entry["files_id"]}) >= 1


def test_training_args_never_reach_gridfs(db, tmp_path):
    entry = checkpoints.upload(db, checkpoint_folder(tmp_path), model_id="llm", run=1, step=1)
    data = gridfs.GridFSBucket(db, defaults.CHECKPOINTS).open_download_stream(entry["files_id"]).read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert sorted(tar.getnames()) == sorted(FILES)
    assert b"pickled, never stored" not in data


def test_delete(db, tmp_path):
    entry = checkpoints.upload(db, checkpoint_folder(tmp_path), model_id="llm", run=1, step=1)
    checkpoints.delete(db, entry["files_id"])
    assert db[f"{defaults.CHECKPOINTS}.files"].count_documents({}) == 0
    assert db[f"{defaults.CHECKPOINTS}.chunks"].count_documents({}) == 0


def store_archive(db, members: list[tuple[tarfile.TarInfo, bytes | None]]):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, content in members:
            if content is not None:
                info.size = len(content)
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return gridfs.GridFSBucket(db, "_checkpoints").upload_from_stream("evil.tar", buffer.getvalue())


def test_download_refuses_path_outside_destination(db, tmp_path):
    files_id = store_archive(db, [(tarfile.TarInfo("ok.json"), b"{}"), (tarfile.TarInfo("../evil"), b"pwned")])
    dest = tmp_path / "a" / "dest"
    with pytest.raises(tarfile.TarError):
        checkpoints.download(db, files_id, dest)
    assert not (tmp_path / "a" / "evil").exists()
    assert not any(p.name == "evil" for p in tmp_path.rglob("*"))


def test_download_refuses_link_outside_destination(db, tmp_path):
    link = tarfile.TarInfo("adapter_model.safetensors")
    link.type = tarfile.SYMTYPE
    link.linkname = "../../secret"
    (tmp_path / "secret").write_bytes(b"secret")
    files_id = store_archive(db, [(link, None)])
    dest = tmp_path / "a" / "dest"
    with pytest.raises(tarfile.TarError):
        checkpoints.download(db, files_id, dest)
    assert not (dest / "adapter_model.safetensors").is_symlink()


def test_download_strips_absolute_paths(db, tmp_path):
    files_id = store_archive(db, [(tarfile.TarInfo(str(tmp_path / "abs.json")), b"{}")])
    dest = tmp_path / "dest"
    try:
        checkpoints.download(db, files_id, dest)
    except tarfile.TarError:
        pass  # refusing is fine too
    assert not (tmp_path / "abs.json").exists()


# --- select --------------------------------------------------------------------------------------

def entry(run, step, eval_loss=None):
    return {"run": run, "step": step, "files_id": f"f{run}-{step}",
            "metrics": {"eval_loss": eval_loss} if eval_loss is not None else {}}


def model(checkpoints_=None, best=None, status="succeeded"):
    document = {"_id": "llm", "status": status, "checkpoints": checkpoints_ or []}
    if best is not None:
        document["best_checkpoint"] = best
    return document


KEPT = [entry(1, 10, 0.9), entry(1, 20, 0.5), entry(2, 10, 0.7)]


def test_select_latest():
    assert select(model(KEPT), "latest") is KEPT[-1]


def test_select_best_uses_best_checkpoint():
    assert select(model(KEPT, best={"run": 1, "step": 20}), "best") is KEPT[1]


def test_select_best_falls_back_to_latest():
    assert select(model(KEPT), "best") is KEPT[-1]
    assert select(model(KEPT, best={"run": 9, "step": 9}), "best") is KEPT[-1]


def test_select_by_run_and_step():
    assert select(model(KEPT), {"run": 1, "step": 10}) is KEPT[0]
    assert select(model(KEPT), {"run": 2, "step": 10}) is KEPT[2]


def test_select_base_needs_no_checkpoint():
    assert select(model(KEPT), "base") is None
    assert select(model([], status="running"), "base") is None
    assert select({"_id": "llm"}, "base") is None


@pytest.mark.parametrize("ref", ["best", "latest", {"run": 1, "step": 10}])
def test_select_without_checkpoints(ref):
    with pytest.raises(LookupError) as info:
        select(model([], status="running"), ref)
    message = str(info.value)
    assert "'llm'" in message and "no checkpoint" in message
    assert "running" in message and "base" in message


def test_select_without_checkpoints_field():
    with pytest.raises(LookupError, match="pending"):
        select({"_id": "llm"}, "latest")


@pytest.mark.parametrize("ref", [{"run": 3, "step": 10}, {"run": 1, "step": 15}])
def test_select_unknown_run_or_step_lists_what_is_kept(ref):
    with pytest.raises(LookupError) as info:
        select(model(KEPT), ref)
    message = str(info.value)
    for kept in ("{run: 1, step: 10}", "{run: 1, step: 20}", "{run: 2, step: 10}"):
        assert kept in message


# --- best_of / to_prune --------------------------------------------------------------------------

def test_best_of_lowest_eval_loss():
    assert best_of(KEPT) is KEPT[1]


def test_best_of_latest_when_nothing_evaluated():
    unscored = [entry(1, 10), entry(1, 20)]
    assert best_of(unscored) is unscored[-1]
    assert best_of([]) is None


def test_best_of_ignores_unscored_entries():
    mixed = [entry(1, 10, 0.3), entry(1, 20), {"run": 1, "step": 30, "metrics": None}]
    assert best_of(mixed) is mixed[0]


def test_best_of_never_picks_a_nan_loss():
    listed = [entry(1, 10, math.nan), entry(1, 20, 1.0), entry(1, 30, 2.0)]
    assert best_of(listed) is listed[1]


def steps(entries):
    return [(c["run"], c["step"]) for c in entries]


def test_to_prune_keeps_most_recent_of_the_run():
    listed = [entry(1, s) for s in (10, 20, 30, 40, 50)]
    assert steps(to_prune(listed, run=1, keep=2)) == [(1, 10), (1, 20), (1, 30)]


def test_to_prune_keeps_the_best_even_when_old():
    listed = [entry(1, 10, 0.1), entry(1, 20, 0.5), entry(1, 30, 0.6), entry(1, 40, 0.7)]
    assert steps(to_prune(listed, run=1, keep=2)) == [(1, 20)]


def test_to_prune_ignores_other_runs():
    listed = [entry(1, 10), entry(1, 20), entry(1, 30), entry(2, 10), entry(2, 20), entry(2, 30)]
    assert steps(to_prune(listed, run=2, keep=1)) == [(2, 10), (2, 20)]
    assert steps(to_prune(listed, run=3, keep=1)) == []


def test_to_prune_nothing_when_within_keep():
    listed = [entry(1, 10), entry(1, 20)]
    assert to_prune(listed, run=1, keep=2) == []
    assert to_prune(listed, run=1, keep=5) == []


@pytest.mark.parametrize("keep", [None, 0])
def test_to_prune_without_limit_prunes_nothing(keep):
    listed = [entry(1, s) for s in (10, 20, 30)]
    assert to_prune(listed, run=1, keep=keep) == []
