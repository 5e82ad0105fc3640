"""Sampling: what the job's default length-grouped order costs in eval loss, over several seeds.

`train_sampling_strategy: group_by_length` (`training.padding.sampling`) trains the examples in
another order than a plain script's random one, so one seed compares one order with another: the
eval loss of the bench's 30-step run moves by about 5% between seeds either way. This trains the
plain script in both orders with each of `SEEDS` seeds and compares the means, the evidence behind
the default. Not part of `make bench` (12 runs, about 10 minutes on 2 CPUs):
`python -m bench --only sampling`.
"""

import statistics

from bench import training
from bench.common import Context, Row

SEEDS = 6
ORDERS = ("group_by_length", "random")  # the job's default against the script's


def run(ctx: Context) -> list[Row]:
    results = {order: [] for order in ORDERS}
    for seed in range(training.SEED, training.SEED + SEEDS):
        for order in ORDERS:
            results[order].append(training.via_script(ctx, ctx.home / f"sampling-{seed}-{order}", seed,
                                                      {"train_sampling_strategy": order}))
    (grouped, plain) = (results[order] for order in ORDERS)
    paired = [g["eval_loss"] / p["eval_loss"] for g, p in zip(grouped, plain)]
    error = statistics.stdev(paired) / len(paired) ** 0.5
    steps = training.JOB["trainer"]["max_steps"]
    return [
        Row(f"sampling: eval loss, mean of {SEEDS} seeds (grouped | random)", "loss",
            statistics.mean(r["eval_loss"] for r in grouped), statistics.mean(r["eval_loss"] for r in plain),
            f"paired ratio {statistics.mean(paired):.3f} ± {error:.3f} (standard error), "
            f"{min(paired):.3f}–{max(paired):.3f}"),
        Row("sampling: seconds per step (grouped | random)", "s",
            statistics.mean(training.steps_s(r) / steps for r in grouped),
            statistics.mean(training.steps_s(r) / steps for r in plain), "both through the plain script"),
    ]
