"""The C++ ops' own autograd, for callers of torch.ops.gapkernels.pool_forward and for the public
functions' eager path: the accelerator's (csrc/ops.cpp) where gapkernels._C is loaded, else the
Python one (gapkernels.autograd.register_op_autograd); these tests run in both modes
(tests/test_accel.py runs them without the accelerator). The weight gradients equal their Python
twin (gapkernels.ops.weight_grad, the Triton ops' route) and the reference; forward mode through
the op itself gives the reference's tangent (never none, never zeros); the backward op refuses
forward mode."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import autograd, func

import gapkernels
from gapkernels import ops, reference
from helpers import OP_CASES, OPS, make_input, make_weight

pytestmark = pytest.mark.skipif(not gapkernels._ext.loaded(), reason="the C++ ops' autograd")

FWD = torch.ops.gapkernels.pool_forward.default
BWD = torch.ops.gapkernels.pool_backward.default
# op name -> (mode, the scalar weight used without a tensor one)
MODES = {
    "avg": (ops.MODE_AVG, 0.5),
    "max": (ops.MODE_MAX, 0.5),
    "mixed": (ops.MODE_MIXED, 0.3),
    "avgmax": (ops.MODE_MIXED, 0.5),
    "catavgmax": (ops.MODE_CAT, 0.5),
    "gem": (ops.MODE_GEM, 3.0),
}
EPS = 1e-6
TOL = {torch.float64: dict(rtol=1e-7, atol=1e-9), torch.float32: dict(rtol=2e-5, atol=1e-6)}


def _inputs(op, wkind, dtype, gen, shape=(2, 3, 4, 5)):
    """x (N, C, H, W) and its (N, C, S) view for the op, and the weight as the op takes it (1-D,
    acc dtype) or None."""
    x, _ = make_input(shape, torch.float64, "contiguous", gen=gen, positive=op == "gem")
    x = x.to(dtype)
    w = make_weight(op, wkind, shape[1], "cpu", requires_grad=False, gen=gen)
    if w is not None:
        w = w.to(ops.acc_dtype(dtype)).reshape(-1)
    return x, w


def _op(op, x3, w):
    mode, scalar = MODES[op]
    with_log = w is not None and mode == ops.MODE_GEM
    return FWD(x3, mode, w, scalar, EPS, with_log)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("op,wkind", [(o, k) for o, k in OP_CASES if k in ("scalar", "channel")])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x_grad", "x_fixed"])
def test_weight_grad_in_cpp_matches_its_twin_and_the_reference(op, wkind, dtype, x_grad, gen):
    x, w = _inputs(op, wkind, dtype, gen)
    x3 = x.flatten(2).requires_grad_(x_grad)
    w.requires_grad_(True)
    out, aux, _ = _op(op, x3, w)
    g = torch.randn(out.shape, dtype=dtype, generator=gen)
    (got,) = autograd.grad(out, w, g)
    twin = ops.weight_grad(MODES[op][0], g, aux, w.detach())
    torch.testing.assert_close(got, twin, **TOL[dtype])
    xr = x.detach().double()
    wr = w.detach().double().reshape(() if wkind == "scalar" else -1).requires_grad_(True)
    (want,) = autograd.grad(OPS[op](reference, xr, wr), wr, g.double())
    torch.testing.assert_close(got.double().reshape(want.shape), want, **TOL[dtype])


def test_gem_weight_grad_without_the_log_statistic_raises(gen):
    x, w = _inputs("gem", "channel", torch.float64, gen)
    w.requires_grad_(True)
    out = FWD(x.flatten(2), ops.MODE_GEM, w, 3.0, EPS, False)[0]
    with pytest.raises(RuntimeError, match="with_log=True"):
        autograd.grad(out.sum(), w)


def _reference_tangent(op, x, w, tx, tw, wkind):
    with fwAD.dual_level():
        dx = fwAD.make_dual(x.double(), tx.double())
        dw = None
        if w is not None:
            shape = () if wkind == "scalar" else (-1,)
            dw = fwAD.make_dual(w.double().reshape(shape), tw.double().reshape(shape))
        return fwAD.unpack_dual(OPS[op](reference, dx, dw)).tangent


@pytest.mark.parametrize("op,wkind", OP_CASES)
def test_forward_mode_through_the_op(op, wkind, gen):
    """torch.autograd.forward_ad and torch.func.jvp on torch.ops.gapkernels.pool_forward itself:
    the reference's tangent, for x's tangent, the weight's, and both."""
    x, w = _inputs(op, wkind, torch.float64, gen)
    tx = torch.randn(x.shape, dtype=x.dtype, generator=gen)
    tw = None if w is None else torch.randn(w.shape, dtype=w.dtype, generator=gen)
    zx, zw = torch.zeros_like(tx), None if w is None else torch.zeros_like(w)
    cases = [(tx, tw), (tx, zw)] + ([] if w is None else [(zx, tw)])
    for t_x, t_w in cases:
        want = _reference_tangent(op, x, w, t_x, t_w, wkind)
        with fwAD.dual_level():
            dx = fwAD.make_dual(x.flatten(2), t_x.flatten(2))
            dw = None if w is None else fwAD.make_dual(w, t_w)
            got = fwAD.unpack_dual(_op(op, dx, dw)[0]).tangent
        assert got is not None
        torch.testing.assert_close(got, want, **TOL[torch.float64])
        if w is None:
            _, got = func.jvp(lambda z: _op(op, z, None)[0], (x.flatten(2),), (t_x.flatten(2),))
        else:
            _, got = func.jvp(
                lambda z, wt: _op(op, z, wt)[0], (x.flatten(2), w), (t_x.flatten(2), t_w)
            )
        torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("op,wkind", [("max", "none"), ("mixed", "channel"), ("gem", "scalar")])
