"""Benchmarks of capmoe-compile (scripts, not timed tests): ``python -m benchmarks.moe_layer``."""
