"""A person's first hour from the CLI, against a real daemon: a short run, its checkpoints, an answer, a retrain."""

from listener.demo import load_samples
from listener.processes import registered
from tests.conftest import wait_for
from tests.test_cli_lifecycle import definition, on, tiny_yaml
from training import defaults

WIDE = {"COLUMNS": "200"}  # the checkpoints table in full


def losses(document: dict, run: int) -> dict[int, float]:
    """The training loss logged at each step of `run`."""
    return {m["step"]: m["loss"] for m in document["metrics"] if m["run"] == run and "loss" in m}


def own_losses(document: dict, run: int) -> list[tuple]:
    return [(c["step"], c["metrics"].get("loss")) for c in document["checkpoints"] if c["run"] == run]


def test_a_short_run_logs_every_step_and_a_retrain_continues_from_the_checkpoint_serving_best(
        server_uri, db, start_daemon, tiny_model_path, tmp_path):
    load_samples(db)
    registered(db, start_daemon().process)
    models = db[defaults.MODELS]
    trainer = "{max_steps: 10, per_device_train_batch_size: 2, max_seq_length: 64, save_steps: 4}"
    submitted = on(server_uri, db, "submit", definition(tmp_path, tiny_yaml("short", tiny_model_path, trainer)))
    assert submitted.exit_code == 0, submitted.output
    first = models.find_one({"_id": "short"})
    logged = losses(first, 1)
    assert sorted(logged) == list(range(1, 11)), "no logging_steps given: a 10-step run logs every step"
    assert first["runs"][0]["arguments"]["defaults"]["logging_steps"] == 0.025
    assert own_losses(first, 1) == [(step, logged[step]) for step in (4, 8, 10)]
    table = on(server_uri, db, "checkpoints", "short", env=WIDE)
    rows = [line.split() for line in table.output.splitlines() if line.strip("│ ").startswith("1 ")]
    assert [(row[3], row[5]) for row in rows] == [(str(step), f"{logged[step]:.4g}") for step in (4, 8, 10)], (
        table.output)

    answers = {}
    for form in ("--chat", "--text"):  # the tiny base model ends a chat turn at once, and runs on after raw text
        answers[form] = on(server_uri, db, "predict", "short", "ahoy", form, "--max-new-tokens", "2",
                           "--checkpoint", "base")
        assert answers[form].exit_code == 0, answers[form].output
    assert [r["finish_reason"] for r in db[defaults.REQUESTS].find().sort("completed_at")] == ["stop", "length"]
    assert "cut at the token limit" not in answers["--chat"].output
    assert "(cut at the token limit, 2 tokens: ask again with a larger --max-new-tokens" in answers["--text"].output

    models.update_one({"_id": "short"}, {"$set": {"trainer.logging_steps": 3}})
    best = first["best_checkpoint"]
    retrained = on(server_uri, db, "retrain", "short")
    assert f"run 2 starts from run 1's best checkpoint (step {best['step']})" in retrained.output, retrained.output
    second = wait_for(models, "short", lambda d: d.get("status") == "succeeded" and d.get("run") == 2, 300)
    assert second["runs"][1]["init_from"] == {"model": "short", "run": 1, "step": best["step"]}
    logged = losses(second, 2)
    assert sorted(logged) == [1, 3, 4, 6, 8, 9, 10], "every third step, and each step that saves"
    assert own_losses(second, 2) == [(step, logged[step]) for step in (4, 8, 10)]
    assert second["runs"][1]["promotion"]["reason"].startswith("eval_loss "), second["runs"][1]["promotion"]
