"""Under torch.compile, small CPU inputs on backend "auto" are pooled by plain torch ops that
Inductor fuses (gapkernels.inline); larger ones, dynamic shapes, named backends and torch.export
keep the custom op. Both sides give the eager kernels' values and gradients: ties and NaN rows
(the max at the first maximum, a NaN counting as the maximum), the GeM eps clamp and +inf rows."""

from __future__ import annotations

import pytest
import torch
from torch import autograd
from torch._dynamo.backends.common import aot_autograd

import gapkernels
from gapkernels import inline
from gapkernels.ops import MODE_AVG, MODE_CAT, MODE_GEM, MODE_MAX, MODE_MIXED
from helpers import OP_CASES, assert_close, make_weight, run_op

pytestmark = pytest.mark.skipif(not gapkernels._ext.loaded(), reason="compares with the kernels")

OP_MODE = {
    "avg": MODE_AVG,
    "max": MODE_MAX,
    "mixed": MODE_MIXED,
    "avgmax": MODE_MIXED,
    "catavgmax": MODE_CAT,
    "gem": MODE_GEM,
}


def _special_input(shape, op, dtype, gen, channels_last=False):
    """Random values with, per batch item, a row whose maximum is tied (at two positions) and a
    row with two NaNs (the first NaN must win); for GeM, half a row below eps instead."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    s = x[0, 0].numel()
    if op == "gem":
        x = x.abs() + 0.1
        x[:, 0].view(x.shape[0], -1)[:, : s // 2] = 1e-9  # below eps: no gradient there
    else:
        x[:, 0].view(x.shape[0], -1)[:, [1, s - 2]] = 9.0  # a tie for the maximum
        x[:, -1].view(x.shape[0], -1)[:, [s // 2, s - 1]] = float("nan")
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _run_both(fn, x, w, gen):
    """(out, grads wrt x (and w)) of fn eager and compiled (Inductor, static shapes)."""
    g = None
    results = []
    for call in (fn, torch.compile(fn, fullgraph=True, dynamic=False)):
        xi = x.detach().clone().requires_grad_(True)
        wi = None if w is None else w.detach().clone().requires_grad_(True)
        out = call(xi, wi)
        if g is None:
            g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
        params = [xi] if wi is None else [xi, wi]
        results.append((out, autograd.grad(out, params, g)))
    return results


def _assert_same(eager, compiled, dtype):
    """Values and gradients close (NaN where NaN): a max gradient at another of the tied or NaN
    positions would differ by the whole gradient there."""
    (out_e, grads_e), (out_c, grads_c) = eager, compiled
    assert_close(out_c, out_e, dtype)
    for a, b in zip(grads_c, grads_e, strict=True):
        assert a.shape == b.shape
        assert_close(a, b, dtype)


def _force(monkeypatch, limit: int):
    for table in inline.MAX_ELEMENTS.values():
        for mode in table:
            monkeypatch.setitem(table, mode, limit)


@pytest.mark.parametrize("op,wkind", OP_CASES)
@pytest.mark.parametrize("side", ["inline", "op"])
def test_compiled_equals_eager(op, wkind, side, monkeypatch, gen):
    """Values and gradients (x and the weight) of the compiled call equal the eager kernels',
    on ties, NaN rows, GeM's clamp and +inf, pooled inline and by the op."""
    torch._dynamo.reset()
    _force(monkeypatch, 10**9 if side == "inline" else -1)
    dtype = torch.float32
    x = _special_input((2, 3, 4, 5), op, dtype, gen, channels_last=op in ("max", "gem"))
    w = make_weight(op, wkind, 3, "cpu", gen=gen)

    def fn(z, wt):
        return run_op(op, z, wt, "auto", keepdim=op == "avg")

    _assert_same(*_run_both(fn, x, w, gen), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("fmt", ["NCHW", "NHWC"])
def test_compiled_inline_dtypes_formats_and_indices(dtype, fmt, monkeypatch, gen):
    """Statistics in the acc dtype, rounded once; NHWC input; return_indices' int64 offsets
    (first maximum, first NaN) equal the kernel's."""
    torch._dynamo.reset()
    _force(monkeypatch, 10**9)
    x = _special_input((2, 3, 3, 5), "max", dtype, gen)
    if fmt == "NHWC":
        x = x.movedim(1, -1).contiguous()

    def fn(z):
        return gapkernels.global_max_pool(z, return_indices=True, input_fmt=fmt)

    (v_e, i_e), (v_c, i_c) = fn(x), torch.compile(fn, fullgraph=True, dynamic=False)(x)
    assert torch.equal(i_c, i_e) and i_c.dtype == torch.int64
    assert_close(v_c, v_e, dtype)

    def keep(z):
        return gapkernels.global_avgmax_pool(z, concat=True, keepdim=True, input_fmt=fmt)

    k_e, k_c = keep(x), torch.compile(keep, fullgraph=True, dynamic=False)(x)
    assert k_c.shape == k_e.shape and k_c.dtype == k_e.dtype
    assert_close(k_c, k_e, dtype)

    def mixed(z, wt):
        return gapkernels.global_mixed_pool(z, wt, input_fmt=fmt)

    w = make_weight("mixed", "channel", 3, "cpu", gen=gen)
    _assert_same(*_run_both(mixed, x, w, gen), dtype)


def test_compiled_inline_gem_inf_row(monkeypatch, gen):
    """A row holding +inf: +inf, as the kernels give."""
    torch._dynamo.reset()
    _force(monkeypatch, 10**9)
    x = torch.rand((2, 3, 5), generator=gen) + 0.1
    x[1, 2, 3] = float("inf")

    def fn(z):
        return gapkernels.global_gem_pool(z, 3.0)

    got, want = torch.compile(fn, fullgraph=True, dynamic=False)(x), fn(x)
    assert got[1, 2] == float("inf")
    assert_close(got, want, torch.float32)


def _graph_has_op(fn, *args) -> bool:
    """Whether the compiled forward graph (after AOTAutograd) calls the custom op."""
    torch._dynamo.reset()
    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm.code)
        return gm

    torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=keep))(*args)
    return any("gapkernels.pool_forward" in code for code in graphs)


