"""GeM relative to the row maximum: finite and accurate values and gradients (to x and p) for every
p in [1, 100] and every finite input, dead channels included, on every backend; the same as the
textbook formula where that one is finite."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_gradients import BACKENDS  # noqa: E402

import gapkernels  # noqa: E402
from gapkernels import reference  # noqa: E402

RTOL = {torch.float64: 1e-9, torch.float32: 2e-4}


def _grads(fn, x, p):
    x = x.detach().requires_grad_(True)
    p = p.detach().requires_grad_(True)
    out = fn(x, p)
    g = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    gx, gp = torch.autograd.grad(out, (x, p), g)
    return out.detach(), gx, gp


def _rows(values, dtype, channels_last):
    """(N=1, C, 2, W) from per-channel rows of values."""
    x = torch.tensor(values, dtype=torch.float64)
    x = x.view(1, x.shape[0], 2, -1).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _check_case(device, backend, dtype, x, p_value, per_channel):
    c = x.shape[1]
    p = torch.full((c,) if per_channel else (), float(p_value), dtype=dtype, device=device)
    x = x.to(device)
    got = _grads(lambda z, w: gapkernels.global_gem_pool(z, w, backend=backend), x, p)
    want = _grads(lambda z, w: reference.global_gem_pool(z, w), x.double(), p.double())
    for a, b in zip(got, want, strict=True):
        assert torch.isfinite(a).all(), a
        assert torch.isfinite(b).all(), b
        scale = b.abs().max().clamp(min=1e-300)
        torch.testing.assert_close(
            a.double() / scale, b / scale, rtol=RTOL[dtype], atol=RTOL[dtype]
        )


@pytest.mark.parametrize("device,backend,dtype", BACKENDS)
@pytest.mark.parametrize("p_value", [1.0, 3.0, 7.5, 30.0, 90.0, 100.0])
@pytest.mark.parametrize("per_channel", [False, True], ids=["p_scalar", "p_channel"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_dead_channel_and_large_values(device, backend, dtype, p_value, per_channel, channels_last):
    rows = [
        [0.0] * 8,  # a dead ReLU channel: every y = eps
        [3.0] * 8,  # 3**90 overflows float32
        [1e30, 2.0, 0.0, 5e29, 1e30, 7.0, 1e-3, 3.0],  # huge and tiny together
        [1e-5, 2e-5, 0.0, 0.5e-5, 3e-5, 1e-5, 2e-5, 1e-5],  # tiny: powers underflow
    ]
    _check_case(device, backend, dtype, _rows(rows, dtype, channels_last), p_value, per_channel)


@settings(max_examples=40, deadline=None)
@given(
    p_value=st.floats(1.0, 100.0),
    log_scale=st.floats(-30.0, 30.0),
    seed=st.integers(0, 2**31 - 1),
    dead=st.booleans(),
)
def test_cpu_any_p_any_scale(p_value, log_scale, seed, dead):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, 4, 5, generator=gen, dtype=torch.float64) * 10.0**log_scale
    if dead:
        x[:, 1] = 0.0
    for dtype in (torch.float64, torch.float32):  # 1e30 ** 1 fits float32; powers are relative
        _check_case("cpu", "cpu", dtype, x.to(dtype), p_value, per_channel=True)


@settings(max_examples=60, deadline=None)
@given(
    p_value=st.floats(1.0, 100.0),
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-3.0, 3.0),
)
def test_reference_matches_textbook_formula_where_finite(p_value, seed, log_scale):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, 4, 5, generator=gen, dtype=torch.float64) * 10.0**log_scale
    p = torch.tensor(p_value, dtype=torch.float64)
    plain = reference.global_gem_pool_plain(x, p)
    stable = reference.global_gem_pool(x, p)
    assert torch.isfinite(stable).all()
    finite = torch.isfinite(plain) & (plain > 0)
    torch.testing.assert_close(stable[finite], plain[finite], rtol=1e-10, atol=0)
    # The textbook formula loses whole rows at large p; the stable one keeps them in range:
    # a GeM lies between the mean and the maximum of clamp(x, eps).
    y = x.clamp(min=1e-6).flatten(2)
    assert (stable <= y.amax(2) * (1 + 1e-12)).all()
    assert (stable >= y.mean(2) * (1 - 1e-12)).all()


def test_dead_channel_float32_has_zero_p_gradient():
    """The README's old example: a dead channel with p above ~7.5 gave a NaN gradient to p (eps**p
    underflows in float32). A constant row's GeM is that constant for every p: gradient 0."""
    x = torch.zeros(2, 3, 4, 4)
    for p_value in (7.6, 50.0, 100.0):
        p = torch.tensor(p_value, requires_grad=True)
        out = reference.global_gem_pool(x, p)
        (g,) = torch.autograd.grad(out.sum(), p)
        assert g.item() == 0.0
        torch.testing.assert_close(out, torch.full_like(out, 1e-6))
