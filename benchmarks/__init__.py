"""Benchmark scripts (run as ``python benchmarks/NAME.py``) and what they share (:mod:`benchmarks.machine`)."""
