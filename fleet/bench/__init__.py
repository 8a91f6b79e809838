"""Benchmarks of the fleet against the bare pipeline, measured in one run."""
