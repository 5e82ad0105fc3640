"""Runs and lineage, the promotion gate and starting from another adapter, through a real daemon.

A test that needs no setting of its own shares the module's daemon and database (its own model ids).
"""

import math

import pytest
import torch
from bson import json_util
from safetensors.torch import load_file

from tests.conftest import finished, wait_for
from training import checkpoints, defaults

TRAINER = {"max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 2, "lora_r": 4,
           "lora_alpha": 8, "lora_dropout": 0.0}
DATA = {"collection": "pirate_text", "key": "text"}


def model(model_id, path: str, **fields) -> dict:
    trainer = {**TRAINER, **fields.pop("trainer", {})}
    return {"_id": model_id, "model_name_or_path": path, "data": DATA, "trainer": trainer, **fields}


def trained(db, model_id, run: int = 1) -> dict:
    done = wait_for(db[defaults.MODELS], model_id, lambda d: d.get("run") == run and finished(d), timeout_s=300)
    assert done["status"] == "succeeded", done.get("error")
    return done


def retrain(db, model_id, run: int, **sets) -> dict:
    db[defaults.MODELS].update_one({"_id": model_id}, {"$set": {"status": "pending", **sets}})
    return trained(db, model_id, run)


def losses(document: dict, run: int) -> list[float]:
    return [m["loss"] for m in document["metrics"] if m["run"] == run and "loss" in m]


def ask_best(db, model_id) -> dict:
    request = db[defaults.REQUESTS].insert_one({"model": model_id, "input": "ahoy", "params": {"max_new_tokens": 2}})
    answer = wait_for(db[defaults.REQUESTS], request.inserted_id, finished)
    assert answer["status"] == "done", answer.get("error")
    return answer["checkpoint_used"]


def test_runs_record_lineage_and_the_gate_promotes_only_a_better_run(module_samples, module_daemon,
                                                                    tiny_model_path):
    db = module_samples
    db[defaults.MODELS].insert_one(model("gated", tiny_model_path, trainer={"learning_rate": 1e-7}))
    first = trained(db, "gated")
    entry = first["runs"][0]
    assert entry["number"] == 1 and entry["trigger"] == "insert" and entry["outcome"] == "succeeded"
    assert entry["started_at"] <= entry["ended_at"]
    assert entry["data"]["collection"] == "pirate_text" and entry["data"]["count"] == db.pirate_text.count_documents({})
    assert entry["data"]["first_id"] == db.pirate_text.find_one(sort=[("_id", 1)])["_id"]
    assert len(entry["data"]["ids_sha256"]) == 64
    assert entry["arguments"]["given"]["learning_rate"] == 1e-7
    assert entry["arguments"]["defaults"]["logging_first_step"] is True
    assert {"torch", "transformers", "trl", "peft"} <= set(entry["versions"])
    assert len(entry["base"]["files_sha256"]) == 64 and entry["host"]["devices"]
    assert entry["promotion"]["promoted"] and entry["promotion"]["reason"] == "no earlier checkpoint serves"
    served = first["best_checkpoint"]
    assert served["run"] == 1
    metrics = first["checkpoints"][-1]["metrics"]
    assert {"eval_loss", "eval_perplexity", "eval_mean_token_accuracy"} <= set(metrics)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))

    # What `listener.retrain` writes when new documents arrive: the run continues from the serving adapter.
    worse = retrain(db, "gated", 2, trigger="new_documents", **{"promotion.min_delta": 1e6, "trainer.learning_rate": 5e-3})
    gate = worse["runs"][1]["promotion"]
    assert worse["runs"][1]["trigger"] == "new_documents" and not gate["promoted"]
    assert worse["runs"][1]["init_from"] == {"model": "gated", **served}
    assert gate["documents"] > 0 and gate["score"] < gate["serving_score"]  # better, yet not by a million
    assert worse["best_checkpoint"] == served and worse["runs"][1]["best"]["run"] == 2
    assert ask_best(db, "gated") == served

    better = retrain(db, "gated", 3, **{"promotion.min_delta": 0, "trainer.save_total_limit": 1})
    gate = better["runs"][2]["promotion"]
    assert better["runs"][2]["trigger"] == "user", "a status set back to pending by hand"
    assert better["runs"][2]["init_from"] == {"model": "gated", **served}, "run 2 was not promoted: run 1's still serves"
    assert gate["promoted"] and gate["score"] <= gate["serving_score"]
    assert better["best_checkpoint"] == gate["checkpoint"] and gate["checkpoint"]["run"] == 3
    assert any(e["kind"] == "promoted" and e["run"] == 3 for e in better["events"])
    assert ask_best(db, "gated") == gate["checkpoint"]
    assert [r["number"] for r in better["runs"]] == [1, 2, 3]
    kept = {(c["run"], c["step"]) for c in better["checkpoints"]}
    assert (served["run"], served["step"]) in kept, "pruning never deletes an earlier run's promoted checkpoint"


