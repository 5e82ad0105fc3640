"""The whole loop through raw pymongo inserts, as any driver would make them, with a real daemon.

The module's tests share one daemon and database (each its own model ids): the four shapes are
trained once and then read.
"""

import pytest
from gridfs import GridFSBucket
from safetensors.torch import load_file

from listener.demo import load_samples
from tests.conftest import finished, wait_for
from training import checkpoints, defaults

TRAINER = {
    "max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 2,
    "save_steps": 3, "eval_steps": 3, "lora_r": 4, "lora_alpha": 8,
}
SHAPES = {
    "text": {"collection": "pirate_text", "key": "text"},
    "prompt-response": {"collection": "pirate_prompt_response", "key": ["prompt", "response"],
                        "template": "{prompt}{response}</s>"},
    "prompt-completion": {"collection": "pirate_prompt_response", "key": ["prompt", "response"]},
    "messages": {"collection": "pirate_chat", "key": "messages"},
}
# Names from the reference workflow, which current transformers/trl renamed or dropped.
OLD_NAMES = {"evaluation_strategy": "steps", "max_seq_length": 96, "overwrite_output_dir": True}


@pytest.fixture(scope="module")
def samples(module_db):
    load_samples(module_db)
    return module_db


@pytest.fixture(scope="module")
def trained(samples, module_daemon, tiny_model_path):
    db = samples
    for shape, data in SHAPES.items():
        db[defaults.MODELS].insert_one({"_id": shape, "model_name_or_path": tiny_model_path, "data": data,
                                        "trainer": {**TRAINER, **OLD_NAMES}})
    return {shape: wait_for(db[defaults.MODELS], shape, finished, timeout_s=300) for shape in SHAPES}


def test_every_shape_trains_to_checkpoints_in_gridfs(module_db, trained, tmp_path):
    db = module_db
    for shape, model in trained.items():
        assert model["status"] == "succeeded", (shape, model.get("error"))
        assert model["run"] == 1 and model["attempts"] == 1
        assert [c["step"] for c in model["checkpoints"]] == [3, 6]
        assert model["progress"]["step"] == model["progress"]["total_steps"] == 6
        assert any("loss" in m for m in model["metrics"]) and any("eval_loss" in m for m in model["metrics"])
        assert model["best_checkpoint"]["run"] == 1 and model["best_checkpoint"]["step"] in (3, 6)
        assert model["started_at"] <= model["finished_at"]

        stored = db[f"{defaults.CHECKPOINTS}.files"].find_one({"_id": model["checkpoints"][-1]["files_id"]})
        assert stored["metadata"]["model"] == shape and stored["metadata"]["step"] == 6
        folder = checkpoints.download(db, stored["_id"], tmp_path / shape)
        weights = load_file(folder / "adapter_model.safetensors")
        lora_b = [t for name, t in weights.items() if "lora_B" in name]
        assert lora_b and any(t.abs().sum() > 0 for t in lora_b), "LoRA B starts at zero: training changed it"
        assert not (folder / "training_args.bin").exists()


def test_requests_are_answered_from_checkpoints(module_db, trained):
    requests = module_db[defaults.REQUESTS]
    asks = {
        "chat": {"model": "messages", "input": [{"role": "user", "content": "ahoy what is the capital"}]},
        "text": {"model": "text", "input": "Captain's log", "params": {"max_new_tokens": 8}},
        "latest": {"model": "prompt-response", "input": "Question: sky?\nAnswer:", "checkpoint": "latest"},
        "pinned": {"model": "prompt-completion", "input": "Question: sea?\nAnswer:", "checkpoint": {"run": 1, "step": 3}},
        "base": {"model": "messages", "input": "ahoy", "checkpoint": "base", "params": {"do_sample": True,
                                                                                      "temperature": 0.7}},
    }
    ids = {name: requests.insert_one(doc).inserted_id for name, doc in asks.items()}
    answers = {name: wait_for(requests, i, finished, timeout_s=120) for name, i in ids.items()}
    for name, answer in answers.items():
        assert answer["status"] == "done", (name, answer.get("error"))
        assert isinstance(answer["output"], str)
        assert answer["usage"]["prompt_tokens"] > 0
        assert 0 < answer["usage"]["completion_tokens"] <= asks[name].get("params", {}).get("max_new_tokens", 128)
        assert answer["latency_ms"] > 0 and answer["completed_at"]
    assert answers["pinned"]["checkpoint_used"] == {"run": 1, "step": 3}
    assert answers["latest"]["checkpoint_used"] == {"run": 1, "step": 6}
    assert answers["chat"]["checkpoint_used"] == {"run": 1, "step": trained["messages"]["best_checkpoint"]["step"]}
    assert answers["base"]["checkpoint_used"] == "base"


def test_save_total_limit_prunes_gridfs_but_keeps_the_best(samples, module_daemon, tiny_model_path):
    db = samples
    db[defaults.MODELS].insert_one({"_id": "pruned", "model_name_or_path": tiny_model_path,
                                    "data": SHAPES["messages"],
                                    "trainer": {**TRAINER, "max_steps": 8, "save_steps": 2, "eval_steps": 2,
                                                "save_total_limit": 2}})
    model = wait_for(db[defaults.MODELS], "pruned", finished, timeout_s=300)
    assert model["status"] == "succeeded", model.get("error")
    steps = [c["step"] for c in model["checkpoints"]]
    best = model["best_checkpoint"]["step"]
    assert steps[-1] == 8 and best in steps and len(steps) <= 3
    files = list(GridFSBucket(db, defaults.CHECKPOINTS).find({"metadata.model": "pruned"}))
    assert sorted(f.metadata["step"] for f in files) == sorted(steps), "GridFS holds exactly what is listed"
