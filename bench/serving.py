"""Serving: chat prompts answered through `_requests` documents and by calling `generate` directly.

mongotune is timed from the first insert to the last `done` (seen through a change stream, so no
polling interval adds to it), with every request inserted at once so the daemon may batch them.
The baselines load the same base model and the same adapter from GridFS, then call `generate` once
per prompt (what a user writes first) and once for all prompts with left padding. Both sides answer
one prompt first, untimed, so model loading is excluded. In the same run: many requests batched
versus one at a time through the same daemon, a lone request versus a direct `generate` (median
and p99, interleaved so noise hits both), the serving worker's resident memory with one and with
`ADAPTERS` adapters of one base, and the time from a promotion to the first answer from it.
"""

import re
import statistics
import time

from bench.common import Context, Row, step
from bench.training import COLLECTION, MODEL_ID
from training import checkpoints, defaults

PROMPTS = 16
MANY = 64  # inserted at once, against the same number answered one at a time
REPEATS = 15  # lone-request latency samples per side
ADAPTERS = 10
MAX_NEW_TOKENS = 32
TIMEOUT_S = 300.0
FINAL = ["done", "failed", "cancelled"]


def held_out_prompts(db, count: int = PROMPTS) -> list[list[dict]]:
    """User turns from the validation fold, which neither training run saw; repeated to reach `count`."""
    documents = db[COLLECTION].find({"_fold": "valid"}, limit=count)
    prompts = [[m for m in doc["messages"] if m["role"] == "user"][:1] for doc in documents]
    return [prompts[n % len(prompts)] for n in range(count)]


def ask(db, prompts: list, model_id=MODEL_ID) -> list[dict]:
    """Insert every request at once and wait for all of them; the answered documents, in order."""
    requests = db[defaults.REQUESTS]
    with requests.watch([{"$match": {"operationType": "update",
                                     "updateDescription.updatedFields.status": {"$in": FINAL}}}]) as changes:
        ids = requests.insert_many([{"model": model_id, "input": p, "checkpoint": "best",
                                     "params": {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False}}
                                    for p in prompts]).inserted_ids
        waiting, deadline = set(ids), time.monotonic() + TIMEOUT_S
        while waiting and time.monotonic() < deadline:
            change = changes.try_next()
            if change:
                waiting.discard(change["documentKey"]["_id"])
    if waiting:
        raise RuntimeError(f"{len(waiting)} of {len(ids)} requests not answered within {TIMEOUT_S:g} s")
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
    tokenizer = AutoTokenizer.from_pretrained(ctx.model_path, padding_side="left")  # as serving: from the base
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


def spread(samples: list[float]) -> tuple[float, float, float]:
    """Median, p99 and interquartile range."""
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return statistics.median(ordered), p99, quartiles[2] - quartiles[0]