def lora_b(db, document: dict, tmp_path, name: str) -> dict:
    """The LoRA B matrices of the document's `best` checkpoint (zero in a fresh adapter)."""
    entry = checkpoints.select(document, "best")
    folder = checkpoints.download(db, entry["files_id"], tmp_path / name)
    return {k: t for k, t in load_file(folder / "adapter_model.safetensors").items() if "lora_B" in k}


def test_a_run_redone_from_its_entry_and_a_model_started_from_its_adapter(module_samples, module_daemon,
                                                                          tiny_model_path, tmp_path):
    db = module_samples
    db[defaults.MODELS].insert_one(model("a", tiny_model_path, trainer={"learning_rate": 1e-2}))
    first = trained(db, "a")
    recorded = first["runs"][0]

    redo = {"collection": recorded["data"]["collection"], "filter": json_util.loads(recorded["data"]["filter"]),
            "key": "text"}
    db[defaults.MODELS].insert_many([
        {"_id": "redo", "model_name_or_path": tiny_model_path, "data": redo,
         "trainer": {**recorded["arguments"]["given"], **{k: recorded["arguments"]["trainer"][k] for k in TRAINER
                                                          if k.startswith("lora_")}}},
        model("b", tiny_model_path, init_from={"model": "a"},
              trainer={"learning_rate": 1e-9, "max_steps": 2, "save_steps": 1, "early_stopping_patience": 1}),
        model("c", tiny_model_path, init_from={"model": "nowhere"}),
    ])
    again = trained(db, "redo")
    assert again["runs"][0]["data"]["ids_sha256"] == recorded["data"]["ids_sha256"]
    assert losses(again, 1) == pytest.approx(losses(first, 1), rel=1e-5)
    assert len(losses(first, 1)) == TRAINER["max_steps"]

    started = trained(db, "b")
    best = first["best_checkpoint"]
    assert started["runs"][0]["init_from"] == {"model": "a", "run": best["run"], "step": best["step"]}
    theirs, ours = lora_b(db, first, tmp_path, "a"), lora_b(db, started, tmp_path, "b")
    assert any(t.abs().sum() > 0 for t in theirs.values()), "a trained adapter has non-zero B matrices"
    assert theirs.keys() == ours.keys()
    assert all(torch.allclose(theirs[k], ours[k], atol=1e-5) for k in theirs), "b starts from a's weights"

    refused = wait_for(db[defaults.MODELS], "c", finished)
    assert refused["status"] == "failed" and refused["error"]["field"] == "init_from.model"
    assert [(r["number"], r["outcome"]) for r in refused["runs"]] == [(1, "failed")], "a failed run has its entry too"


def test_an_operator_who_turns_init_from_off_fails_such_a_document(db, start_daemon, tiny_model_path):
    start_daemon(env={"MONGOTUNE_ALLOW_INIT_FROM": "0"})
    db[defaults.MODELS].insert_one(model("c", tiny_model_path, init_from={"model": "a"}))
    refused = wait_for(db[defaults.MODELS], "c", finished)
    assert refused["status"] == "failed" and refused["error"]["field"] == "init_from"
    assert "MONGOTUNE_ALLOW_INIT_FROM" in refused["error"]["message"]
