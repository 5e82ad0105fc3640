"""`training.inference`: the model caches and batched generation with a tiny real model."""

import json
import shutil
import uuid
from pathlib import Path

import pytest

from training import checkpoints
from training.config import GenerationParams, parse_model
from training.inference import DiskCache, ModelCache, answer, answer_rows, generation_kwargs, load, normalised
from training.limits import Limits

BIG = 2**40  # a budget nothing here reaches


def limits_for(path: str) -> Limits:
    return Limits(model_roots=(Path(path).parent,))


def spec_for(path: str, model_id="tiny"):
    return parse_model({"_id": model_id, "model_name_or_path": path, "data": {"collection": "docs"}}, limits_for(path))


def cache_for(db, work: Path, path: str, budget: int = BIG, disk: int = BIG) -> ModelCache:
    return ModelCache(db, limits_for(path), DiskCache(work, disk), budget)


@pytest.fixture(scope="module")
def loaded(tiny_model_path):
    return load(spec_for(tiny_model_path), limits_for(tiny_model_path), None)


PROMPTS = [
    [{"role": "system", "content": "be a pirate"}, {"role": "user", "content": "what is the capital of france"}],
    "ahoy matey the sea be blue",
    [{"role": "user", "content": "one two three"}],
]


def full_checkpoint(tmp_path: Path, tiny_model_path: str, name: str, generation: dict | None = None) -> Path:
    """The tiny model's own weights saved as a full checkpoint, with `generation` as its generation_config.json."""
    folder = tmp_path / name
    shutil.copytree(tiny_model_path, folder)
    for tokenizer_file in folder.glob("tokenizer*"):
        tokenizer_file.unlink()
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def other_base(tiny_model_path: str, name: str) -> str:
    """A copy of the tiny model under another path: another base, which the cache cannot share."""
    folder = Path(tiny_model_path).parent / f"{name}-{uuid.uuid4().hex[:8]}"
    shutil.copytree(tiny_model_path, folder)
    return str(folder)


