"""No cold start: a promoted checkpoint is loaded before anyone asks, and a model in training answers from its best."""

from listener.leases import lease
from listener.processes import wait_until
from tests.test_serving import answer, ask, served_model, stored_checkpoint
from training import defaults


def test_a_promoted_checkpoint_is_loaded_before_the_first_request(db, start_daemon, tiny_model_path):
    db[defaults.MODELS].insert_one(served_model("llm", tiny_model_path))
    daemon = start_daemon(env={"MONGOTUNE_PRELOAD_BEST": "1"})
    wait_until(lambda: "for promoted checkpoints to preload" in daemon.log(), 60, "the preload stream")
    entry = stored_checkpoint(db, tiny_model_path, "llm", step=1)
    db[defaults.MODELS].update_one({"_id": "llm"}, {"$set": {"checkpoints": [entry],
                                                             "best_checkpoint": {"run": 1, "step": 1}}})
    wait_until(lambda: 'preloaded model "llm", checkpoint run 1 step 1' in daemon.log(), 120, "the preload")
    ask(db, "first", "llm", "best")
    done = answer(db, "first")
    assert done["status"] == "done" and done["checkpoint_used"] == {"run": 1, "step": 1}
    assert daemon.log().count(f"with checkpoint {entry['files_id']}") == 1  # loaded once, by the preload


def test_a_model_in_training_answers_from_its_best_checkpoint_so_far(db, start_daemon, tiny_model_path):
    entries = [stored_checkpoint(db, tiny_model_path, "llm", step=step) for step in (1, 2)]
    training = {**served_model("llm", tiny_model_path, entries), "status": "running", "run": 1,
                "best_checkpoint": {"run": 1, "step": 1}, "lease": lease("another-daemon", 3600)}
    db[defaults.MODELS].insert_one(training)
    start_daemon()
    ask(db, "meanwhile", "llm", "best")
    done = answer(db, "meanwhile")
    assert done["status"] == "done" and done["checkpoint_used"] == {"run": 1, "step": 1}
    assert db[defaults.MODELS].find_one({"_id": "llm"})["status"] == "running"
