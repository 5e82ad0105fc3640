"""The notebook API (`mongotune.Client`) through the reference flow, against a real daemon and a tiny model."""

import pytest
import torch
from peft import PeftModel

from listener import imports
from listener.plot import series
from mongotune import Client, JobFailed, SpecError
from training import defaults

QUESTION = [{"role": "user", "content": "What is the capital of Italy?"}]


def definition(model_id, model_path: str, collection: str = "pirate_chat") -> dict:
    return {"_id": model_id, "model_name_or_path": model_path, "data": {"collection": collection, "key": "messages"},
            "trainer": {"max_steps": 4, "per_device_train_batch_size": 2, "max_seq_length": 64, "learning_rate": 1e-2,
                        "logging_steps": 1, "save_steps": 2, "eval_steps": 2, "lora_r": 4, "lora_alpha": 8}}


def greedy(model, tokenizer, messages, max_new_tokens: int) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_a_taken_id_is_a_spec_error_and_writes_nothing(db, server_uri, limits):
    db[defaults.MODELS].insert_one({"_id": "taken", "status": "succeeded"})
    with Client(server_uri, db.name, limits=limits) as tune:
        with pytest.raises(SpecError, match=r"^_id: a model with _id 'taken' is already in .*--replace.*`listener delete taken`"):
            tune.submit(definition("taken", "HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert db[defaults.MODELS].find_one({"_id": "taken"}) == {"_id": "taken", "status": "succeeded"}


def test_submit_wait_predict_list_and_load_locally(db, server_uri, start_daemon, tiny_model_path, limits, tmp_path):
    for part in imports.sample_parts(["pirate_chat"], fold=None):
        imports.insert(db["pirate_chat"], part)
    start_daemon()
    tune = Client(server_uri, db.name, limits=limits)

    with pytest.raises(SpecError, match="trainer.max_step"):
        tune.submit({**definition("typo", tiny_model_path), "trainer": {"max_step": 2}})
    assert db[defaults.MODELS].count_documents({}) == 0

    broken = tune.submit(definition("empty", tiny_model_path, collection="nothing_here"))
    model_id = tune.submit(definition("pirate", tiny_model_path))
    final = tune.wait(model_id, progress=True)
    assert final["status"] == "succeeded" and final["progress"]["step"] == 4
    losses = series(final["metrics"])[1]  # what `listener plot` draws, from what training/progress.py wrote
    assert [step for step, _ in losses["loss"]] == [1, 2, 3, 4] and [s for s, _ in losses["eval_loss"]] == [2, 4]
    with pytest.raises(JobFailed, match="model 'empty' failed: .*nothing_here") as failed:
        tune.wait(broken, progress=False, timeout=120)
    assert failed.value.document["error"]["field"].startswith("data")

    answer = tune.predict(model_id, QUESTION, params={"max_new_tokens": 5}, timeout=120)
    listed = tune.checkpoints(model_id)
    assert [(c["run"], c["step"]) for c in listed] == [(1, 2), (1, 4)]
    best = final["best_checkpoint"]

    model, tokenizer = tune.load(model_id, folder=tmp_path)
    assert isinstance(model, PeftModel)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n), "the adapter was trained"
    assert [p.name for p in tmp_path.glob("pirate-*/adapter_model.safetensors")] == ["adapter_model.safetensors"]
    assert next(tmp_path.glob("pirate-*")).name.endswith(f"-run{best['run']}-step{best['step']}")
    assert greedy(model, tokenizer, QUESTION, 5).strip() == answer, "it answers as the daemon's best checkpoint"
    inputs = tokenizer("Ahoy", return_tensors="pt")
    with torch.inference_mode():
        tuned = model(**inputs).logits
        with model.disable_adapter():
            base = model(**inputs).logits
    assert not torch.allclose(tuned, base), "the adapter changes what the model computes"

    with pytest.raises(LookupError, match="no model 'nobody'"):
        tune.checkpoints("nobody")
    tune.close()
