"""`listener.serving` through real daemons: nothing a document does wedges serving, fills the disk or jumps the queue.

Tests that need no setting of their own share the module's daemon and database (each its own model and
request ids); those that set a limit, stop the daemon or queue work before it starts start their own.
"""

import asyncio
import json
import shutil
import signal
import uuid
from pathlib import Path

from listener.processes import gone, wait_until
from tests.conftest import finished, wait_for
from training import checkpoints, defaults

CHAT = [{"role": "user", "content": "ahoy matey"}]
LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def served_model(doc_id, path: str, entries: tuple = ()) -> dict:
    """A model document that is already trained: the daemon serves it and never trains it."""
    return {"_id": doc_id, "model_name_or_path": path, "data": {"collection": "docs"}, "status": "succeeded",
            "checkpoints": list(entries)}


def copy_model(tiny_model_path: str, name: str) -> Path:
    """A copy of the tiny model beside it, under the test model root."""
    folder = Path(tiny_model_path).parent / f"{name}-{uuid.uuid4().hex[:8]}"
    shutil.copytree(tiny_model_path, folder)
    return folder


def looping_model(tiny_model_path: str) -> str:
    folder = copy_model(tiny_model_path, "looping")
    (folder / "chat_template.jinja").write_text(LOOP)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


def stored_checkpoint(db, tiny_model_path: str, model_id, step: int, generation: dict | None = None) -> dict:
    """The tiny model's weights stored as a full checkpoint, optionally with its own generation_config.json."""
    folder = copy_model(tiny_model_path, "checkpoint")
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    try:
        return checkpoints.upload(db, folder, model_id=model_id, run=1, step=step)
    finally:
        shutil.rmtree(folder)


def ask(db, doc_id, model, checkpoint="base", **params) -> None:
    db[defaults.REQUESTS].insert_one({"_id": doc_id, "model": model, "input": CHAT, "checkpoint": checkpoint,
                                      "params": {"max_new_tokens": 4, **params}})


def answer(db, doc_id, timeout: float = 120) -> dict:
    return wait_for(db[defaults.REQUESTS], doc_id, finished, timeout_s=timeout)


def test_a_looping_template_times_out_and_other_models_go_on(db, start_daemon, tiny_model_path):
    db[defaults.MODELS].insert_many([served_model("loops", looping_model(tiny_model_path)),
                                     served_model("plain", tiny_model_path)])
    daemon = start_daemon(env={"MONGOTUNE_REQUEST_TIMEOUT_S": "5"})
    ask(db, "stuck", "loops")
    ask(db, "fine", "plain")
    stuck, fine = answer(db, "stuck"), answer(db, "fine")
    assert stuck["status"] == "failed" and stuck["error"]["type"] == "request_timeout"
    assert "5 s (MONGOTUNE_REQUEST_TIMEOUT_S)" in stuck["error"]["message"]
    assert fine["status"] == "done" and isinstance(fine["output"], str)
    ask(db, "after", "plain")
    assert answer(db, "after")["status"] == "done"
    assert daemon.process.poll() is None


def test_sigterm_ends_the_daemon_mid_generation(db, start_daemon, tiny_model_path):
    db[defaults.MODELS].insert_one(served_model("loops", looping_model(tiny_model_path)))
    daemon = start_daemon(env={"MONGOTUNE_REQUEST_TIMEOUT_S": "600"})
    ask(db, "stuck", "loops")
    wait_until(lambda: "generating 1 answer(s)" in daemon.log(), 120, "the looping generation")
    worker_pid = int(daemon.log().split("serving worker started (pid ")[1].split(")")[0])
    # Exit code 0 within the grace: a daemon that waited for the 600 s generation would be SIGKILLed (-9).
    assert daemon.stop(signal.SIGTERM, timeout=30) == 0
    assert gone(worker_pid), "the serving worker outlived its daemon"
    assert db[defaults.REQUESTS].find_one({"_id": "stuck"})["status"] == "pending"  # handed back, not lost


def test_a_checkpoints_generation_settings_never_apply(module_db, module_daemon, tiny_model_path):
    db = module_db
    clean = stored_checkpoint(db, tiny_model_path, "generation", step=1)
    hostile = stored_checkpoint(db, tiny_model_path, "generation", step=2,
                                generation={"num_beams": 96, "num_return_sequences": 4, "do_sample": True,
                                            "temperature": 3.0, "min_new_tokens": 50})
    db[defaults.MODELS].insert_one(served_model("generation", tiny_model_path, (clean, hostile)))
    ask(db, "generation-clean", "generation", {"run": 1, "step": 1}, max_new_tokens=8)
    ask(db, "generation-hostile", "generation", {"run": 1, "step": 2}, max_new_tokens=8)
    clean_answer, hostile_answer = answer(db, "generation-clean"), answer(db, "generation-hostile")
    assert clean_answer["status"] == hostile_answer["status"] == "done"
    assert hostile_answer["checkpoint_used"] == {"run": 1, "step": 2}
    assert isinstance(hostile_answer["output"], str)
    assert hostile_answer["output"] == clean_answer["output"]
    assert hostile_answer["usage"] == clean_answer["usage"]


