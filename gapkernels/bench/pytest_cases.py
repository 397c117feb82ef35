"""The benchmark cases under pytest-benchmark: one test per case and implementation.

    python -m pytest gapkernels/bench/pytest_cases.py  # the --quick cases on the CPU
    GAPKERNELS_BENCH_MODE=full python -m pytest gapkernels/bench/pytest_cases.py \
        --benchmark-json out.json

GAPKERNELS_BENCH_DEVICE=cuda runs them on a GPU, timed by pytest-benchmark's host clock with a
synchronize after each call, which adds the launch latency; `python -m gapkernels.bench` (CUDA
events, probes, peer ratios) is the measure of record. Speed is reported, never asserted.
"""

from __future__ import annotations

import os

import pytest
import torch

from gapkernels.bench import cases as bench_cases
from gapkernels.bench import harness

DEVICE = os.environ.get("GAPKERNELS_BENCH_DEVICE", "cpu")
MODE = os.environ.get("GAPKERNELS_BENCH_MODE", "quick")
CASES = bench_cases.make_cases(DEVICE, MODE)
IMPLEMENTATIONS = [*harness.benchmark_backends(DEVICE), *bench_cases.PEERS]
WARMUP_CALLS = 3


@pytest.fixture(scope="module", autouse=True)
def all_cores():
    previous = torch.get_num_threads()
    harness.use_all_cores()
    yield
    torch.set_num_threads(previous)


def _op(case: bench_cases.Case, implementation: str):
    if implementation == "eager":
        return bench_cases.EAGER_OPS[case.op]
    if implementation == "compile":
        return bench_cases.compiled_op(case.op)
    if implementation == "timm":
        return bench_cases.timm_op(case.op, DEVICE)
    return bench_cases.gapkernels_op(case.op, implementation)


def _synchronized(fn):
    def call():
        fn()
        torch.cuda.synchronize()

    return call


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_bench(benchmark, case, implementation):
    op = _op(case, implementation)
    if op is None:
        pytest.skip(
            f"timm has no {case.op} pool"
            if bench_cases.timm_available()
            else "timm is not installed"
        )
    inputs = bench_cases.make_inputs(case, DEVICE, harness.buffer_count(case, DEVICE))
    fn = harness.rotating([bench_cases.step(op, i, case.pass_) for i in inputs])
    if DEVICE == "cuda":
        fn = _synchronized(fn)
    for _ in range(WARMUP_CALLS):
        fn()
    benchmark.group = case.label
    benchmark(fn)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        bytes_moved=case.bytes_moved(),
        gbps=case.bytes_moved() / median / 1e9,
        shape=list(case.shape),
        threads=torch.get_num_threads(),
    )
