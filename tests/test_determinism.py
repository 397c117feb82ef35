"""Bitwise the same output and gradients every run, whatever the thread count, and under
torch.use_deterministic_algorithms(True)."""

from __future__ import annotations

import pytest
import torch

from helpers import (
    DEVICE_BACKENDS,
    OP_CASES,
    assert_bitwise_equal,
    channels_of,
    make_input,
    make_weight,
    run_op,
)


def _forward_backward(op, x, w, fmt, backend, grad_seed):
    x = x.detach().requires_grad_(True)
    w = None if w is None else w.detach().requires_grad_(True)
    out = run_op(op, x, w, backend, input_fmt=fmt)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out)
    grads = torch.autograd.grad(out, [x] if w is None else [x, w], g)
    return [out, *grads]


# Shapes where the kernels split S (large rows, few of them) and where they do not.
SHAPES = [(1, 2, 256, 257), (6, 40, 7, 7)]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=["split", "rows"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op,wkind", OP_CASES)
def test_bitwise_across_runs_and_threads(device, backend, shape, layout, dtype, op, wkind, gen):
    x, fmt = make_input(shape, dtype, layout, device, gen, positive=op == "gem")
    w = make_weight(op, wkind, channels_of(x, fmt), device, gen=gen)
    threads = torch.get_num_threads()
    try:
        first = _forward_backward(op, x, w, fmt, backend, 1)
        torch.set_num_threads(1)
        single = _forward_backward(op, x, w, fmt, backend, 1)
        torch.set_num_threads(max(threads, 2))
        again = _forward_backward(op, x, w, fmt, backend, 1)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, single, again, strict=True):
        assert_bitwise_equal(a, b)
        assert_bitwise_equal(a, c)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize(
    "op,wkind",
    [
        ("max", "none"),
        ("mixed", "channel"),
        ("catavgmax", "none"),
        ("gem", "channel"),
        ("gem", "scalar"),  # a 0-d weight gradient (issue 11: the GPU run found the helper
        ("avg", "none"),  # comparing those failing)
    ],
)
def test_use_deterministic_algorithms(device, backend, op, wkind, gen):
    x, fmt = make_input((3, 8, 5, 5), torch.float32, "channels_last", device, gen)
    w = make_weight(op, wkind, 8, device, gen=gen)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        results = _forward_backward(op, x, w, fmt, backend, 2)
    finally:
        torch.use_deterministic_algorithms(before)
    for a, b in zip(results, _forward_backward(op, x, w, fmt, backend, 2), strict=True):
        assert_bitwise_equal(a, b)
