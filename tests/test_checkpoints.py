"""`training.checkpoints`: GridFS round trips on the real server, selection and pruning."""

import io
import math
import tarfile

import gridfs
import pytest
from pymongo import MongoClient

from listener.embedded import EmbeddedServer, free_port
from training import checkpoints, defaults
from training.checkpoints import best_of, select, to_prune

FILES = {  # what a serving download gives back (the tokenizer comes from the base model)
    "adapter_model.safetensors": bytes(range(256)) * 40,
    "adapter_config.json": b'{"r": 8, "lora_alpha": 16}',
}
RESUME_FILES = {"optimizer.pt": b"optimizer state", "rng_state.pth": b"rng", "trainer_state.json": b"{}",
                "tokenizer_config.json": b"{}"}
STORED = {**FILES, **RESUME_FILES}


def checkpoint_folder(tmp_path):
    folder = tmp_path / "checkpoint-10"
    folder.mkdir()
    for name, content in STORED.items():
        (folder / name).write_bytes(content)
    (folder / "training_args.bin").write_bytes(b"\x80\x04pickled, never stored")
    (folder / "README.md").write_bytes(b"peft writes one; never stored")
    (folder / "subdir").mkdir()  # folders are not part of a checkpoint archive
    return folder


def test_upload_download_round_trip(db, tmp_path):
    entry = checkpoints.upload(db, checkpoint_folder(tmp_path), model_id="llm", run=2, step=10)
    assert entry["run"] == 2 and entry["step"] == 10
    assert entry["size"] > sum(len(content) for content in STORED.values())
    assert entry["created_at"].tzinfo is not None
    dest = checkpoints.download(db, entry["files_id"], tmp_path / "elsewhere" / "ckpt")
    assert sorted(p.name for p in dest.iterdir()) == sorted(FILES)
    for name, content in FILES.items():
        assert (dest / name).read_bytes() == content


def test_an_upload_the_server_fails_starts_over_and_leaves_one_whole_archive(tmp_path, caplog):
    """The server fails the first chunk write on the wire (as the embedded one once did with an internal error):
    the upload starts over as a new file, so a checkpoint save costs a retry, not the run."""
    with EmbeddedServer(tmp_path / "server", port=free_port(), memory=True, failpoints=True) as server, \
            MongoClient(server.uri) as client:
        db = client["flaky"]
        client.admin.command({"configureFailPoint": "failCommand", "mode": {"times": 1},
                              "data": {"failCommands": ["insert"], "errorCode": 1}})
        entry = checkpoints.upload(db, checkpoint_folder(tmp_path), model_id="llm", run=1, step=10)
        assert "starting it over (2 of 3)" in caplog.text
        files = list(db[f"{defaults.CHECKPOINTS}.files"].find())
        assert [f["_id"] for f in files] == [entry["files_id"]]
        assert set(db[f"{defaults.CHECKPOINTS}.chunks"].distinct("files_id")) == {entry["files_id"]}
        dest = checkpoints.download(db, entry["files_id"], tmp_path / "ckpt")
        assert {p.name: p.read_bytes() for p in dest.iterdir()} == FILES


def test_resume_download_adds_the_trainer_states(db, tmp_path):
    entry = checkpoints.upload(db, checkpoint_folder(tmp_path), model_id="llm", run=2, step=10)
    dest = checkpoints.download(db, entry["files_id"], tmp_path / "resume" / "ckpt", kind="resume")
    assert sorted(p.name for p in dest.iterdir()) == sorted(STORED)
    for name, content in STORED.items():
        assert (dest / name).read_bytes() == content


def test_gridfs_metadata(db, tmp_path):
    entry = checkpoints.upload(db, checkpoint_folder(tmp_path), model_id="llm", run=3, step=40)
    stored = db[f"{defaults.CHECKPOINTS}.files"].find_one({"_id": entry["files_id"]})
    assert stored["metadata"]["model"] == "llm"
    assert stored["metadata"]["run"] == 3
    assert stored["metadata"]["step"] == 40
    assert sorted(stored["metadata"]["files"]) == sorted(STORED)
    assert stored["filename"] == "llm/run-3/step-40.tar"
    assert stored["length"] == entry["size"]
    assert db[f"{defaults.CHECKPOINTS}.chunks"].count_documents({"files_id": entry["files_id"]}) >= 1


def test_only_allowlisted_files_reach_gridfs(db, tmp_path):
    entry = checkpoints.upload(db, checkpoint_folder(tmp_path), model_id="llm", run=1, step=1)
    data = gridfs.GridFSBucket(db, defaults.CHECKPOINTS).open_download_stream(entry["files_id"]).read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert sorted(tar.getnames()) == sorted(STORED)
    assert b"pickled, never stored" not in data and b"peft writes one" not in data


def test_delete(db, tmp_path):
    entry = checkpoints.upload(db, checkpoint_folder(tmp_path), model_id="llm", run=1, step=1)
    checkpoints.delete(db, entry["files_id"], model_id="llm", run=1)
    assert db[f"{defaults.CHECKPOINTS}.files"].count_documents({}) == 0
    assert db[f"{defaults.CHECKPOINTS}.chunks"].count_documents({}) == 0


# --- a real trainer's checkpoint ------------------------------------------------------------------

def train_tiny(model_path: str, output_dir, max_steps: int, resume: str | None = None):
    """A real Trainer with a LoRA adapter on the tiny model, saving every step."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                              TrainingArguments)

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    data = Dataset.from_dict(dict(tokenizer(["ahoy matey the sea be blue", "what is the capital of france"] * 4)))
    args = TrainingArguments(str(output_dir), max_steps=max_steps, save_steps=1, per_device_train_batch_size=2,
                             logging_steps=1, use_cpu=True, report_to=[])
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_a_real_trainer_checkpoint_round_trips_and_resumes(db, tmp_path, tiny_model_path):
    train_tiny(tiny_model_path, tmp_path / "out", max_steps=2)
    folder = tmp_path / "out" / "checkpoint-2"
    assert (folder / "training_args.bin").exists() and (folder / "optimizer.pt").exists()
    entry = checkpoints.upload(db, folder, model_id="llm", run=1, step=2)
    stored = checkpoints.verified(db, entry["files_id"], "llm", run=1)
    assert (stored.run, stored.step) == (1, 2)

    served = checkpoints.download(db, entry["files_id"], tmp_path / "serving")
    assert (served / "adapter_model.safetensors").exists() and (served / "adapter_config.json").exists()
    assert not [p.name for p in served.iterdir() if p.suffix in (".pt", ".pth", ".bin")]

    resume = checkpoints.download(db, entry["files_id"], tmp_path / "resume", kind="resume")
    names = {p.name for p in resume.iterdir()}
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= names
    assert "training_args.bin" not in names and "README.md" not in names
    resumed = train_tiny(tiny_model_path, tmp_path / "again", max_steps=3, resume=str(resume))
    assert resumed.state.global_step == 3
    assert [e["step"] for e in resumed.state.log_history if "loss" in e] == [1, 2, 3], "steps 1-2 came from the archive"


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
