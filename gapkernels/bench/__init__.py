"""The benchmark suite: `python -m gapkernels.bench` (see bench/README.md)."""
