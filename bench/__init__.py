"""Benchmarks: every figure is mongotune against what a user would otherwise run, in the same run.

`python -m bench` (or `make bench`) starts its own embedded server and daemon, measures training,
serving and checkpoint storage both ways, prints the ratios and writes `bench/results/latest.json`.
Timings live here, never in the test suite.
"""
