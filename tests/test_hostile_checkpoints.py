"""Checkpoints written by someone hostile: crafted archives and forged listener fields, on the real server.

Whoever writes documents may also insert into the `_checkpoints` bucket, and may write `checkpoints`
in a model document. Every crafted archive is refused whole, before anything reaches `dest`; a
forged listing is never resumed from, and never deletes another model's file.
"""

import io
import os
import pickle
import tarfile
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from bson import ObjectId
from gridfs import GridFSBucket
from safetensors.torch import save_file

from training import checkpoints, defaults
from training.checkpoints import CheckpointRefused, LimitExceeded
from training.config import SpecError, parse_model
from training.limits import Limits

SAFE = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "  # a tiny (empty) safetensors file


class Exploit:
    """Unpickling this runs a command: the proof is a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def member(name: str, data: bytes | None = b"{}", kind: bytes = tarfile.REGTYPE, **attrs):
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def archive(*members) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def store(db, data: bytes, metadata=None) -> ObjectId:
    metadata = {"model": "m", "run": 1, "step": 1} if metadata is None else metadata
    return GridFSBucket(db, defaults.CHECKPOINTS).upload_from_stream("crafted.tar", data, metadata=metadata)


def refused(db, files_id, tmp_path: Path, match: str, **kwargs) -> CheckpointRefused:
    """Download must refuse: no `dest`, no staging left, nothing new anywhere under tmp_path, no host path said."""
    before = set(tmp_path.rglob("*"))
    dest = tmp_path / "unpacked" / "ckpt"
    with pytest.raises(CheckpointRefused, match=match) as info:
        checkpoints.download(db, files_id, dest, **kwargs)
    assert not dest.exists()
    assert set(tmp_path.rglob("*")) - before == {dest.parent}
    assert list(dest.parent.iterdir()) == []
    assert str(tmp_path) not in str(info.value)
    return info.value


# --- what an archive may hold ---------------------------------------------------------------------

@pytest.mark.parametrize("kind, attrs, what", [
    (tarfile.SYMTYPE, {"linkname": "../../secret"}, "symbolic link"),
    (tarfile.LNKTYPE, {"linkname": "config.json"}, "hard link"),
    (tarfile.CHRTYPE, {"devmajor": 1, "devminor": 3}, "device"),
    (tarfile.BLKTYPE, {"devmajor": 8, "devminor": 0}, "device"),
    (tarfile.FIFOTYPE, {}, "FIFO"),
    (tarfile.DIRTYPE, {}, "directory"),
])
@pytest.mark.parametrize("download_kind", ["serving", "resume"])
def test_only_regular_files(db, tmp_path, kind, attrs, what, download_kind):
    (tmp_path / "secret").write_bytes(b"secret")
    files_id = store(db, archive(member("config.json"), member("adapter_model.safetensors", None, kind, **attrs)))
    refused(db, files_id, tmp_path, what, kind=download_kind)


def test_a_gnu_sparse_member_is_refused(db, tmp_path):
    info = tarfile.TarInfo("adapter_model.safetensors")
    info.type = tarfile.GNUTYPE_SPARSE  # tarfile writes the header, with an empty sparse map
    files_id = store(db, info.tobuf(tarfile.GNU_FORMAT) + bytes(2 * tarfile.BLOCKSIZE))
    refused(db, files_id, tmp_path, "sparse")


def test_a_pax_sparse_member_expanding_to_a_terabyte_is_refused(db, tmp_path):
    sparse_map = b"1\n0\n512\n".ljust(tarfile.BLOCKSIZE, b"\0") + b"x" * tarfile.BLOCKSIZE
    pax = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "model.safetensors",
           "GNU.sparse.realsize": str(2**40)}
    files_id = store(db, archive(member("GNUSparseFile.0/model.safetensors", sparse_map, pax_headers=pax)))
    refused(db, files_id, tmp_path, "sparse", kind="resume")


@pytest.mark.parametrize("name", ["../config.json", "../x", "sub/config.json", "./config.json",
                                  pytest.param(f"/etc/mongotune-{uuid.uuid4().hex}.json", id="absolute"),
                                  "..\\config.json"])
def test_only_bare_names(db, tmp_path, name):
    files_id = store(db, archive(member("config.json"), member(name)))
    refused(db, files_id, tmp_path, "path")
    assert not Path(name).is_absolute() or not Path(name).exists()


def test_an_absolute_name_is_never_written(db, tmp_path):
    target = tmp_path / "elsewhere" / "config.json"
    target.parent.mkdir()
    files_id = store(db, archive(member(str(target))))
    refused(db, files_id, tmp_path, "path", kind="resume")
    assert not target.exists()


@pytest.mark.parametrize("name", ["README.md", "evil.py", "training_args.bin", "pytorch_model.bin",
                                  "config.json.bak", "model-1-of-2.safetensors", "rng_state_x.pth", "..", ""])
def test_unknown_names_are_refused(db, tmp_path, name):
    files_id = store(db, archive(member("config.json"), member(name, b"data")))
    refused(db, files_id, tmp_path, "may hold|path|regular", kind="resume")


@pytest.mark.parametrize("download_kind", ["serving", "resume"])
def test_a_pickled_adapter_is_never_written(db, tmp_path, download_kind):
    marker = tmp_path.parent / f"pwned-{uuid.uuid4().hex}"
    pickled = member("adapter_model.bin", pickle.dumps(Exploit(marker)))
    files_id = store(db, archive(member("adapter_config.json"), pickled))
    refused(db, files_id, tmp_path, "safetensors", kind=download_kind)
    assert not marker.exists()


def test_optimizer_state_is_for_resuming_only(db, tmp_path):
    optimizer = pickle.dumps(Exploit(tmp_path / "pwned"))
    files_id = store(db, archive(member("adapter_model.safetensors", SAFE), member("optimizer.pt", optimizer),
                                 member("rng_state_3.pth", b"rng"), member("config.json")))
    served = checkpoints.download(db, files_id, tmp_path / "served")
    assert sorted(p.name for p in served.iterdir()) == ["adapter_model.safetensors", "config.json"]
    resume = checkpoints.download(db, files_id, tmp_path / "resume", kind="resume")
    assert sorted(p.name for p in resume.iterdir()) == ["adapter_model.safetensors", "config.json", "optimizer.pt",
                                                        "rng_state_3.pth"]
    assert (resume / "optimizer.pt").read_bytes() == optimizer  # the trainer loads it with weights_only=True
    assert not (tmp_path / "pwned").exists()


def test_large_real_members_are_not_mistaken_for_header_bombs(db, tmp_path):
    weights, optimizer = os.urandom(9 * 2**20), os.urandom(9 * 2**20)  # each over the header budget
    files_id = store(db, archive(member("optimizer.pt", optimizer), member("model.safetensors", weights),
                                 member("scheduler.pt", b"s"), member("config.json")))
    served = checkpoints.download(db, files_id, tmp_path / "served")
    assert (served / "model.safetensors").read_bytes() == weights and not (served / "optimizer.pt").exists()
    resume = checkpoints.download(db, files_id, tmp_path / "resume", kind="resume")
    assert (resume / "optimizer.pt").read_bytes() == optimizer and (resume / "scheduler.pt").read_bytes() == b"s"


def test_the_same_name_twice_is_refused(db, tmp_path):
    files_id = store(db, archive(member("config.json", b"{}"), member("config.json", b'{"evil": 1}')))
    refused(db, files_id, tmp_path, "twice")


def test_what_is_not_a_tar_archive_is_refused(db, tmp_path):
    refused(db, store(db, os.urandom(3000)), tmp_path, "not a readable tar archive")


# --- sizes: counted while copying, never trusted from a header ------------------------------------

def huge(name: str, claimed: int, real: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = claimed
    return info.tobuf(tarfile.GNU_FORMAT) + b"x" * real


@pytest.mark.parametrize("download_kind", ["serving", "resume"])
def test_a_small_member_claiming_a_terabyte_is_refused(db, tmp_path, download_kind):
    files_id = store(db, huge("model.safetensors", 2**40, 10_240))
    refused(db, files_id, tmp_path, "not a readable tar archive", kind=download_kind)


def test_a_skipped_member_claiming_a_terabyte_is_refused(db, tmp_path):
    files_id = store(db, huge("optimizer.pt", 2**40, 10_240))
    refused(db, files_id, tmp_path, f"cap of {Limits().max_checkpoint_bytes} bytes per archive")


def test_a_member_over_the_per_file_cap_is_refused_while_copying(db, tmp_path):
    files_id = store(db, archive(member("config.json"), member("model.safetensors", b"w" * 65_536)))
    refused(db, files_id, tmp_path, "cap of 16384 bytes per file", max_file_bytes=16_384)


def test_members_over_the_archive_cap_are_refused_while_copying(db, tmp_path):
    files_id = store(db, archive(member("model-00001-of-00002.safetensors", b"w" * 40_000),
                                 member("model-00002-of-00002.safetensors", b"w" * 40_000)))
    refused(db, files_id, tmp_path, "cap of 65536 bytes per archive", max_bytes=65_536)


def test_text_files_have_a_lower_cap(db, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "TEXT_FILE_BYTES", 1024)
    files_id = store(db, archive(member("model.safetensors", b"w" * 4096), member("config.json", b" " * 4096)))
    refused(db, files_id, tmp_path, "'config.json' goes over the cap of 1024 bytes per file")


@pytest.mark.parametrize("header", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME])
def test_a_header_claiming_a_terabyte_is_refused_before_it_is_buffered(db, tmp_path, header):
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = header, 2**40
    files_id = store(db, info.tobuf(tarfile.GNU_FORMAT) + b"0" * (6 * 2**20))
    refused(db, files_id, tmp_path, "headers are larger")


# --- whose file it is -----------------------------------------------------------------------------

def checkpoint_folder(tmp_path: Path, size: int = 64) -> Path:
    folder = tmp_path / f"folder-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    # real safetensors of about `size` bytes: a checkpoint's weights are checked finite before it is stored
    save_file({"w": torch.full((size,), 7, dtype=torch.uint8)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_bytes(b"{}")
    (folder / "optimizer.pt").write_bytes(b"state")
    return folder


def test_verified_checks_model_and_run(db, tmp_path):
    entry = checkpoints.upload(db, checkpoint_folder(tmp_path), model_id="m", run=2, step=7)
    found = checkpoints.verified(db, entry["files_id"], "m", run=2)
    assert (found.files_id, found.model, found.run, found.step) == (entry["files_id"], "m", 2, 7)
    with pytest.raises(CheckpointRefused, match="another model"):
        checkpoints.verified(db, entry["files_id"], "other")
    with pytest.raises(CheckpointRefused, match="run 2, not run 3"):
        checkpoints.verified(db, entry["files_id"], "m", run=3)
    with pytest.raises(CheckpointRefused, match="not an ObjectId"):
        checkpoints.verified(db, str(entry["files_id"]), "m")
    with pytest.raises(CheckpointRefused, match="is not in _checkpoints"):
        checkpoints.verified(db, ObjectId(), "m")


@pytest.mark.parametrize("owner, asker", [(ObjectId("65f000000000000000000001"), "65f000000000000000000001"),
                                          ("65f000000000000000000001", ObjectId("65f000000000000000000001")),
                                          (1, "1"), ("1", 1), (1, 1.0)])
def test_look_alike_ids_are_other_models(db, tmp_path, owner, asker):
    entry = checkpoints.upload(db, checkpoint_folder(tmp_path), model_id=owner, run=1, step=1)
    with pytest.raises(CheckpointRefused, match="another model"):
        checkpoints.verified(db, entry["files_id"], asker)
    assert checkpoints.latest(db, asker, 1) is None
    assert checkpoints.latest(db, owner, 1).files_id == entry["files_id"]


@pytest.mark.parametrize("metadata", [None, "m", [], {"run": 1, "step": 1}, {"model": "m", "step": 1},
                                      {"model": "m", "run": "1", "step": 1}, {"model": "m", "run": True, "step": 1},
                                      {"model": "m", "run": 1, "step": 1.5}, {"model": "m", "run": 1, "step": None}])
def test_malformed_metadata_is_refused_never_a_crash(db, tmp_path, metadata):
    files_id = GridFSBucket(db, defaults.CHECKPOINTS).upload_from_stream(
        "crafted.tar", archive(member("config.json")), **({} if metadata is None else {"metadata": metadata}))
    with pytest.raises(CheckpointRefused, match="no valid metadata"):
        checkpoints.verified(db, files_id, "m")
    assert checkpoints.latest(db, "m", 1) is None


def test_stored_refuses_a_path_and_another_models_file(db, tmp_path):
    theirs = checkpoints.upload(db, checkpoint_folder(tmp_path), model_id="victim", run=1, step=1)
    for files_id in (str(tmp_path), theirs["files_id"]):
        with pytest.raises(CheckpointRefused, match="pick another with `checkpoint`"):
            checkpoints.stored(db, {"run": 1, "step": 1, "files_id": files_id}, "thief")
    with pytest.raises(LookupError, match="is not in _checkpoints"):
        checkpoints.stored(db, {"run": 1, "step": 1, "files_id": str(tmp_path)}, "thief")


def test_delete_refuses_another_models_file(db, tmp_path):
    theirs = checkpoints.upload(db, checkpoint_folder(tmp_path), model_id="victim", run=1, step=1)
    with pytest.raises(CheckpointRefused, match="another model"):
        checkpoints.delete(db, theirs["files_id"], model_id="thief")
    with pytest.raises(CheckpointRefused, match="not run 2"):
        checkpoints.delete(db, theirs["files_id"], model_id="victim", run=2)
    assert checkpoints.download(db, theirs["files_id"], tmp_path / "still-there").exists()


def test_latest_is_the_highest_step_of_this_model_and_run(db, tmp_path):
    ours = [checkpoints.upload(db, checkpoint_folder(tmp_path), model_id="m", run=2, step=s) for s in (5, 15, 10)]
    checkpoints.upload(db, checkpoint_folder(tmp_path), model_id="m", run=3, step=99)
    checkpoints.upload(db, checkpoint_folder(tmp_path), model_id="m2", run=2, step=99)
    store(db, archive(member("config.json")), {"model": "m", "run": 2, "step": "999"})
    found = checkpoints.latest(db, "m", 2)
    assert (found.files_id, found.step) == (ours[1]["files_id"], 15)
    assert checkpoints.latest(db, "m", 4) is None
    with pytest.raises(CheckpointRefused, match="integer"):
        checkpoints.latest(db, "m", "2")


# --- forged listener fields: resume ---------------------------------------------------------------

def resume_point(db, document: dict, work: Path):
    from training.child import _resume_point

    spec = parse_model({"_id": document["_id"], "model_name_or_path": "org/tiny", "data": {"collection": "c"}})
    return _resume_point(db, document, work, spec)


def test_resume_never_follows_a_forged_entry(db, tmp_path):
    victim = checkpoints.upload(db, checkpoint_folder(tmp_path), model_id="victim", run=1, step=50)
    forged = {"_id": "thief", "run": 1, "attempts": 2,
              "checkpoints": [{"run": 1, "step": 50, "files_id": victim["files_id"]}]}
    assert resume_point(db, forged, tmp_path / "work") is None
    assert not (tmp_path / "work").exists()


def test_resume_takes_this_runs_newest_file_from_gridfs(db, tmp_path):
    victim = checkpoints.upload(db, checkpoint_folder(tmp_path), model_id="victim", run=1, step=50)
    ours_folder = checkpoint_folder(tmp_path, size=99)
    ours = checkpoints.upload(db, ours_folder, model_id="thief", run=1, step=4)
    checkpoints.upload(db, checkpoint_folder(tmp_path), model_id="thief", run=1, step=2)
    forged = {"_id": "thief", "run": 1, "attempts": 2, "checkpoints": [
        {"run": 1, "step": 4, "files_id": ours["files_id"]}, {"run": 1, "step": 50, "files_id": victim["files_id"]}]}
    folder = Path(resume_point(db, forged, tmp_path / "work"))
    assert folder == tmp_path / "work" / "resume" / "checkpoint-4"
    weights = "adapter_model.safetensors"
    assert (folder / weights).read_bytes() == (ours_folder / weights).read_bytes()
    assert (folder / "optimizer.pt").read_bytes() == b"state", "unpacked for resuming"


def test_resume_of_a_new_run_starts_over(db, tmp_path):
    checkpoints.upload(db, checkpoint_folder(tmp_path), model_id="m", run=1, step=4)
    assert resume_point(db, {"_id": "m", "run": 2, "attempts": 2, "checkpoints": []}, tmp_path / "work") is None


def test_a_fresh_claim_never_resumes_from_files_an_earlier_model_of_that_id_left(db, tmp_path):
    checkpoints.upload(db, checkpoint_folder(tmp_path), model_id="m", run=1, step=4)
    assert resume_point(db, {"_id": "m", "run": 1, "attempts": 1}, tmp_path / "work") is None


# --- forged listener fields: pruning, and the caps on saves ---------------------------------------

def progress_for(db, model_id, keep=1, limits=Limits()):
    from training.progress import MongoProgress

    return MongoProgress(db, model_id, 1, keep=keep, daemon=os.getppid(), owner=None, limits=limits)


def save(progress, tmp_path: Path, step: int, size: int = 64) -> None:
    output = tmp_path / f"output-{uuid.uuid4().hex[:8]}"
    output.mkdir()
    checkpoint_folder(output, size).rename(output / f"checkpoint-{step}")
    progress.on_save(SimpleNamespace(output_dir=str(output)), SimpleNamespace(global_step=step), None)


def files_of(db, model_id) -> list[int]:
    return sorted(d["metadata"]["step"] for d in db[f"{defaults.CHECKPOINTS}.files"].find({"metadata.model": model_id}))


JUNK = ["junk", None, {"run": "1", "step": 1}, {"run": 1, "step": 2, "files_id": "not an id"},
        {"run": 1, "step": 3, "files_id": 42, "metrics": []}]


def test_pruning_never_deletes_another_models_file(db, tmp_path):
    victim = checkpoints.upload(db, checkpoint_folder(tmp_path), model_id="victim", run=1, step=1)
    forged = {"run": 1, "step": 1, "files_id": victim["files_id"], "metrics": {"eval_loss": 9.0}}
    db[defaults.MODELS].insert_one({"_id": "thief", "run": 1, "checkpoints": [forged, *JUNK]})
    progress = progress_for(db, "thief", keep=1)
    for step in (10, 20, 30):
        save(progress, tmp_path, step)
    assert files_of(db, "thief") == [30]
    assert checkpoints.download(db, victim["files_id"], tmp_path / "victim").exists()
    listed = db[defaults.MODELS].find_one({"_id": "thief"})["checkpoints"]
    assert listed[:len(JUNK) + 1] == [forged, *JUNK], "what a user wrote is ignored, not rewritten"
    assert [c["step"] for c in listed[len(JUNK) + 1:]] == [30]


def test_pruning_survives_a_checkpoints_field_that_is_not_a_list(db, tmp_path):
    db[defaults.MODELS].insert_one({"_id": "m", "run": 1, "checkpoints": "junk", "best_checkpoint": "junk"})
    progress = progress_for(db, "m", keep=1)
    save(progress, tmp_path, 5)
    save(progress, tmp_path, 6)
    document = db[defaults.MODELS].find_one({"_id": "m"})
    assert [c["step"] for c in document["checkpoints"]] == [6]
    assert document["best_checkpoint"] == {"run": 1, "step": 6}
    assert files_of(db, "m") == [6]


def test_saves_past_max_saves_stop_training(db, tmp_path):
    db[defaults.MODELS].insert_one({"_id": "m", "run": 1})
    progress = progress_for(db, "m", keep=None, limits=Limits(max_saves=2))
    save(progress, tmp_path, 1)
    save(progress, tmp_path, 2)
    with pytest.raises(LimitExceeded, match="MONGOTUNE_MAX_SAVES") as info:
        save(progress, tmp_path, 3)
    assert info.value.field == "trainer.save_steps"
    assert files_of(db, "m") == [1, 2]


def test_bytes_past_max_checkpoint_bytes_stop_training(db, tmp_path):
    db[defaults.MODELS].insert_one({"_id": "m", "run": 1})
    checkpoints.upload(db, checkpoint_folder(tmp_path, size=3 * 2**20), model_id="other", run=1, step=1)
    progress = progress_for(db, "m", keep=None, limits=Limits(max_checkpoint_bytes=2**20))
    save(progress, tmp_path, 1, size=600_000)  # another model's bytes do not count
    with pytest.raises(LimitExceeded, match="MONGOTUNE_MAX_CHECKPOINT_BYTES") as info:
        save(progress, tmp_path, 2, size=600_000)
    assert info.value.field == "trainer.save_total_limit"
    assert "bytes of checkpoints stored per model" in str(info.value)
    assert files_of(db, "m") == [1]


def test_a_checkpoint_without_weights_is_not_stored_and_fails_naming_the_setting(db, tmp_path):
    """ZeRO-3 full fine-tuning told not to gather its weights leaves them only in DeepSpeed's shards: nothing that
    could serve, so nothing is stored, and the run fails naming the setting rather than passing as all finite."""
    db[defaults.MODELS].insert_one({"_id": "m", "run": 1})
    folder = tmp_path / "checkpoint-3"
    (folder / "global_step3").mkdir(parents=True)
    (folder / "global_step3" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"shards")
    (folder / "latest").write_bytes(b"global_step3\n")
    with pytest.raises(SpecError, match="no safetensors") as info:
        progress_for(db, "m").on_save(SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=3), None)
    assert info.value.field == "trainer.deepspeed.zero_optimization.stage3_gather_16bit_weights_on_model_save"
    assert files_of(db, "m") == []


# --- DeepSpeed's tag folder: one level, its states by name, and a `latest` that names it ----------

DS_MODEL = "global_step7/mp_rank_00_model_states.pt"
DS_OPTIM = "global_step7/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"


def test_deepspeed_states_are_unpacked_in_their_tag_folder_for_resuming_only(db, tmp_path):
    files_id = store(db, archive(member("adapter_model.safetensors", SAFE), member("latest", b"global_step7\n"),
                                 member(DS_MODEL, b"model"), member(DS_OPTIM, b"optim")))
    served = checkpoints.download(db, files_id, tmp_path / "served")
    assert sorted(p.name for p in served.iterdir()) == ["adapter_model.safetensors"]
    resume = checkpoints.download(db, files_id, tmp_path / "resume", kind="resume")
    assert sorted(p.relative_to(resume).as_posix() for p in resume.rglob("*") if p.is_file()) == [
        "adapter_model.safetensors", DS_OPTIM, DS_MODEL, "latest"]
    assert (resume / DS_OPTIM).read_bytes() == b"optim"  # DeepSpeed reads it under weights_only_loads


@pytest.mark.parametrize("name", [
    "global_step7/../config.json", "global_step7/sub/mp_rank_00_model_states.pt", "other/mp_rank_00_model_states.pt",
    "global_step7/zero_to_fp32.py", "global_step7/evil.pt", "../global_step7/mp_rank_00_model_states.pt",
    "/global_step7/mp_rank_00_model_states.pt", "global_step7\\mp_rank_00_model_states.pt",
    "global_step/mp_rank_00_model_states.pt", "global_step7/latest", "mp_rank_00_model_states.pt",
])
def test_deepspeed_states_outside_their_tag_folder_are_refused(db, tmp_path, name):
    files_id = store(db, archive(member("latest", b"global_step7"), member(DS_MODEL, b"model"), member(name, b"x")))
    refused(db, files_id, tmp_path, "path|may hold", kind="resume")


@pytest.mark.parametrize("content, why", [
    (b"../../etc", "names no global_stepN"), (b"global_step7/../..", "names no global_stepN"),
    (b"/tmp", "names no global_stepN"), (b"global_step7\x00", "names no global_stepN"),
    (b"global_step" + b"7" * 80, "cap of 64 bytes"),
])
def test_a_latest_that_names_a_path_is_refused(db, tmp_path, content, why):
    files_id = store(db, archive(member(DS_MODEL, b"model"), member("latest", content)))
    refused(db, files_id, tmp_path, why, kind="resume")


def test_a_link_in_the_tag_folder_is_refused(db, tmp_path):
    link = member(DS_MODEL, None, tarfile.SYMTYPE, linkname="../../../../etc/passwd")
    refused(db, store(db, archive(member("latest", b"global_step7"), link)), tmp_path, "symbolic link", kind="resume")


def test_upload_stores_the_tag_folder_and_nothing_it_links_to(db, tmp_path):
    folder = checkpoint_folder(tmp_path)
    (folder / "latest").write_text("global_step7")
    (folder / "zero_to_fp32.py").write_text("print('run me')")
    (folder / "global_step7").mkdir()
    (folder / DS_MODEL).write_bytes(b"model")
    (folder / "global_step7" / "notes.txt").write_bytes(b"x")
    (tmp_path / "secret").write_bytes(b"secret")
    (folder / DS_OPTIM).symlink_to(tmp_path / "secret")
    (folder / "global_step8").symlink_to(folder / "global_step7")
    entry = checkpoints.upload(db, folder, model_id="m", run=1, step=7)
    resume = checkpoints.download(db, entry["files_id"], tmp_path / "resume", kind="resume")
    assert sorted(p.relative_to(resume).as_posix() for p in resume.rglob("*") if p.is_file()) == [
        "adapter_config.json", "adapter_model.safetensors", DS_MODEL, "latest", "optimizer.pt"]
