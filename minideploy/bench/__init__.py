"""Benchmarks: each `python -m minideploy.bench.NAME` writes figures/NAME.json and a plot."""
