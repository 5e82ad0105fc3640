"""`listener plot`: a PNG of training and eval loss per run, from the metrics training/progress.py writes."""

import numpy as np
from click.testing import CliRunner
from matplotlib import image

from listener.cli.main import cli
from listener.plot import series
from training import defaults

RUN_COLOURS = {1: (0x1F, 0x77, 0xB4), 2: (0xFF, 0x7F, 0x0E)}  # the first two of matplotlib's tab10


def metrics_of_two_runs() -> list[dict]:
    entries = []
    for run in (1, 2):
        for step in range(1, 9):
            entries.append({"run": run, "step": step, "epoch": step / 8, "loss": 3.0 / (step + run),
                            "learning_rate": 1e-3, "grad_norm": 1.0})
            if step % 4 == 0:
                entries.append({"run": run, "step": step, "epoch": step / 8, "eval_loss": 3.5 / (step + run),
                                "eval_runtime": 0.1})
    return entries


def plot(server_uri, db, *args):
    return CliRunner().invoke(cli, ["plot", "--uri", server_uri, "--db", db.name, *args])


def test_two_runs_make_a_png_of_the_asked_size_with_a_line_per_run(server_uri, db, tmp_path):
    db[defaults.MODELS].insert_one({"_id": "pirate", "status": "succeeded", "metrics": metrics_of_two_runs()})
    target = tmp_path / "loss.png"
    result = plot(server_uri, db, "pirate", "-o", str(target), "--width", "900", "--height", "500")
    assert result.exit_code == 0, result.output
    pixels = image.imread(target)
    assert pixels.shape[:2] == (500, 900)
    rgb = np.round(pixels[..., :3] * 255).astype(int)
    for run, colour in RUN_COLOURS.items():
        assert (np.abs(rgb - colour).sum(axis=-1) < 30).sum() > 200, f"no line in run {run}'s colour"


def test_series_reads_train_and_eval_loss_by_run_and_skips_what_it_cannot():
    lines = series([*metrics_of_two_runs(), {"run": 1, "step": "9", "loss": 1.0}, "junk", {"run": 3, "step": 1}])
    assert sorted(lines) == [1, 2]
    assert [len(lines[1]["loss"]), len(lines[1]["eval_loss"])] == [8, 2]
    assert lines[2]["eval_loss"][0] == (4, 3.5 / 6)


def test_a_model_without_metrics_is_one_line(server_uri, db, tmp_path):
    db[defaults.MODELS].insert_one({"_id": "fresh", "status": "pending"})
    target = tmp_path / "loss.png"
    for model, message in (("fresh", "model 'fresh' has no loss in its metrics yet (status: pending)"),
                           ("nobody", "no model with _id 'nobody' in")):
        result = plot(server_uri, db, model, "-o", str(target))
        assert result.exit_code == 1 and message in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not target.exists()


def test_a_preference_run_gets_a_panel_of_its_rewards_beneath_the_loss(server_uri, db, tmp_path):
    rewards = [{"run": 2, "step": step, "loss": 0.7 - step / 20, "rewards/chosen": step / 10,
                "rewards/rejected": -step / 10, "rewards/margins": step / 5, "rewards/accuracies": min(1.0, step / 4)}
               for step in range(1, 9)]
    assert sorted(series(rewards, ["rewards/margins"])[2]["rewards/margins"])[-1] == (8, 1.6)
    db[defaults.MODELS].insert_one({"_id": "kto", "status": "succeeded", "metrics": metrics_of_two_runs()[:20] + rewards})
    target = tmp_path / "rewards.png"
    assert plot(server_uri, db, "kto", "-o", str(target)).exit_code == 0
    rgb = np.round(image.imread(target)[..., :3] * 255).astype(int)
    lower = rgb[rgb.shape[0] // 2:]  # the rewards panel: run 2's colour there, where the loss panel is not
    assert (np.abs(lower - RUN_COLOURS[2]).sum(axis=-1) < 30).sum() > 200
