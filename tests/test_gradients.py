"""Every derivative of every op: second order, forward mode and torch.func against the reference,
on every backend that runs here (cpu; triton in the interpreter; cuda with a GPU). A derivative
either matches the reference or raises: never zeros, never a wrong value."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.autograd.forward_ad as fwAD  # noqa: E402
from torch import autograd  # noqa: E402

from gapkernels import backends, global_gem_pool, reference  # noqa: E402
from helpers import HAS_CUDA, OP_CASES, OPS, make_input, make_weight, run_op  # noqa: E402


def _backend_params():
    params = [pytest.param("cpu", "cpu", torch.float64, id="cpu")]
    params.append(
        pytest.param(
            "cuda",
            "cuda",
            torch.float64,
            id="cuda",
            marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU"),
        )
    )
    triton_device = "cuda" if HAS_CUDA else "cpu"
    reason = backends.unavailable_reason("triton", torch.empty(1, 1, 1, device=triton_device))
    # Triton accumulates in float32 and has no float64: compared with a float32 tolerance.
    params.append(
        pytest.param(
            triton_device,
            "triton",
            torch.float32,
            id="triton",
            marks=pytest.mark.skipif(reason is not None, reason=str(reason)),
        )
    )
    return params


BACKENDS = _backend_params()
TOL = {torch.float64: dict(rtol=1e-7, atol=1e-9), torch.float32: dict(rtol=2e-3, atol=2e-4)}
LAYOUTS = ["contiguous", "channels_last"]


def _inputs(op, wkind, layout, device, dtype, gen, shape=(2, 3, 4, 5)):
    x, fmt = make_input(shape, torch.float64, layout, "cpu", gen, positive=op == "gem")
    x = x.to(device=device, dtype=dtype).requires_grad_(True)
    if layout == "channels_last":
        assert not x.is_contiguous()
    w = make_weight(op, wkind, shape[1], "cpu", gen=gen)
    if w is not None:
        w = w.detach().to(device=device, dtype=dtype).requires_grad_(True)
    return x, fmt, w


def _second_order(op, x, w, fmt, backend):
    """A gradient penalty: d/d(x, w) of |d/dx sum(pool(x)**2)|**2 (+ the weight's own term)."""
    out = run_op(op, x, w, backend, input_fmt=fmt)
    params = [x] if w is None else [x, w]
    grads = autograd.grad((out**2).sum(), params, create_graph=True)
    penalty = sum((g**2).sum() for g in grads)
    return autograd.grad(penalty, params)


@pytest.mark.parametrize("device,backend,dtype", BACKENDS)
@pytest.mark.parametrize("op,wkind", OP_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_second_order_matches_reference(device, backend, dtype, op, wkind, layout, gen):
    x, fmt, w = _inputs(op, wkind, layout, device, dtype, gen)
    got = _second_order(op, x, w, fmt, backend)
    xr = x.detach().double().requires_grad_(True)
    wr = None if w is None else w.detach().double().requires_grad_(True)
    want = _second_order(op, xr, wr, fmt, "reference")
    for g, e in zip(got, want, strict=True):
        assert g.abs().sum() > 0 or e.abs().sum() == 0  # no silent zeros
        torch.testing.assert_close(g.double(), e, **TOL[dtype])


@pytest.mark.parametrize("op,wkind", OP_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("weight_grad", [True, False], ids=["w_grad", "w_fixed"])
def test_gradgradcheck_cpu(op, wkind, layout, weight_grad, gen):
    x, fmt, w = _inputs(op, wkind, layout, "cpu", torch.float64, gen, shape=(2, 3, 3, 4))
    if w is not None:
        w.requires_grad_(weight_grad)
    inputs = (x, w) if (w is not None and weight_grad) else (x,)

    def fn(*args):
        weight = args[1] if len(args) > 1 else w
        return run_op(op, args[0], weight, "cpu", input_fmt=fmt)

    assert autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("op", ["mixed", "gem"])
def test_gradgradcheck_python_float_weight(op, gen):
    x, fmt, _ = _inputs(op, "none", "contiguous", "cpu", torch.float64, gen, shape=(2, 3, 3, 4))
    value = 0.3 if op == "mixed" else 2.5

    def fn(z):
        return run_op(op, z, value, "cpu", input_fmt=fmt)

    assert autograd.gradgradcheck(fn, (x,), eps=1e-6, atol=1e-5, rtol=1e-4)


def _forward_mode(op, x, w, fmt, backend):
    tx = torch.randn_like(x)
    tw = None if w is None else torch.randn_like(w)
    with fwAD.dual_level():
        dx = fwAD.make_dual(x.detach(), tx)
        dw = None if w is None else fwAD.make_dual(w.detach(), tw)
        out = run_op(op, dx, dw, backend, input_fmt=fmt)
        tangent = fwAD.unpack_dual(out).tangent
    return tx, tw, tangent


@pytest.mark.parametrize("device,backend,dtype", BACKENDS)
@pytest.mark.parametrize("op,wkind", OP_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_mode_matches_reference(device, backend, dtype, op, wkind, layout, gen):
    x, fmt, w = _inputs(op, wkind, layout, device, dtype, gen)
    tx, tw, tangent = _forward_mode(op, x, w, fmt, backend)
    with fwAD.dual_level():
        dx = fwAD.make_dual(x.detach().double(), tx.double())
        dw = None if w is None else fwAD.make_dual(w.detach().double(), tw.double())
        want = fwAD.unpack_dual(run_op(op, dx, dw, "reference", input_fmt=fmt)).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent.double(), want, **TOL[dtype])


def _torch_drops_compiled_tangents() -> bool:
    """Whether this torch's compiled graph (plain torch ops, no input requiring grad) returns a
    dual input's result without a tangent instead of raising: torch before 2.14 (2.11, 2.13) does
    (pytorch/pytorch#187284; since #189644 Dynamo refuses a dual input)."""
    torch._dynamo.reset()
    fn = torch.compile(lambda z: z.sum(dim=1), fullgraph=True)
    try:
        with fwAD.dual_level():
            out = fn(fwAD.make_dual(torch.ones(2, 3), torch.ones(2, 3)))
            return fwAD.unpack_dual(out).tangent is None
    except Exception:
        return False


@pytest.mark.parametrize("op,wkind", [("avg", "none"), ("mixed", "channel"), ("gem", "scalar")])
def test_forward_mode_in_compiled_graph_raises(op, wkind, gen):
    """Dynamo cannot trace a custom jvp: compiled graphs use the class without one, and forward
    mode through them must raise, not return zeros."""
    if wkind == "none" and _torch_drops_compiled_tangents():
        # No input requires grad (x is detached): an inference graph, whose Inductor code drops
        # the tangent of any op, torch's own included; with a weight requiring grad (the other
        # cases) the graph is an autograd.Function without a jvp, which raises on any torch.
        pytest.skip("this torch drops a dual input's tangent in every compiled graph (< 2.14)")
    torch._dynamo.reset()
    x, fmt, w = _inputs(op, wkind, "contiguous", "cpu", torch.float64, gen)
    fn = torch.compile(lambda z: run_op(op, z, w, "cpu", input_fmt=fmt), fullgraph=True)
    with pytest.raises(Exception, match="(?i)jvp|forward"):
        with fwAD.dual_level():
            out = fn(fwAD.make_dual(x.detach(), torch.randn_like(x)))
            assert fwAD.unpack_dual(out).tangent is not None


def test_backward_op_has_no_silent_derivative(gen):
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen)
    fwd = torch.ops.gapkernels.pool_forward.default
    bwd = torch.ops.gapkernels.pool_backward.default
    out, aux, idx = fwd(x, 0, None, 0.5, 1e-6, False)
    g = torch.randn(out.shape, dtype=x.dtype, generator=gen).requires_grad_(True)
    grad_x = bwd(g, x, aux, idx, 0, None, 0.5, 1e-6)
    with pytest.raises(RuntimeError, match="pool_backward.*not supported"):
        autograd.grad(grad_x.sum(), g)


@pytest.mark.parametrize("device,backend,dtype", BACKENDS)
@pytest.mark.parametrize("op,wkind", OP_CASES)
def test_direct_op_double_backward(device, backend, dtype, op, wkind, gen):
    """Through the op's own autograd (torch.ops.gapkernels*.pool_forward, no autograd.Function),
    second order matches too."""
    from gapkernels.autograd import _pair
    from gapkernels.ops import MODE_AVG, MODE_CAT, MODE_GEM, MODE_MAX, MODE_MIXED

    mode = {
        "avg": MODE_AVG,
        "max": MODE_MAX,
        "mixed": MODE_MIXED,
        "avgmax": MODE_MIXED,
        "catavgmax": MODE_CAT,
        "gem": MODE_GEM,
    }[op]
    x, _, w = _inputs(op, wkind, "contiguous", device, dtype, gen)
    x3 = x.detach().flatten(2).requires_grad_(True)
    scalar = {"mixed": 0.3, "avgmax": 0.5, "gem": 3.0}.get(op, 0.5)
    weight = None if w is None else w.reshape(-1)
    fwd = _pair(backend)[0]

    def penalty(z, wt, fn):
        out = fn(z, wt)
        params = [z] if wt is None else [z, wt]
        grads = autograd.grad((out**2).sum(), params, create_graph=True)
        return autograd.grad(sum((g**2).sum() for g in grads), params)

    got = penalty(
        x3,
        weight,
        lambda z, wt: fwd(z, mode, wt, scalar, 1e-6, wt is not None and mode == MODE_GEM)[0],
    )
    x4 = x3.detach().double().unflatten(2, (4, 5)).requires_grad_(True)
    wr = None if w is None else w.detach().double().requires_grad_(True)
    want = penalty(x4, wr, lambda z, wt: OPS[op](reference, z, wt))
    torch.testing.assert_close(got[0].double(), want[0].flatten(2), **TOL[dtype])
    if w is not None:
        torch.testing.assert_close(got[1].double().reshape(want[1].shape), want[1], **TOL[dtype])


@pytest.mark.parametrize("device,backend,dtype", BACKENDS)
@pytest.mark.parametrize("wkind", ["scalar", "channel"])
def test_gem_differentiable_grad_below_eps(device, backend, dtype, wkind, gen):
    """The differentiable (create_graph) GeM gradient is zero where x < eps, as clamp's is, and
    equals the fused first-order one. eps = 0.5 so that the clamped positions would carry a
    gradient of the same size as the others if the clamp's zero were lost."""
    x, fmt, w = _inputs("gem", wkind, "contiguous", device, dtype, gen)
    with torch.no_grad():
        x.copy_(torch.rand(x.shape, generator=gen, dtype=torch.float64).to(x))
    eps = 0.5
    assert bool((x < eps).any()) and bool((x >= eps).any())
    out = global_gem_pool(x, w, eps=eps, backend=backend, input_fmt=fmt)
    (fused,) = autograd.grad(out.sum(), x, retain_graph=True)
    (differentiable,) = autograd.grad(out.sum(), x, create_graph=True)
    xr = x.detach().double().requires_grad_(True)
    wr = None if w is None else w.detach().double()
    (want,) = autograd.grad(reference.global_gem_pool(xr, wr, eps=eps, input_fmt=fmt).sum(), xr)
    assert bool((want[xr < eps] == 0).all()) and bool((want[xr >= eps] != 0).all())
    torch.testing.assert_close(differentiable.double(), want, **TOL[dtype])
    torch.testing.assert_close(fused.double(), want, **TOL[dtype])