def worker_rss_mib(ctx: Context) -> float:
    """Resident memory of the daemon's current serving worker (its pid is in the daemon's log)."""
    pids = re.findall(r"serving worker started \(pid (\d+)\)", (ctx.home / "bench-daemon.log").read_text())
    with open(f"/proc/{pids[-1]}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def copy_model(ctx: Context, model_id, step_offset: int = 0) -> dict:
    """The bench model's best checkpoint stored again under `model_id` (and `step_offset` later): an adapter
    of the same base, as ten fine-tunes of one base would be."""
    document = ctx.db[defaults.MODELS].find_one({"_id": MODEL_ID})
    best = checkpoints.select(document, "best")
    folder = checkpoints.download(ctx.db, best["files_id"], ctx.home / f"copy-{model_id}-{step_offset}")
    entry = checkpoints.upload(ctx.db, folder, model_id=model_id, run=best["run"], step=best["step"] + step_offset)
    return {**document, "_id": model_id, "checkpoints": [entry],
            "best_checkpoint": {"run": entry["run"], "step": entry["step"]}}


def batching(ctx: Context) -> Row:
    prompts = held_out_prompts(ctx.db, MANY)
    with step(ctx.console, f"{MANY} requests inserted at once") as together:
        answered = ask(ctx.db, prompts)
    with step(ctx.console, f"{MANY} requests one at a time") as alone:
        for prompt in prompts:
            ask(ctx.db, [prompt])
    return Row(f"serving: {MANY} requests at once vs one at a time", "req/s", MANY / together.seconds,
               MANY / alone.seconds, f"same daemon; batches of {batch_sizes(answered)}; target ratio >= 3")


def lone_latency(ctx: Context, model, tokenizer, prompt) -> Row:
    """Where a lone request's time goes, from what the daemon wrote: claim to generate (`queued_s`), the worker's
    generate command (`generation_s`), and the rest (insert, change streams both ways, claim, answer's write)."""
    ours, direct, queued, generating = [], [], [], []
    with step(ctx.console, f"a lone request vs a direct generate, {REPEATS} times each, interleaved"):
        for _ in range(REPEATS):
            started = time.perf_counter()
            [answered] = ask(ctx.db, [prompt])
            ours.append((time.perf_counter() - started) * 1000)
            queued.append(answered["timing"]["queued_s"] * 1000)
            generating.append(answered["timing"]["generation_s"] * 1000)
            started = time.perf_counter()
            generate(model, tokenizer, [prompt])
            direct.append((time.perf_counter() - started) * 1000)
    (m_ours, p_ours, iqr_ours), (m_direct, p_direct, iqr_direct) = spread(ours), spread(direct)
    rest = statistics.median(o - q - g for o, q, g in zip(ours, queued, generating))
    met = "met" if m_ours <= 1.05 * m_direct + 20 else "missed"
    return Row("serving: lone request vs direct generate (median)", "ms", m_ours, m_direct,
               f"p99 {p_ours:.0f} vs {p_direct:.0f} ms, IQR {iqr_ours:.0f} vs {iqr_direct:.0f} ms; medians in the "
               f"daemon: claim to generate {statistics.median(queued):.0f} ms, worker's generate "
               f"{statistics.median(generating):.0f} ms, the rest {rest:.0f} ms; target median <= 1.05x + 20 ms: {met}")


def simultaneous(ctx: Context, model, tokenizer, prompts) -> Row:
    ours, direct = [], []
    with step(ctx.console, f"{len(prompts)} simultaneous requests vs one batched generate, 5 times each"):
        for _ in range(5):
            started = time.perf_counter()
            ask(ctx.db, prompts)
            ours.append(len(prompts) / (time.perf_counter() - started))
            started = time.perf_counter()
            generate(model, tokenizer, prompts)
            direct.append(len(prompts) / (time.perf_counter() - started))
    (m_ours, _, iqr_ours), (m_direct, _, iqr_direct) = spread(ours), spread(direct)
    return Row(f"serving: {len(prompts)} simultaneous vs one batched generate (median)", "req/s", m_ours, m_direct,
               f"IQR {iqr_ours:.2f} vs {iqr_direct:.2f} req/s; target ratio >= 0.9")


def adapters_memory(ctx: Context, prompt) -> Row:
    one = worker_rss_mib(ctx)  # the bench model's adapter (and its base) loaded, from the runs above
    with step(ctx.console, f"{ADAPTERS - 1} more adapters of the same base, one request each"):
        ctx.db[defaults.MODELS].insert_many([copy_model(ctx, f"bench-copy-{n}") for n in range(ADAPTERS - 1)])
        for n in range(ADAPTERS - 1):
            ask(ctx.db, [prompt], f"bench-copy-{n}")
    return Row(f"serving: worker RSS, {ADAPTERS} adapters of one base vs 1", "MiB", worker_rss_mib(ctx), one,
               "target ratio < 1.3")


def promotion(ctx: Context, prompt, lone_ms: float) -> Row:
    promoted = copy_model(ctx, MODEL_ID, step_offset=1000)
    models = ctx.db[defaults.MODELS]
    with step(ctx.console, "promotion to the first answer from it") as first:
        models.update_one({"_id": MODEL_ID}, {"$push": {"checkpoints": promoted["checkpoints"][0]},
                                              "$set": {"best_checkpoint": promoted["best_checkpoint"]}})
        answered = ask(ctx.db, [prompt])[0]
    assert answered["checkpoint_used"] == promoted["best_checkpoint"], answered["checkpoint_used"]
    return Row("serving: promotion to first answer vs a warm answer", "ms", first.seconds * 1000, lone_ms,
               "no preload (MONGOTUNE_PRELOAD_BEST off): the new adapter loads on the first request")


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
    lone = lone_latency(ctx, model, tokenizer, prompts[0])
    extra = [batching(ctx), lone, simultaneous(ctx, model, tokenizer, prompts), adapters_memory(ctx, prompts[0]),
             promotion(ctx, prompts[0], lone.mongotune)]
    return [
        Row(f"serving: {len(prompts)} chats vs a generate loop", "req/s", rate, len(prompts) / loop.seconds,
            f"daemon ran batches of {batch_sizes(answered)}; {same}/{len(prompts)} answers identical"),
        Row(f"serving: {len(prompts)} chats vs one batched generate", "req/s", rate, len(prompts) / batched.seconds,
            "both sides warmed up first: model loading excluded"),
        *extra,
    ]