def test_jacfwd_through_the_op(op, wkind, gen):
    """jacfwd (vmap over jvp) of the op itself: the reference's Jacobian. (Reverse-mode torch.func
    transforms of the op itself raise: torch's error for a C++ autograd Function with the
    accelerator, gapkernels' without; the public functions support them.)"""
    x, w = _inputs(op, wkind, torch.float64, gen, shape=(2, 3, 2, 3))
    args = (x.flatten(2),) if w is None else (x.flatten(2), w)
    argnums = tuple(range(len(args)))
    shape = () if wkind == "scalar" else (-1,)

    def f(*a):
        return _op(op, a[0], a[1] if len(a) > 1 else None)[0]

    def f_ref(*a):
        z = a[0].unflatten(2, x.shape[2:])
        return OPS[op](reference, z, a[1].reshape(shape) if len(a) > 1 else None)

    got, want = func.jacfwd(f, argnums)(*args), func.jacfwd(f_ref, argnums)(*args)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    with pytest.raises(RuntimeError, match="functorch|torch.func's reverse-mode"):
        func.jacrev(f, argnums)(*args)


def test_forward_mode_without_a_tangent_gives_none():
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    with fwAD.dual_level():
        out = _op("avg", x, None)[0]
        assert fwAD.unpack_dual(out).tangent is None


def test_forward_mode_of_the_backward_op_raises(gen):
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen)
    out, aux, idx = FWD(x, ops.MODE_MAX, None, 0.5, EPS, False)
    g = torch.randn(out.shape, dtype=x.dtype, generator=gen)
    with fwAD.dual_level():
        dg = fwAD.make_dual(g, torch.randn_like(g))
        with pytest.raises(RuntimeError, match="pool_backward: forward-mode AD"):
            BWD(dg, x, aux, idx, ops.MODE_MAX, None, 0.5, EPS)
    with pytest.raises(RuntimeError, match="pool_backward: forward-mode AD"):
        func.jvp(lambda z: BWD(g, z, aux, idx, ops.MODE_MAX, None, 0.5, EPS), (x,), (x,))
