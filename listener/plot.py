"""A loss plot from a model document's `metrics`: training and eval loss against step, one colour per run.

matplotlib is imported only here and only when a plot is drawn, with the Agg backend, so no display
is needed and no other command pays for the import.
"""

from pathlib import Path


class NoMetrics(LookupError):
    """The model has written no loss yet."""


def series(metrics) -> dict[int, dict[str, list[tuple[int, float]]]]:
    """{run: {"loss": [(step, value)], "eval_loss": [...]}} from the entries training/progress.py writes."""
    runs: dict[int, dict[str, list[tuple[int, float]]]] = {}
    for entry in metrics if isinstance(metrics, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
            continue
        for name in ("loss", "eval_loss"):
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

    figure = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, layout="constrained")
    axes = figure.add_subplot()
    colours = matplotlib.colormaps["tab10"]
    for index, (run, lines) in enumerate(sorted(runs.items(), key=lambda item: str(item[0]))):
        for name, style, label in (("loss", "-", "training loss"), ("eval_loss", "--", "eval loss")):
            points = sorted(lines.get(name, []))
            if points:
                steps, values = zip(*points)
                axes.plot(steps, values, style, marker="o" if len(points) < 30 else None, markersize=3,
                          color=colours(index % 10), label=f"run {run}: {label}")
    axes.set_title(f"model {document['_id']!r}")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.savefig(path, format="png")
    return Path(path)