def test_a_flood_for_one_model_does_not_delay_another(db, start_daemon, tiny_model_path):
    db[defaults.MODELS].insert_many([served_model("a", tiny_model_path), served_model("b", tiny_model_path)])
    db[defaults.REQUESTS].insert_many([
        {"_id": f"a{i}", "model": "a", "input": f"ahoy {i}", "checkpoint": "base",
         "params": {"max_new_tokens": 2, "do_sample": True, "temperature": 0.5 + i / 1000}} for i in range(200)])
    ask(db, "b", "b", max_new_tokens=2)
    start_daemon()
    b = answer(db, "b", timeout=300)
    flood = [answer(db, f"a{i}", timeout=300) for i in range(200)]
    assert b["status"] == "done" and all(a["status"] == "done" for a in flood)
    assert sum(a["completed_at"] < b["completed_at"] for a in flood) < 100


def test_the_memory_cap_fails_requests_cleanly(db, start_daemon, tiny_model_path):
    db[defaults.MODELS].insert_one(served_model("llm", tiny_model_path))
    daemon = start_daemon(env={"MONGOTUNE_SERVING_MEMORY_BYTES": str(64 * 2**20)})
    for doc_id in ("first", "second"):
        ask(db, doc_id, "llm")
        failed = answer(db, doc_id)
        assert failed["status"] == "failed" and failed["error"]["type"] == "memory_limit"
        assert "64 MiB" in failed["error"]["message"]
        assert "MONGOTUNE_SERVING_MEMORY_BYTES" in failed["error"]["message"]
    assert daemon.process.poll() is None


def test_unpacked_checkpoints_stay_within_the_disk_budget(db, start_daemon, tiny_model_path):
    entries = [stored_checkpoint(db, tiny_model_path, "llm", step=step) for step in (1, 2, 3)]
    budget = max(2**20, int(entries[0]["size"] * 2.5))  # room for two unpacked checkpoints, not three
    db[defaults.MODELS].insert_one(served_model("llm", tiny_model_path, entries))
    daemon = start_daemon(env={"MONGOTUNE_SERVING_DISK_BYTES": str(budget)})
    for n, step in enumerate((1, 2, 1, 3)):  # using step 1 again makes step 2 the least recently used
        ask(db, f"r{n}", "llm", {"run": 1, "step": step})
        assert answer(db, f"r{n}")["status"] == "done"
    unpacked = {p.name for p in (daemon.home / "serving").iterdir() if not p.name.startswith(".")}
    assert unpacked == {str(entries[0]["files_id"]), str(entries[2]["files_id"])}


def test_models_of_one_base_are_answered_in_one_mixed_batch(module_db, module_daemon, tiny_model_path, tmp_path):
    from tests.test_inference import adapter_entries

    db = module_db
    names = ("mixed-x", "mixed-y")
    entries = adapter_entries(db, tmp_path, tiny_model_path, list(names))
    db[defaults.MODELS].insert_many([served_model(name, tiny_model_path, (entry,))
                                     for name, entry in zip(names, entries)])
    alone = {}
    for name in names:  # one at a time first: each answered alone, and the daemon learns their base
        ask(db, f"{name}-alone", name, "best", max_new_tokens=6)
        alone[name] = answer(db, f"{name}-alone")
        assert alone[name]["status"] == "done" and alone[name]["batch_size"] == 1
    ask(db, "mixed-busy", "mixed-x", "best", max_new_tokens=256)  # generates alone while both below are queued
    wait_until(lambda: db[defaults.REQUESTS].find_one({"_id": "mixed-busy", "status": "running"}), 60,
               "the busy request")
    db[defaults.REQUESTS].insert_many([{"_id": f"{name}-mixed", "model": name, "input": CHAT, "checkpoint": "best",
                                        "params": {"max_new_tokens": 6}} for name in names])
    for name in names:
        mixed = answer(db, f"{name}-mixed")
        assert mixed["batch_size"] == 2 and mixed["checkpoint_used"] == {"run": 1, "step": 1}
        assert mixed["output"] == alone[name]["output"]


def test_a_batch_waits_for_claims_in_progress_and_no_longer():
    from listener.batching import Arrivals

    async def body() -> None:
        arrivals = Arrivals()
        with arrivals:  # an event being handled: its request and those received with it are still being claimed
            waiting = asyncio.create_task(arrivals.settled(window_s=60))
            await asyncio.sleep(0.2)
            assert not waiting.done()
        await asyncio.wait_for(waiting, 30)  # far sooner than the window, once the claims are done
        with arrivals:  # a claim that never ends is waited for only as long as the window
            await asyncio.wait_for(arrivals.settled(window_s=0.1), 30)

    asyncio.run(body())


def test_a_lone_request_is_not_held_for_the_batching_window(db, start_daemon, tiny_model_path):
    db[defaults.MODELS].insert_one(served_model("m", tiny_model_path))
    start_daemon(env={"MONGOTUNE_BATCH_WINDOW_S": "10"})
    for n in range(2):  # the first loads the model; both start long before the 10 s window ends
        ask(db, f"lone-{n}", "m")
        done = answer(db, f"lone-{n}")
        assert done["status"] == "done" and done["batch_size"] == 1
    assert done["timing"]["queued_s"] < 5, done["timing"]
