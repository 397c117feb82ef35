"""Stable GeM in the Triton kernels (docs/DESIGN.md "Modes"): statistics relative to the row
maximum, against a float64 reference, on every path (split and not, both layouts); the aux
contract; NaN and inf. Set-up: tests/triton_common.py."""

from __future__ import annotations

import pytest
import torch
from triton_common import DEVICE, TRITON_MARKS, gk_triton, view_3d

import gapkernels
from gapkernels import reference
from gapkernels.triton import configs
from helpers import assert_close

pytestmark = TRITON_MARKS

GEM_PATHS = {
    "small": ((2, 4, 5, 6), "contiguous"),
    "small_nsc": ((2, 4, 5, 6), "channels_last"),
    "ncs_split": ((1, 4, 96, 96), "contiguous"),
    "nsc_split": ((1, 4, 128, 130), "channels_last"),
}


def test_gem_paths_take_their_paths():
    for path, (shape, layout) in GEM_PATHS.items():
        n, c, s = shape[0], shape[1], shape[2] * shape[3]
        split = configs.forward_config(n, c, s, layout == "channels_last").s_programs > 1
        assert split == path.endswith("split"), path


def _gem_input(shape, layout, gen, dtype=torch.float32, large=1e30):
    """Channel 0 dead (all zeros), 1 large (x**p overflows float32 for p >= 2), 2 constant 3,
    3 random with values below eps (clamped) and above; more channels random."""
    x = torch.randn(shape, dtype=torch.float64, generator=gen)
    x[:, 0] = 0.0
    x[:, 1] = (x[:, 1].abs() + 0.5) * large
    x[:, 2] = 3.0
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(DEVICE)  # (on the GPU: the first GPU run found these tests built CPU inputs)


def _gem_p(kind, channels):
    if kind == "float":
        return 90.0
    return torch.linspace(1.0, 100.0, channels, dtype=torch.float32).to(DEVICE)


def _gem_triton_and_reference(x, p, eps=1e-6):
    """(out, grad_x, grad_p) from the Triton backend and from the reference in float64."""
    x = x.detach().requires_grad_()
    p_t = p.detach().clone().requires_grad_() if isinstance(p, torch.Tensor) else p
    out = gapkernels.global_gem_pool(x, p_t, eps, backend="triton")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out)
    grads = torch.autograd.grad(out, [x] + ([p_t] if isinstance(p, torch.Tensor) else []), g)
    x64 = x.detach().double().requires_grad_()
    p64 = p.detach().double().requires_grad_() if isinstance(p, torch.Tensor) else p
    ref = reference.global_gem_pool(x64, p64, eps)
    ref_grads = torch.autograd.grad(
        ref, [x64] + ([p64] if isinstance(p, torch.Tensor) else []), g.double()
    )
    return (out, *grads), (ref, *ref_grads)


@pytest.mark.parametrize("p_kind", ["float", "channel"])
@pytest.mark.parametrize("path", GEM_PATHS)
def test_gem_stable_against_float64_reference(path, p_kind, gen):
    shape, layout = GEM_PATHS[path]
    x = _gem_input(shape, layout, gen)
    p = _gem_p(p_kind, shape[1])
    (out, grad_x, *grad_p), (ref, ref_grad_x, *ref_grad_p) = _gem_triton_and_reference(x, p)
    for t in (out, grad_x, *grad_p):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(out, ref.float(), rtol=2e-5, atol=0)
    assert torch.equal(out[:, 2], torch.full_like(out[:, 2], 3.0)), "x = 3 gives 3 for any p"
    torch.testing.assert_close(out[:, 0], torch.full_like(out[:, 0], 1e-6), rtol=1e-6, atol=0)
    # grad_x: (x/M)**(p-1) with p up to 100, a few float32 roundings of the exponent
    scale = ref_grad_x.abs().amax(dim=(2, 3), keepdim=True).clamp(min=1e-30)
    torch.testing.assert_close(grad_x.double() / scale, ref_grad_x / scale, rtol=1e-4, atol=1e-6)
    assert (grad_x[:, 0] == 0).all(), "a dead channel gets no gradient"
    if grad_p:
        torch.testing.assert_close(grad_p[0].double(), ref_grad_p[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", ["small", "nsc_split"])
def test_gem_stable_half_precision(path, dtype, gen):
    shape, layout = GEM_PATHS[path]
    x = _gem_input(shape, layout, gen, dtype, large=5e3 if dtype == torch.float16 else 1e30)
    (out, grad_x, grad_p), (ref, ref_grad_x, ref_grad_p) = _gem_triton_and_reference(
        x, _gem_p("channel", shape[1])
    )
    assert torch.isfinite(out).all() and torch.isfinite(grad_x).all()
    assert_close(out, ref.to(dtype), dtype)
    assert (out[:, 2] == 3).all()
    scale = ref_grad_x.abs().amax(dim=(2, 3), keepdim=True).clamp(min=1e-30)
    torch.testing.assert_close(
        grad_x.double() / scale, ref_grad_x / scale, rtol=TOL_HALF[dtype], atol=TOL_HALF[dtype]
    )
    torch.testing.assert_close(grad_p.double(), ref_grad_p, rtol=1e-3, atol=1e-5)


TOL_HALF = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("p", [1.0, 3.0, 100.0])
@pytest.mark.parametrize("path", GEM_PATHS)
def test_gem_aux_is_the_contract(path, p, gen):
    """aux = [M, r, l] (with_log) or [M, r]: M = max clamp(x, eps), r = mean (y/M)**p,
    l = mean (y/M)**p * log(y/M), on the op itself."""
    shape, layout = GEM_PATHS[path]
    x = _gem_input(shape, layout, gen)
    x3 = view_3d(x, layout)
    y = x3.double().clamp(min=torch.tensor(1e-6).item())
    y = torch.where(x3.double() < 1e-6, torch.tensor(1e-6, dtype=torch.float32).item(), y)
    big_m = y.amax(dim=2)
    z = y / big_m[..., None]
    r = z.pow(p).mean(dim=2)
    lg = (z.pow(p) * z.log()).mean(dim=2)
    for with_log in (False, True):
        out, aux, _ = gk_triton.pool_forward(x3, 4, None, p, 1e-6, with_log)
        assert aux.shape == (*x3.shape[:2], 3 if with_log else 2) and aux.dtype == torch.float32
        torch.testing.assert_close(aux[..., 0].double(), big_m, rtol=0, atol=0)
        torch.testing.assert_close(aux[..., 1].double(), r, rtol=2e-5, atol=1e-9)
        if with_log:
            torch.testing.assert_close(aux[..., 2].double(), lg, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(out.double(), big_m * r.pow(1 / p), rtol=2e-5, atol=0)


def test_gem_nan_and_inf():
    """NaN propagates to out; +inf gives +inf (out = M); NaN x gets a zero gradient."""
    x = torch.rand(2, 3, 4, 5, device=DEVICE) + 0.5
    x[0, 0, 1, 2] = float("nan")
    x[0, 1, 3, 3] = float("inf")
    x.requires_grad_()
    out = gapkernels.global_gem_pool(x, 3.0, backend="triton")
    assert torch.isnan(out[0, 0]) and out[0, 1] == float("inf")
    ref = reference.global_gem_pool(x.detach(), 3.0)
    assert_close(out.detach(), ref, torch.float32)
    (grad,) = torch.autograd.grad(out[1].sum(), x)
    assert grad[0, 0, 1, 2] == 0
    assert torch.isfinite(grad[1]).all()
