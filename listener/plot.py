"""A loss plot from a model document's `metrics`: training and eval loss against step, one colour per run, and
beneath it, for preference runs (dpo, kto, feedback runs), their rewards: chosen, rejected, margin and accuracy.

matplotlib is imported only here and only when a plot is drawn, with the Agg backend, so no display
is needed and no other command pays for the import.
"""

from pathlib import Path


class NoMetrics(LookupError):
    """The model has written no loss yet."""


LOSSES = (("loss", "-", "training loss"), ("eval_loss", "--", "eval loss"))
REWARDS = (("rewards/chosen", "-", "chosen"), ("rewards/rejected", "--", "rejected"),
           ("rewards/margins", ":", "margin"), ("rewards/accuracies", "-.", "accuracy"))


def series(metrics, names=tuple(name for name, _, _ in LOSSES)) -> dict[int, dict[str, list[tuple[int, float]]]]:
    """{run: {"loss": [(step, value)], "eval_loss": [...]}} (or the other `names`) from the entries
    training/progress.py writes."""
    runs: dict[int, dict[str, list[tuple[int, float]]]] = {}
    for entry in metrics if isinstance(metrics, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
            continue
        for name in names:
            value = entry.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                runs.setdefault(entry.get("run", 1), {}).setdefault(name, []).append((entry["step"], float(value)))
    return runs


def draw(document: dict, path: Path, width_px: int = 1000, height_px: int = 600, dpi: int = 100) -> Path:
    """Write the plot of `document`'s losses to `path` (PNG, exactly width_px x height_px)."""
    runs = series(document.get("metrics"))
    if not runs:
        raise NoMetrics(f"model {document['_id']!r} has no loss in its metrics yet (status: "
                        f"{document.get('status', 'pending')}); plot it once training has logged a step")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rewards = series(document.get("metrics"), [name for name, _, _ in REWARDS])
    figure = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, layout="constrained")
    panels = figure.subplots(2 if rewards else 1, 1, sharex=True, squeeze=False)[:, 0]
    order = sorted(set(runs) | set(rewards), key=str)  # a run's colour is the same in both panels
    _lines(panels[0], runs, LOSSES, "loss", order)
    panels[0].set_title(f"model {document['_id']!r}")
    if rewards:
        _lines(panels[1], rewards, REWARDS, "reward", order)
    panels[-1].set_xlabel("step")
    figure.savefig(path, format="png")
    return Path(path)


def _lines(axes, runs: dict, styles: tuple, ylabel: str, order: list) -> None:
    """One line per run and metric of `styles`, one colour per run (its place in `order`)."""
    import matplotlib

    colours = matplotlib.colormaps["tab10"]
    for run, lines in sorted(runs.items(), key=lambda item: str(item[0])):
        index = order.index(run)
        for name, style, label in styles:
            points = sorted(lines.get(name, []))
            if points:
                steps, values = zip(*points)
                axes.plot(steps, values, style, marker="o" if len(points) < 30 else None, markersize=3,
                          color=colours(index % 10), label=f"run {run}: {label}")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    axes.legend()