@pytest.mark.parametrize("needs_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("op", ["avg", "max", "mixed", "catavgmax", "gem"])
def test_threshold_picks_the_path(op, needs_grad, gen):
    """At most MAX_ELEMENTS[needs_grad][mode] elements: inline; one row more: the op. (1, C, 7)
    inputs on both sides of the limit."""
    limit = inline.MAX_ELEMENTS[needs_grad][OP_MODE[op]]
    below, above = limit // 7, limit // 7 + 1  # channels
    wkind = "scalar" if op in ("mixed", "gem") else "none"
    w = make_weight(op, wkind, 1, "cpu", requires_grad=needs_grad, gen=gen)
    for channels, want_op in ((below, False), (above, True)):
        if channels == 0:
            continue
        x = torch.rand((1, channels, 7), generator=gen) + 0.1
        x.requires_grad_(needs_grad)

        def fn(z, wt):
            return run_op(op, z, wt, "auto")

        assert _graph_has_op(fn, x, w) is want_op, (channels, limit)


def test_named_backend_dynamic_shapes_and_export_keep_the_op(monkeypatch, gen):
    _force(monkeypatch, 10**9)
    x = torch.randn((2, 3, 4, 5), generator=gen)
    assert not _graph_has_op(lambda z: gapkernels.global_avg_pool(z), x)
    assert _graph_has_op(lambda z: gapkernels.global_avg_pool(z, backend="cpu"), x)
    monkeypatch.setenv("GAPKERNELS_BACKEND", "cpu")
    assert _graph_has_op(lambda z: gapkernels.global_avg_pool(z), x)
    monkeypatch.delenv("GAPKERNELS_BACKEND")
    torch._dynamo.reset()
    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm.code)
        return gm

    compiled = torch.compile(
        lambda z: gapkernels.global_avg_pool(z),
        dynamic=True,
        backend=aot_autograd(fw_compiler=keep),
    )
    compiled(x)
    assert any("gapkernels.pool_forward" in code for code in graphs)
    pool = gapkernels.nn.GlobalPool("max")
    ep = torch.export.export(pool, (x,))
    assert "gapkernels.pool_forward" in str(ep.graph)
