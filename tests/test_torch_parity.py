"""Against torch itself: adaptive_{avg,max}_pool, timm's formulas, max semantics (ties, NaN,
infinities), and for half types an error against float64 no worse than twice torch's own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gapkernels
from helpers import DEVICE_BACKENDS, assert_close, make_input

HALF_DTYPES = [torch.float16, torch.bfloat16]


def _torch_ops(x):
    """torch's own results, computed in x's dtype as a user would."""
    avg = F.adaptive_avg_pool2d(x, 1).flatten(1)
    mx, idx = F.adaptive_max_pool2d(x, 1, return_indices=True)
    return avg, mx.flatten(1), idx.flatten(1)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_torch_pools(device, backend, layout, dtype, gen):
    x, _ = make_input((4, 24, 7, 7), dtype, layout, device, gen)
    avg, mx, idx = _torch_ops(x)
    assert_close(gapkernels.global_avg_pool(x, backend=backend), avg, dtype)
    values, indices = gapkernels.global_max_pool(x, True, backend=backend)
    assert torch.equal(values, mx) and torch.equal(indices, idx)
    # timm's avgmax and catavgmax formulas
    assert_close(
        gapkernels.global_avgmax_pool(x, backend=backend), 0.5 * (avg + mx), dtype, scale=4
    )
    assert_close(
        gapkernels.global_avgmax_pool(x, concat=True, backend=backend),
        torch.cat([avg, mx], 1),
        dtype,
    )


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("op", ["avg", "gem"])
def test_half_error_at_most_twice_torchs(device, backend, dtype, op, gen):
    """Error against a float64 computation: ours <= 2 x torch's own in the same dtype."""
    x64 = torch.randn((8, 64, 14, 14), generator=gen, dtype=torch.float64).abs().to(device)
    x = x64.to(dtype)
    if op == "avg":
        ours = gapkernels.global_avg_pool(x, backend=backend)
        theirs = x.mean(dim=(2, 3))
        exact = x.double().mean(dim=(2, 3))
    else:
        ours = gapkernels.global_gem_pool(x, 3.0, backend=backend)
        theirs = x.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
        exact = x.double().clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
    err_ours = (ours.double() - exact).abs().max().item()
    err_theirs = (theirs.double() - exact).abs().max().item()
    assert err_ours <= 2 * err_theirs, (err_ours, err_theirs)


def _max_case(name, dtype):
    """Hand-made rows with ties, NaNs and infinities in known places (S = 12)."""
    nan, inf = float("nan"), float("inf")
    rows = {
        "tie_first_wins": [1, 5, 2, 5, 5, 0, -1, 5, 3, 2, 1, 0],
        "nan_wins": [1, 2, nan, 9, 3, 0, 1, 1, 1, 1, 1, 1],
        "several_nans": [nan, 2, 3, nan, 9, 0, nan, 1, 1, 1, 1, 1],
        "all_neg_inf": [-inf] * 12,
        "pos_inf_tie": [0, inf, 1, inf, 2, 3, 4, 5, 6, 7, 8, inf],
        "nan_last": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, nan],
        "negative_zero": [-0.0, 0.0, -1, -2, -3, -4, -5, -6, -7, -8, -9, -10],
    }
    return torch.tensor(rows[name], dtype=dtype)


MAX_CASES = [
    "tie_first_wins",
    "nan_wins",
    "several_nans",
    "all_neg_inf",
    "pos_inf_tie",
    "nan_last",
    "negative_zero",
]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("case", MAX_CASES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_max_semantics_match_adaptive_max_pool(device, backend, case, layout, dtype, gen):
    row = _max_case(case, dtype)
    # 3 x 5 channels of the same row, shifted so each channel puts the pattern elsewhere
    x = torch.stack([torch.roll(row, k) for k in range(15)]).view(3, 5, 3, 4).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    ref_values, ref_idx = F.adaptive_max_pool2d(x.float(), 1, return_indices=True)
    values, idx = gapkernels.global_max_pool(x, True, backend=backend)
    assert torch.equal(idx, ref_idx.flatten(1))
    torch.testing.assert_close(
        values.float(), ref_values.flatten(1), rtol=0, atol=0, equal_nan=True
    )
    # the whole gradient goes to the one index
    xg = x.detach().requires_grad_(True)
    gapkernels.global_max_pool(xg, backend=backend).sum().backward()
    expected = torch.zeros(15, 12, dtype=dtype, device=device)
    expected.scatter_(1, ref_idx.flatten().view(15, 1), 1.0)
    assert torch.equal(xg.grad.reshape(15, 12), expected)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("op", ["avg", "mixed", "gem"])
def test_nan_and_inf_propagate_like_torch(device, backend, op):
    x = torch.ones((2, 3, 4, 4), device=device)
    x[0, 0, 1, 1] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    fn = {
        "avg": lambda t, **kw: gapkernels.global_avg_pool(t, **kw),
        "mixed": lambda t, **kw: gapkernels.global_mixed_pool(t, 0.25, **kw),
        "gem": lambda t, **kw: gapkernels.global_gem_pool(t, 3.0, **kw),
    }[op]
    ref = fn(x, backend="reference")
    out = fn(x, backend=backend)
    torch.testing.assert_close(out, ref, equal_nan=True)
    assert out[0, 0].isnan() and out[1, 2].isinf()
