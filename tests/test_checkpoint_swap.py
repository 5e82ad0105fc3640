"""A checkpoint swap under load: requests in flight while `best` moves are all answered, none dropped or failed."""

import threading

from listener.processes import wait_until
from tests.documents import request
from tests.test_serving import answer, served_model, stored_checkpoint
from training import defaults

STEPS = (1, 2, 3)
PER_STEP = 6


def test_requests_in_flight_survive_every_promotion(db, start_daemon, tiny_model_path):
    entries = [stored_checkpoint(db, tiny_model_path, "llm", step=step) for step in STEPS]
    models = db[defaults.MODELS]
    models.insert_one({**served_model("llm", tiny_model_path, entries[:1]), "best_checkpoint": {"run": 1, "step": 1}})
    daemon = start_daemon(env={"MONGOTUNE_PRELOAD_BEST": "1"})
    wait_until(lambda: "for promoted checkpoints to preload" in daemon.log(), 60, "the preload stream")

    asked: list[str] = []
    stop = threading.Event()

    def keep_asking() -> None:  # a steady stream of streamed and plain requests for `best`, a few in flight
        while not stop.is_set() and len(asked) < 200:
            if db[defaults.REQUESTS].count_documents({"status": {"$nin": ["done", "failed", "cancelled"]}}) >= 4:
                stop.wait(0.05)
                continue
            doc_id = f"r{len(asked)}"
            db[defaults.REQUESTS].insert_one({**request(doc_id, "llm", max_new_tokens=12), "checkpoint": "best",
                                              "stream": len(asked) % 2 == 1})
            asked.append(doc_id)
            stop.wait(0.05)

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        for count, entry in enumerate(entries[1:], 2):
            wait_until(lambda: len(asked) >= PER_STEP * (count - 1), 120, "requests before the swap")
            models.update_one({"_id": "llm"}, {"$set": {"checkpoints": entries[:count],
                                                        "best_checkpoint": {"run": 1, "step": entry["step"]}}})
            served = {"status": "done", "checkpoint_used.step": entry["step"]}
            wait_until(lambda: db[defaults.REQUESTS].find_one(served), 120, f"an answer from step {entry['step']}")
        wait_until(lambda: len(asked) >= PER_STEP * len(STEPS), 120, "requests after the last swap")
    finally:
        stop.set()
        asker.join()

    done = [answer(db, doc_id, timeout=300) for doc_id in asked]
    failed = [(d["_id"], d.get("error")) for d in done if d["status"] != "done"]
    assert not failed, failed
    used = [d["checkpoint_used"]["step"] for d in done]
    assert set(used) == set(STEPS), f"every checkpoint served in turn: {used}"
    assert used == sorted(used), f"a request never goes back to an older checkpoint than one before it: {used}"
