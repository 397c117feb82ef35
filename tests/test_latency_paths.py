"""The eager fast paths (docs/LATENCY.md): `_C.pool`, the ops' C++ autograd and the cached
backend choice give the same values, gradients and errors as the routes they short-cut. Without
the accelerator (gapkernels._C) the same public calls take the Python route, and the tests of
values, gradients, strides and modes hold there too (tests/test_accel.py runs them so); those of
`_C.pool` itself skip."""

from __future__ import annotations

import pytest
import torch
from torch import autograd
from torch.overrides import TorchFunctionMode

import gapkernels
from gapkernels import autograd as gk_autograd
from gapkernels import backends, reference
from gapkernels.ops import MODE_AVG
from helpers import OP_CASES, assert_close, make_input, make_weight, run_op

pytestmark = pytest.mark.skipif(
    not gapkernels._ext.has_kernel("CPU"), reason="the fast paths are the C++ extension's"
)
needs_accel = pytest.mark.skipif(
    not gapkernels._ext.accel_loaded(),
    reason=f"_C.pool is the accelerator's, not loaded: {gapkernels._ext.accel_reason}",
)

SHAPES = [(2, 3, 4, 5), (1, 5, 7), (2, 3, 2, 3, 2)]


def _grads(out, x, w, g, create_graph=False):
    params = [x] if w is None else [x, w]
    return autograd.grad(out, params, g, create_graph=create_graph)


@pytest.mark.parametrize("op,wkind", OP_CASES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_entry_values_and_gradients(op, wkind, layout, shape, gen):
    """Values and first-order gradients (the C++ backward, and Python for weights) match the
    reference for every layout and rank, through the view the entry takes in C++."""
    x, fmt = make_input(shape, torch.float64, layout, gen=gen, positive=op == "gem")
    x.requires_grad_(True)
    c = x.shape[1] if fmt == "NCHW" else x.shape[-1]
    w = make_weight(op, wkind, c, "cpu", gen=gen)
    w = None if w is None else w.detach().double().requires_grad_(True)
    got = run_op(op, x, w, "cpu", input_fmt=fmt)
    want = run_op(op, x, w, "reference", input_fmt=fmt)
    assert_close(got, want, torch.float64)
    g = torch.randn(got.shape, dtype=got.dtype, generator=gen)
    for a, b in zip(_grads(got, x, w, g), _grads(want, x, w, g), strict=True):
        assert a.shape == b.shape
        assert_close(a, b, torch.float64)


@pytest.mark.parametrize("op,wkind", OP_CASES)
@pytest.mark.parametrize("layout", ["contiguous", "nhwc"])
def test_entry_double_backward(op, wkind, layout, gen):
    """create_graph=True: the C++ backward hands over to the differentiable Python formulas, and
    its reshape back to x's layout is differentiable too."""
    x, fmt = make_input((2, 3, 3, 4), torch.float64, layout, gen=gen, positive=op == "gem")
    x.requires_grad_(True)
    w = make_weight(op, wkind, 3, "cpu", gen=gen)
    w = None if w is None else w.detach().double().requires_grad_(True)

    def penalty(backend):
        out = run_op(op, x, w, backend, input_fmt=fmt)
        grads = _grads((out**2).sum(), x, w, None, create_graph=True)
        return _grads(sum((gr**2).sum() for gr in grads), x, w, None)

    for a, b in zip(penalty("cpu"), penalty("reference"), strict=True):
        assert_close(a, b, torch.float64, scale=10)


@needs_accel
def test_entry_records_one_node():
    """The (N, C, S) view is taken inside the C++ autograd node: no view node of its own."""
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    out = gapkernels.global_avg_pool(x)
    (next_fn, _), *_ = out.grad_fn.next_functions
    assert type(next_fn).__name__ == "AccumulateGrad"


def test_entry_without_grad_records_nothing():
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    with torch.no_grad():
        assert gapkernels.global_max_pool(x).grad_fn is None
    assert gapkernels.global_avg_pool(x.detach()).grad_fn is None


def test_entry_skipped_under_a_torch_function_mode():
    """A __torch_function__ mode sees the ops (the entry would hide them from it)."""
    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 3, 4, 5)
    with Record():
        out = gapkernels.global_avg_pool(x)
    assert torch.ops.gapkernels.pool_forward.default in seen
    assert_close(out, reference.global_avg_pool(x), torch.float32)


def test_entry_applies_only_to_plain_eager_tensors():
    """... and only with the accelerator, whose entry it is."""
    x = torch.randn(2, 3, 4)
    assert gk_autograd.entry_applies(x) == gapkernels._ext.accel_loaded()
    assert not gk_autograd.entry_applies(torch.nn.Parameter(x))


@needs_accel
def test_entry_reports_the_ops_errors():
    """A bad weight reaches the op's own check, raised as the same error type."""
    x = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="weight must be 1-D"):
        gk_autograd.cpp_entry(x, False, 2, torch.ones(2), 0.5, 0.0, False, False)
    with pytest.raises(RuntimeError, match="mode must be"):
        gk_autograd.cpp_entry(x, False, 9, None, 0.5, 0.0, False, False)
    with pytest.raises(TypeError):
        gk_autograd.cpp_entry(x.numpy(), False, MODE_AVG, None, 0.5, 0.0, False, False)


def test_backend_choice_is_cached_and_env_still_read(monkeypatch):
    x = torch.randn(2, 3, 4)
    assert backends.resolve("auto", x, "NCHW", "f") == "cpu"
    assert backends.resolve("auto", x, "NCHW", "f") == "cpu"  # from the cache
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.resolve("auto", x, "NCHW", "f") == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=backends.ENV_VAR):
        backends.resolve("auto", x, "NCHW", "f")


def test_unavailable_backend_raises_on_every_call():
    x = torch.randn(2, 3, 4)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
            gapkernels.global_avg_pool(x, backend="cuda")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "nhwc"])
@pytest.mark.parametrize("shape", [(1, 2, 5, 6), (3, 2, 5, 6)], ids=str)
def test_entry_grad_has_the_strides_of_x(layout, shape, gen):
    """Like the Python route's views: grad_x has x's strides, in the dims of size 1 too."""
    x, fmt = make_input(shape, torch.float32, layout, gen=gen)
    x.requires_grad_(True)
    (grad_x,) = autograd.grad(gapkernels.global_avg_pool(x, input_fmt=fmt).sum(), x)
    assert grad_x.stride() == x.stride()
