"""Benchmarks and baselines, through the public API only."""
