"""Serving: chat prompts answered through `_requests` documents and by calling `generate` directly.

mongotune is timed from the first insert to the last `done`, with every request inserted at once
so the daemon may batch them. The baselines load the same base model and the same adapter from
GridFS, then call `generate` once per prompt (what a user writes first) and once for all prompts
with left padding. Both sides answer one prompt first, untimed, so model loading is excluded.
"""

from bench.common import Context, Row, step
from listener.processes import wait_until
from bench.training import COLLECTION, MODEL_ID
from training import checkpoints, defaults

PROMPTS = 16
MAX_NEW_TOKENS = 32
TIMEOUT_S = 300.0


def held_out_prompts(db) -> list[list[dict]]:
    """User turns from the validation fold, which neither training run saw."""
    documents = db[COLLECTION].find({"_fold": "valid"}, limit=PROMPTS)
    return [[m for m in doc["messages"] if m["role"] == "user"][:1] for doc in documents]


def ask(db, prompts: list) -> list[dict]:
    """Insert every request at once and wait for all of them; the answered documents, in order."""
    requests = db[defaults.REQUESTS]
    ids = requests.insert_many([{"model": MODEL_ID, "input": p, "checkpoint": "best",
                                 "params": {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False}}
                                for p in prompts]).inserted_ids
    query = {"_id": {"$in": ids}, "status": {"$in": ["done", "failed", "cancelled"]}}
    wait_until(lambda: requests.count_documents(query) == len(ids), TIMEOUT_S, f"{len(ids)} answers")
    answered = {d["_id"]: d for d in requests.find({"_id": {"$in": ids}})}
    failed = [d for d in answered.values() if d["status"] != "done"]
    if failed:
        raise RuntimeError(f"{len(failed)} request(s) {failed[0]['status']}: {failed[0].get('error')}")
    return [answered[i] for i in ids]


def load_direct(ctx: Context):
    """The base model plus mongotune's best adapter, the way a user loads them by hand."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    document = ctx.db[defaults.MODELS].find_one({"_id": MODEL_ID})
    folder = checkpoints.download(ctx.db, checkpoints.select(document, "best")["files_id"], ctx.home / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ctx.model_path), folder)
    return model.eval(), tokenizer


def generate(model, tokenizer, prompts: list) -> list[str]:
    """One `generate` call for the given chats, greedy, decoded without the prompt."""
    import torch

    inputs = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, padding=True, return_dict=True,
                                           return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]


def batch_sizes(answered: list[dict]) -> list[int]:
    """The daemon's batches, in the order it ran them: a batch's answers are written together."""
    done = sorted(answered, key=lambda d: d["completed_at"])
    sizes: list[int] = []
    while sum(sizes) < len(done):
        sizes.append(done[sum(sizes)]["batch_size"])
    return sizes


def run(ctx: Context) -> list[Row]:
    prompts, console = held_out_prompts(ctx.db), ctx.console
    with step(console, "warming up mongotune serving (one request: loads model and adapter)"):
        ask(ctx.db, prompts[:1])
    with step(console, f"serving {len(prompts)} requests via mongotune (first insert to last done)") as ours:
        answered = ask(ctx.db, prompts)
    with step(console, "warming up direct generate (load, download adapter, one generate)"):
        model, tokenizer = load_direct(ctx)
        generate(model, tokenizer, prompts[:1])
    with step(console, f"generate once per prompt, {len(prompts)} prompts") as loop:
        one_by_one = [generate(model, tokenizer, [p])[0] for p in prompts]
    with step(console, f"generate once for all {len(prompts)} prompts") as batched:
        generate(model, tokenizer, prompts)
    same = sum(d["output"] == text for d, text in zip(answered, one_by_one))
    rate = len(prompts) / ours.seconds
    return [
        Row(f"serving: {len(prompts)} chats vs a generate loop", "req/s", rate, len(prompts) / loop.seconds,
            f"daemon ran batches of {batch_sizes(answered)}; {same}/{len(prompts)} answers identical"),
        Row(f"serving: {len(prompts)} chats vs one batched generate", "req/s", rate, len(prompts) / batched.seconds,
            "both sides warmed up first: model loading excluded"),
    ]
