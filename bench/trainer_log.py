"""What both sides of the training and DPO benchmarks read from a trainer's log; a leaf, so the plain scripts
import nothing of mongotune's but this."""


def last(log_history: list[dict], name: str) -> float:
    """The value the trainer logged last under `name`."""
    return [entry[name] for entry in log_history if name in entry][-1]


def summary(log_history: list[dict]) -> dict:
    """The last training loss, the eval loss and times, and the trained tokens."""
    return {name: last(log_history, name) for name in ("loss", "eval_loss", "eval_runtime", "train_runtime")} | {
        "tokens": max(entry.get("num_tokens", 0) for entry in log_history)}


def rewards(log_history: list[dict]) -> dict:
    """A preference trainer's runtime, its steps, and the rewards it logged last."""
    return {"train_runtime": last(log_history, "train_runtime"), "steps": max(e.get("step", 0) for e in log_history),
            "accuracy": last(log_history, "rewards/accuracies"), "margin": last(log_history, "rewards/margins")}
