"""The benchmark suite: `python -m gapkernels.bench` (see docs/BENCHMARKS.md)."""
