"""Stable GeM in the CUDA kernels (docs/DESIGN.md "Modes"): statistics relative to the row maximum,
against a float64 reference, with large p, dead and near-overflow channels; the integral fast
path and pow; NaN and inf rows."""

from __future__ import annotations

import pytest
import torch
from cuda_common import CUDA_MARK, LAYOUTS, skip_without_cuda_kernels

import gapkernels
from helpers import DTYPES

pytestmark = CUDA_MARK


def _gem_channels(shape, dtype, gen):
    """(N, 8, *spatial) float64 values, channel by channel: dead (all 0: y = eps everywhere),
    constant 3, large (about the dtype's largest / 4, so that y**p overflows for any p > 4), and
    random with values below eps (zero gradient there), each once with p = 7.5 and once with
    p = 90; the max of the large and random channels sits late in the row (a split reduction's
    pieces meet a new maximum)."""
    N, C = shape[0], 8
    S = int(torch.tensor(shape[2:]).prod())
    big = {torch.float16: 1.5e4, torch.bfloat16: 1e37, torch.float32: 1e37, torch.float64: 1e300}[
        dtype
    ]
    x = torch.empty(N, C, S, dtype=torch.float64)
    x[:, 0:2] = 0.0
    x[:, 2:4] = 3.0
    ramp = torch.linspace(0.5, 1.0, S, dtype=torch.float64)
    x[:, 4:6] = big * ramp * (0.9 + 0.1 * torch.rand(N, 2, S, generator=gen, dtype=torch.float64))
    x[:, 6:8] = torch.randn(N, 2, S, generator=gen, dtype=torch.float64) + 2.0 * ramp
    p = torch.tensor([7.5, 90.0] * 4, dtype=_p_dtype(dtype))
    return x.view(N, C, *shape[2:]).to(dtype), p


