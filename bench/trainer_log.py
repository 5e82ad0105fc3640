"""What both sides of the training benchmark read from a trainer's log; a leaf, so the plain script imports nothing
of mongotune's but this."""


def summary(log_history: list[dict]) -> dict:
    """The last training loss, the eval loss and times, and the trained tokens."""
    def last(name: str) -> float:
        return [entry[name] for entry in log_history if name in entry][-1]

    return {"loss": last("loss"), "eval_loss": last("eval_loss"), "eval_runtime": last("eval_runtime"),
            "train_runtime": last("train_runtime"), "tokens": max(entry.get("num_tokens", 0) for entry in log_history)}
