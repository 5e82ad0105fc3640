"""`training.inference`: the model cache and batched generation with a tiny real model."""

import pytest

from training import checkpoints
from training.config import GenerationParams, parse_model
from training.inference import ModelCache, generate, generation_kwargs


def spec_for(path: str, model_id="tiny"):
    return parse_model({"_id": model_id, "model_name_or_path": path, "data": {"collection": "docs"}})


@pytest.fixture(scope="module")
def loaded(tiny_model_path, tmp_path_factory):
    cache = ModelCache(None, tmp_path_factory.mktemp("cache"), capacity=1)
    return cache.get(spec_for(tiny_model_path), None)


PROMPTS = [
    [{"role": "system", "content": "be a pirate"}, {"role": "user", "content": "what is the capital of france"}],
    "ahoy matey the sea be blue",
    [{"role": "user", "content": "one two three"}],
]


def test_cache_returns_the_same_object_and_evicts(db, tmp_path, tiny_model_path):
    cache = ModelCache(db, tmp_path, capacity=1)
    first = cache.get(spec_for(tiny_model_path), None)
    assert cache.get(spec_for(tiny_model_path), None) is first
    assert first.tokenizer.padding_side == "left"
    assert not first.model.training
    other = cache.get(spec_for(tiny_model_path, model_id="other"), None)
    assert other is not first
    assert len(cache._models) == 1
    again = cache.get(spec_for(tiny_model_path), None)
    assert again is not first
    assert len(cache._models) == 1


def test_cache_keeps_the_most_recently_used(db, tmp_path, tiny_model_path):
    cache = ModelCache(db, tmp_path, capacity=2)
    a = cache.get(spec_for(tiny_model_path, "a"), None)
    b = cache.get(spec_for(tiny_model_path, "b"), None)
    assert cache.get(spec_for(tiny_model_path, "a"), None) is a  # a is now the most recent
    cache.get(spec_for(tiny_model_path, "c"), None)  # evicts b, the least recently used
    assert cache.get(spec_for(tiny_model_path, "a"), None) is a
    assert cache.get(spec_for(tiny_model_path, "b"), None) is not b


def test_cache_loads_an_adapter_from_gridfs(db, tmp_path, tiny_model_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    adapter = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                              task_type="CAUSAL_LM"))
    folder = tmp_path / "checkpoint-5"
    adapter.save_pretrained(folder)
    entry = checkpoints.upload(db, folder, model_id="tiny", run=1, step=5)
    cache = ModelCache(db, tmp_path / "work", capacity=1)
    loaded = cache.get(spec_for(tiny_model_path), entry)
    assert isinstance(loaded.model, PeftModel)
    assert (tmp_path / "work" / str(entry["files_id"]) / "adapter_config.json").exists()
    assert cache.get(spec_for(tiny_model_path), entry) is loaded
    assert cache.get(spec_for(tiny_model_path), None) is not loaded
    result = generate(loaded, ["ahoy"], GenerationParams(max_new_tokens=3))
    assert result[0]["usage"]["completion_tokens"] <= 3


def test_generate_a_mixed_batch(loaded):
    params = GenerationParams(max_new_tokens=6)
    results = generate(loaded, PROMPTS, params)
    assert len(results) == 3
    for result in results:
        assert set(result) == {"output", "usage"}
        assert isinstance(result["output"], str)
        assert result["usage"]["prompt_tokens"] > 0
        assert 0 < result["usage"]["completion_tokens"] <= params.max_new_tokens
    chat_text = loaded.tokenizer.apply_chat_template(PROMPTS[0], add_generation_prompt=True, tokenize=False)
    assert chat_text.endswith("<|im_start|>assistant\n")
    chat_tokens = len(loaded.tokenizer(chat_text, add_special_tokens=False)["input_ids"])
    assert results[0]["usage"]["prompt_tokens"] == chat_tokens
    assert results[1]["usage"]["prompt_tokens"] == len(loaded.tokenizer(PROMPTS[1])["input_ids"])


def test_greedy_generation_is_deterministic(loaded):
    params = GenerationParams(max_new_tokens=8, do_sample=False)
    assert generate(loaded, PROMPTS, params) == generate(loaded, PROMPTS, params)


def test_sampling_params_reach_generate(loaded):
    tokenizer = loaded.tokenizer
    greedy = generation_kwargs(GenerationParams(max_new_tokens=4, temperature=0.7), tokenizer)
    assert greedy["do_sample"] is True and greedy["temperature"] == 0.7
    off = generation_kwargs(GenerationParams(temperature=0.7, top_p=0.9, do_sample=False,
                                             repetition_penalty=1.2), tokenizer)
    assert off["do_sample"] is False and "temperature" not in off and "top_p" not in off
    assert off["repetition_penalty"] == 1.2
    assert off["pad_token_id"] == tokenizer.pad_token_id
    results = generate(loaded, PROMPTS[:2], GenerationParams(max_new_tokens=4, temperature=0.9, top_k=20))
    assert all(r["usage"]["completion_tokens"] <= 4 for r in results)


def test_batching_does_not_change_greedy_answers(loaded):
    params = GenerationParams(max_new_tokens=8)
    batched = generate(loaded, PROMPTS, params)
    alone = [generate(loaded, [prompt], params)[0] for prompt in PROMPTS]
    assert batched == alone