def _p_dtype(dtype):
    """p in x's accumulation dtype: a float32 p of a float64 x gets a float32 gradient, rounded
    (6e-8) and, for the 1e300 channels, overflowed to inf (found on the first GPU run)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gem_fwd_bwd(x, p, backend, grad_out=None):
    x = x.detach().clone().requires_grad_(True)
    p = p.detach().clone().requires_grad_(True)
    out = (
        gapkernels.reference.global_gem_pool(x, p, 1e-6)
        if backend == "reference"
        else gapkernels.global_gem_pool(x, p, 1e-6, backend=backend)
    )
    if grad_out is None:
        grad_out = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64)
        grad_out = grad_out.to(device=out.device, dtype=out.dtype).view_as(out)
    out.backward(grad_out)
    return out.detach(), x.grad, p.grad, grad_out


def _close_normwise(actual, expected, rtol, what):
    """Elementwise within rtol of the larger of |expected| and rtol-scaled max |expected| (so
    that tiny entries of a wide-ranging tensor are compared at the tensor's scale)."""
    actual = actual.double().cpu()
    expected = expected.double().cpu()
    assert torch.isfinite(actual).all(), f"{what}: not finite: {actual}"
    assert torch.isfinite(expected).all(), f"{what}: reference not finite"
    scale = expected.abs().amax(dim=0, keepdim=True).clamp(min=1e-300)
    err = (actual - expected).abs()
    bound = rtol * (expected.abs() + 1e-3 * scale)
    assert bool((err <= bound).all()), (
        f"{what}: max rel err {(err / (expected.abs() + 1e-3 * scale)).max().item():.3g} > {rtol}"
    )


# (rtol value, rtol grads): grads carry (y/M)**(p-1) with p up to 90, i.e. about 90 roundings of
# y/M, and grad_p a difference of two terms of similar size.
GEM_RTOL = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 1e-3),
    torch.float16: (2e-3, 3e-2),
    torch.bfloat16: (1.6e-2, 1.5e-1),
}
# (2, 8, 5, 7): one group per row, no split; (1, 8, 160, 160): NCS rows and NSC columns split
# over blocks and combined (S = 25600).
GEM_SHAPES = {"small": (2, 8, 5, 7), "split": (1, 8, 160, 160)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", list(GEM_SHAPES.values()), ids=list(GEM_SHAPES))
def test_gem_stable_large_p_dead_and_large_channels(shape, layout, dtype, gen):
    """Value, grad_x and grad_p finite and equal to the reference (float64) for dead channels,
    x = 3 with p = 90 and near-overflow inputs, at p = 7.5 and p = 90 (learnable, per channel)."""
    skip_without_cuda_kernels()
    x, p = _gem_channels(shape, dtype, gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out, grad_x, grad_p, grad_out = _gem_fwd_bwd(x.cuda(), p.cuda(), "cuda")
    ref_out, ref_gx, ref_gp, _ = _gem_fwd_bwd(
        x.double(), p.double(), "reference", grad_out.double().cpu()
    )
    rtol_value, rtol_grad = GEM_RTOL[dtype]
    # Dead channels: eps = 1e-6 is subnormal in float16 (an ulp is 6e-8): absolute there.
    torch.testing.assert_close(
        out[:, 0:2].double().cpu(), ref_out[:, 0:2], rtol=rtol_value, atol=1e-7
    )
    _close_normwise(out[:, 2:], ref_out[:, 2:], rtol_value, "out")
    _close_normwise(
        grad_x.reshape(shape[0], 8, -1).transpose(0, 1).reshape(8, -1).T,
        ref_gx.reshape(shape[0], 8, -1).transpose(0, 1).reshape(8, -1).T,
        rtol_grad,
        "grad_x",
    )
    _close_normwise(grad_p.view(1, -1), ref_gp.view(1, -1), rtol_grad, "grad_p")
    # The exact cases: a dead channel gives eps and a constant one itself, with grad_p = 0.
    if dtype in (torch.float32, torch.float64):  # (eps rounded once to the dtype)
        eps = torch.tensor(1e-6, dtype=dtype).double()
        assert torch.equal(out[:, 0:2].double().cpu(), eps.expand(shape[0], 2))
    assert torch.equal(
        out[:, 2:4].double().cpu(), torch.full((shape[0], 2), 3.0, dtype=torch.float64)
    )
    assert bool((grad_x[:, 0:2] == 0).all())
    assert torch.equal(grad_p[0:4].cpu(), torch.zeros(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p_value", [1.0, 2.0, 3.0, 8.0, 8.5, 100.0])
def test_gem_integral_fast_path_and_pow_agree(p_value, layout, dtype, gen):
    """Integral p (multiplications, 1..8) and non-integral p (pow) against the reference."""
    skip_without_cuda_kernels()
    shape = (3, 6, 11, 13)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).abs().to(dtype) + 0.05
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    p = torch.full((6,), p_value, dtype=_p_dtype(dtype))
    out, grad_x, grad_p, grad_out = _gem_fwd_bwd(x.cuda(), p.cuda(), "cuda")
    ref_out, ref_gx, ref_gp, _ = _gem_fwd_bwd(
        x.double(), p.double(), "reference", grad_out.double().cpu()
    )
    rtol_value, rtol_grad = GEM_RTOL[dtype]
    _close_normwise(out, ref_out, rtol_value, "out")
    _close_normwise(grad_x.reshape(-1, 1), ref_gx.reshape(-1, 1), rtol_grad, "grad_x")
    _close_normwise(grad_p.view(1, -1), ref_gp.view(1, -1), rtol_grad, "grad_p")


def test_gem_nan_and_inf_rows():
    """A NaN in a row gives NaN; +inf gives +inf (M itself), per the contract."""
    skip_without_cuda_kernels()
    x = torch.rand(2, 3, 4, 5, dtype=torch.float64) + 0.5
    x[0, 0, 1, 2] = float("nan")
    x[1, 2, 3, 4] = float("inf")
    for layout in LAYOUTS:
        xl = x.float()
        if layout == "channels_last":
            xl = xl.contiguous(memory_format=torch.channels_last)
        out = gapkernels.global_gem_pool(xl.cuda(), 90.0, backend="cuda").cpu()
        assert torch.isnan(out[0, 0])
        assert out[1, 2] == float("inf")
        mask = torch.ones_like(out, dtype=torch.bool)
        mask[0, 0] = mask[1, 2] = False
        assert torch.isfinite(out[mask]).all()