def adapter_entries(db, tmp_path: Path, tiny_model_path: str, model_ids: list) -> list[dict]:
    """One stored LoRA checkpoint per model id, each with its own random (non-zero) weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    entries = []
    for n, model_id in enumerate(model_ids):
        torch.manual_seed(n)
        adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path),
                                 LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                            init_lora_weights=False))
        adapter.save_pretrained(tmp_path / f"adapter-{n}")
        entries.append(checkpoints.upload(db, tmp_path / f"adapter-{n}", model_id=model_id, run=1, step=1))
    return entries


def test_cache_returns_the_same_object_and_evicts_by_bytes(db, tmp_path, tiny_model_path):
    cache = cache_for(db, tmp_path, tiny_model_path, budget=1)  # room for one base, however small
    first = cache.get(spec_for(tiny_model_path), None)
    assert cache.get(spec_for(tiny_model_path), None) is first
    assert first.tokenizer.padding_side == "left"
    assert not first.model.training
    assert first.nbytes > 0
    other = cache.get(spec_for(other_base(tiny_model_path, "other"), model_id="other"), None)
    assert other.model is not first.model and len(cache._bases) == 1
    assert cache.get(spec_for(tiny_model_path), None) is not first


def test_cache_keeps_the_most_recently_used(db, tmp_path, tiny_model_path):
    one = load(spec_for(tiny_model_path), limits_for(tiny_model_path), None).nbytes
    cache = cache_for(db, tmp_path, tiny_model_path, budget=2 * one)
    paths = {name: other_base(tiny_model_path, name) for name in "abc"}
    a = cache.get(spec_for(paths["a"], "a"), None)
    b = cache.get(spec_for(paths["b"], "b"), None)
    assert cache.get(spec_for(paths["a"], "a"), None) is a  # a is now the most recent
    cache.get(spec_for(paths["c"], "c"), None)  # evicts b, the least recently used
    assert cache.get(spec_for(paths["a"], "a"), None) is a
    assert cache.get(spec_for(paths["b"], "b"), None) is not b


def test_models_of_one_base_share_it(db, tmp_path, tiny_model_path):
    cache = cache_for(db, tmp_path, tiny_model_path)
    a, b = cache.get(spec_for(tiny_model_path, "a"), None), cache.get(spec_for(tiny_model_path, "b"), None)
    assert a is not b and a.model is b.model and cache.nbytes == a.nbytes


def test_ten_adapters_of_one_base_cost_well_under_two_bases(db, tmp_path, tiny_model_path):
    names = [f"m{n}" for n in range(10)]
    entries = adapter_entries(db, tmp_path, tiny_model_path, names)
    cache = cache_for(db, tmp_path / "work", tiny_model_path)
    params = GenerationParams(max_new_tokens=6)
    served = [cache.get(spec_for(tiny_model_path, name), entry) for name, entry in zip(names, entries)]
    bare = cache.get(spec_for(tiny_model_path), None)
    one_base = bare.base.nbytes
    assert len(cache._bases) == 1 and len(bare.base.adapters) == 10
    assert cache.nbytes < 1.3 * one_base
    # switching adapters on the shared base answers exactly as each checkpoint loaded alone
    for name, entry in zip(names[:3], entries[:3]):
        alone = load(spec_for(tiny_model_path, name), limits_for(tiny_model_path),
                     cache.disk.folder(entry["files_id"]))
        assert answer(served[names.index(name)], PROMPTS, params) == answer(alone, PROMPTS, params)
    plain = load(spec_for(tiny_model_path), limits_for(tiny_model_path), None)
    assert answer(bare, PROMPTS, params) == answer(plain, PROMPTS, params)
    assert answer(served[0], PROMPTS, params) != answer(served[1], PROMPTS, params)


def test_the_least_recently_used_adapter_goes_first(db, tmp_path, tiny_model_path):
    names = ["x", "y", "z"]
    entries = adapter_entries(db, tmp_path, tiny_model_path, names)
    probe = cache_for(db, tmp_path / "probe", tiny_model_path).get(spec_for(tiny_model_path, "x"), entries[0])
    adapter_bytes = probe.nbytes - probe.base.nbytes
    cache = cache_for(db, tmp_path / "work", tiny_model_path, budget=probe.base.nbytes + 2 * adapter_bytes)
    x = cache.get(spec_for(tiny_model_path, "x"), entries[0])
    cache.get(spec_for(tiny_model_path, "y"), entries[1])
    assert cache.get(spec_for(tiny_model_path, "x"), entries[0]) is x  # x is now more recent than y
    cache.get(spec_for(tiny_model_path, "z"), entries[2])  # y goes, not the base
    assert sorted(x.base.adapters) == sorted(f"adapter_{e['files_id']}" for e in (entries[0], entries[2]))
    y = cache.get(spec_for(tiny_model_path, "y"), entries[1])  # loaded again, into the same base
    assert y.model is x.model and answer(y, ["ahoy"], GenerationParams(max_new_tokens=3))


def test_ids_of_different_types_are_different_models(db, tmp_path, tiny_model_path):
    from bson import ObjectId

    oid = ObjectId()
    cache = cache_for(db, tmp_path, tiny_model_path)
    assert cache.get(spec_for(tiny_model_path, oid), None) is not cache.get(spec_for(tiny_model_path, str(oid)), None)
    assert cache.get(spec_for(tiny_model_path, 1), None) is not cache.get(spec_for(tiny_model_path, "1"), None)


def test_cache_loads_an_adapter_from_gridfs(db, tmp_path, tiny_model_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    adapter = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                              task_type="CAUSAL_LM"))
    folder = tmp_path / "checkpoint-5"
    adapter.save_pretrained(folder)
    entry = checkpoints.upload(db, folder, model_id="tiny", run=1, step=5)
    cache = cache_for(db, tmp_path / "work", tiny_model_path)
    loaded = cache.get(spec_for(tiny_model_path), entry)
    assert isinstance(loaded.model, PeftModel)
    assert (tmp_path / "work" / str(entry["files_id"]) / "adapter_config.json").exists()
    assert cache.get(spec_for(tiny_model_path), entry) is loaded
    assert cache.get(spec_for(tiny_model_path), None) is not loaded
    result = answer(loaded, ["ahoy"], GenerationParams(max_new_tokens=3))
    assert result[0]["usage"]["completion_tokens"] <= 3


def test_a_checkpoint_of_another_model_is_refused(db, tmp_path, tiny_model_path):
    entry = checkpoints.upload(db, full_checkpoint(tmp_path, tiny_model_path, "c"), model_id="other", run=1, step=1)
    with pytest.raises(LookupError, match="belongs to another model"):
        cache_for(db, tmp_path / "work", tiny_model_path).get(spec_for(tiny_model_path), entry)


def test_checkpoint_generation_settings_are_ignored(db, tmp_path, tiny_model_path, loaded):
    hostile = {"num_beams": 96, "num_return_sequences": 4, "do_sample": True, "temperature": 5.0,
               "max_new_tokens": 400, "min_new_tokens": 300}
    entry = checkpoints.upload(db, full_checkpoint(tmp_path, tiny_model_path, "c", hostile),
                               model_id="tiny", run=1, step=1)
    served = cache_for(db, tmp_path / "work", tiny_model_path).get(spec_for(tiny_model_path), entry)
    assert set(served.model.generation_config.to_diff_dict()) <= {"bos_token_id", "eos_token_id", "pad_token_id",
                                                                  "transformers_version"}
    params = GenerationParams(max_new_tokens=6)
    assert answer(served, PROMPTS, params) == answer(loaded, PROMPTS, params)  # same weights, greedy, one each


def test_a_checkpoint_of_another_shape_is_refused_and_deleted(db, tmp_path, tiny_model_path):
    from safetensors.torch import save_file
    import torch

    folder = tmp_path / "odd"
    folder.mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(3, 3)}, folder / "model.safetensors")
    entry = checkpoints.upload(db, folder, model_id="tiny", run=1, step=1)
    with pytest.raises(RuntimeError):
        cache_for(db, tmp_path / "work", tiny_model_path).get(spec_for(tiny_model_path), entry)
    assert not (tmp_path / "work" / str(entry["files_id"])).exists()


def test_a_checkpoint_over_the_disk_budget_is_refused(db, tmp_path, tiny_model_path):
    entry = checkpoints.upload(db, full_checkpoint(tmp_path, tiny_model_path, "c"), model_id="tiny", run=1, step=1)
    cache = cache_for(db, tmp_path / "work", tiny_model_path, disk=1000)
    with pytest.raises(LookupError, match="MONGOTUNE_SERVING_DISK_BYTES"):
        cache.get(spec_for(tiny_model_path), entry)
    assert not any((tmp_path / "work").iterdir())


def test_generate_a_mixed_batch(loaded):
    params = GenerationParams(max_new_tokens=6)
    results = answer(loaded, PROMPTS, params)
    assert len(results) == 3
    for result in results:
        assert set(result) == {"output", "finish_reason", "usage"}
        assert isinstance(result["output"], str)
        assert result["usage"]["prompt_tokens"] > 0
        assert 0 < result["usage"]["completion_tokens"] <= params.max_new_tokens
    chat_text = loaded.tokenizer.apply_chat_template(PROMPTS[0], add_generation_prompt=True, tokenize=False)
    assert chat_text.endswith("<|im_start|>assistant\n")
    chat_tokens = len(loaded.tokenizer(chat_text, add_special_tokens=False)["input_ids"])
    assert results[0]["usage"]["prompt_tokens"] == chat_tokens
    assert results[1]["usage"]["prompt_tokens"] == len(loaded.tokenizer(PROMPTS[1])["input_ids"])


def test_a_prompt_the_template_refuses_fails_alone(tiny_model_path):
    served = load(spec_for(tiny_model_path), limits_for(tiny_model_path), None)
    served.tokenizer.chat_template = "{% if messages|length > 1 %}{{ raise_exception('one only') }}{% endif %}x"
    results = answer(served, [PROMPTS[0], "ahoy", PROMPTS[2]], GenerationParams(max_new_tokens=2))
    assert results[0]["error"]["type"] == "invalid_request" and "one only" in results[0]["error"]["message"]
    assert "output" in results[1] and "output" in results[2]


def test_an_answer_says_whether_it_ended_or_was_cut_at_max_new_tokens(tiny_model_path):
    """A model whose logits are all equal always says token 0: cut at the limit, until token 0 is its end."""
    served = load(spec_for(tiny_model_path), limits_for(tiny_model_path), None)
    served.model.get_output_embeddings().weight.data.zero_()
    params = GenerationParams(max_new_tokens=3)
    cut = answer(served, PROMPTS[1:], params)
    assert [(r["finish_reason"], r["usage"]["completion_tokens"]) for r in cut] == [("length", 3)] * 2
    served.tokenizer.eos_token = served.tokenizer.convert_ids_to_tokens(0)
    ended = answer(served, PROMPTS[1:], params)
    assert [(r["finish_reason"], r["usage"]["completion_tokens"]) for r in ended] == [("stop", 1)] * 2


def test_greedy_generation_is_deterministic(loaded):
    params = GenerationParams(max_new_tokens=8, do_sample=False)
    assert answer(loaded, PROMPTS, params) == answer(loaded, PROMPTS, params)


def test_sampling_params_reach_generate(loaded):
    tokenizer = loaded.tokenizer
    sampled = generation_kwargs(GenerationParams(max_new_tokens=4, temperature=0.7), tokenizer)
    assert sampled["do_sample"] is True and sampled["temperature"] == 0.7
    assert sampled["num_beams"] == 1 and sampled["num_return_sequences"] == 1
    off = generation_kwargs(GenerationParams(temperature=0.7, top_p=0.9, do_sample=False,
                                             repetition_penalty=1.2), tokenizer)
    assert off["do_sample"] is False and "temperature" not in off and "top_p" not in off
    assert off["repetition_penalty"] == 1.2
    assert off["pad_token_id"] == tokenizer.pad_token_id
    results = answer(loaded, PROMPTS[:2], GenerationParams(max_new_tokens=4, temperature=0.9, top_k=20))
    assert all(r["usage"]["completion_tokens"] <= 4 for r in results)


def test_requests_that_generate_alike_normalise_alike():
    assert normalised(GenerationParams(temperature=0.3, do_sample=False)) == normalised(GenerationParams())
    assert normalised(GenerationParams(top_p=0.5)) != normalised(GenerationParams(top_p=0.6))
    assert normalised(GenerationParams(temperature=0.5))["do_sample"] is True


def test_batching_does_not_change_greedy_answers(loaded):
    params = GenerationParams(max_new_tokens=8)
    batched = answer(loaded, PROMPTS, params)
    alone = [answer(loaded, [prompt], params)[0] for prompt in PROMPTS]
    assert batched == alone


def test_a_mixed_adapter_batch_answers_as_each_adapter_alone(db, tmp_path, tiny_model_path):
    entries = adapter_entries(db, tmp_path, tiny_model_path, ["x", "y"])
    cache = cache_for(db, tmp_path / "work", tiny_model_path)
    views = [cache.get(spec_for(tiny_model_path, name), entry) for name, entry in zip("xy", entries)]
    views.append(cache.get(spec_for(tiny_model_path), None))
    params = GenerationParams(max_new_tokens=6)
    rows = [0, 1, 2, 1, 0, 2]
    prompts = [PROMPTS[n % len(PROMPTS)] for n in range(len(rows))]
    alone = [answer(views[row], [prompt], params)[0] for row, prompt in zip(rows, prompts)]
    assert answer_rows(views, rows, prompts, params) == alone
    other = cache.get(spec_for(other_base(tiny_model_path, "other"), "other"), None)  # not shared: one generate each
    assert answer_rows([views[0], other], [1, 0], prompts[:2], params) == [answer(other, [prompts[0]], params)[0],
                                                                           answer(views[0], [prompts[1]], params)[0]]
