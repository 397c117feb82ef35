"""Property-based: hypothesis draws shapes, layouts, dtypes, values (with NaN, infinities and
ties) and ops; every extension backend agrees with the reference."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from helpers import DEVICE_BACKENDS, TOLERANCES, make_weight, run_op

SPECIAL = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0]


@st.composite
def pool_cases(draw):
    rank = draw(st.integers(3, 5))
    n = draw(st.integers(1, 3))
    c = draw(st.integers(1, 19))
    spatial = draw(st.lists(st.integers(1, 9), min_size=rank - 2, max_size=rank - 2))
    dtype = draw(st.sampled_from(list(TOLERANCES)))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "nhwc", "permuted"]))
    op, wkind = draw(
        st.sampled_from(
            [
                ("avg", "none"),
                ("max", "none"),
                ("mixed", "channel"),
                ("mixed", "scalar"),
                ("avgmax", "none"),
                ("catavgmax", "none"),
                ("gem", "none"),
                ("gem", "channel"),
            ]
        )
    )
    seed = draw(st.integers(0, 2**31 - 1))
    n_special = draw(st.integers(0, 3)) if op in ("max", "avg", "catavgmax") else 0
    ties = draw(st.booleans())
    return rank, n, c, spatial, dtype, layout, op, wkind, seed, n_special, ties


def _build(rank, n, c, spatial, dtype, layout, op, seed, n_special, ties):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, c, *spatial), generator=gen, dtype=torch.float64)
    if ties:
        x = x.round()  # many equal values: tie-breaking matters
    if op == "gem":
        x = x.abs()
    flat = x.view(-1)
    for k in range(n_special):
        pos = torch.randint(0, flat.numel(), (1,), generator=gen).item()
        flat[pos] = SPECIAL[(seed + k) % len(SPECIAL)]
    x = x.to(dtype)
    fmt = "NCHW"
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    elif layout == "nhwc":
        x, fmt = x.movedim(1, -1).contiguous(), "NHWC"
    elif layout == "permuted" and rank >= 4:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # neither layout: copied
    return x, fmt, gen


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=pool_cases())
def test_agrees_with_reference(device, backend, case):
    rank, n, c, spatial, dtype, layout, op, wkind, seed, n_special, ties = case
    x, fmt, gen = _build(rank, n, c, spatial, dtype, layout, op, seed, n_special, ties)
    x = x.to(device).requires_grad_(True)
    w = make_weight(op, wkind, c, device, gen=gen)
    out = run_op(op, x, w, backend, input_fmt=fmt)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = None if w is None else w.detach().clone().requires_grad_(True)
    ref = run_op(op, x_ref, w_ref, "reference", input_fmt=fmt)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol, equal_nan=True)
    if op == "max":
        _, idx = run_op(op, x, None, backend, input_fmt=fmt, return_indices=True)
        _, idx_ref = run_op(op, x_ref, None, "reference", input_fmt=fmt, return_indices=True)
        assert torch.equal(idx, idx_ref)
    if n_special == 0:
        g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device, dtype)
        (gx,) = torch.autograd.grad(out, [x], g)
        (gx_ref,) = torch.autograd.grad(ref, [x_ref], g)
        torch.testing.assert_close(gx, gx_ref, rtol=rtol, atol=atol * max(1, math.prod(spatial)))
