"""GeM on the CPU kernels, computed relative to each row's maximum (docs/DESIGN.md, "Modes").

Every path of the CPU kernels (csrc/cpu/) that reduces GeM is reached by one of SHAPES (the comments
say which, for float32 and float64), with inputs whose maximum keeps growing along the row (or
along a channel's rows), so that a running maximum that is moved wrongly, or not at all, in any
path, over-/underflows or gives a wrong value. Value, grad to x and grad to p are compared with
`gapkernels.reference` evaluated in float64 on the same (rounded) input.
"""

from __future__ import annotations

import math

import pytest
import torch

import gapkernels
from gapkernels import reference
from helpers import TOLERANCES

BACKEND = "cpu"
P_VALUES = [1.0, 2.0, 3.0, 4.5, 6.0, 7.5, 30.0, 90.0, 100.0]
EPS = 1e-6

# name: shape. float32 (16 lanes a chunk, 8 a vector) / float64 (8 and 4),
# contiguous / channels_last.
SHAPES = {
    # NCS: S < 8, scalar run. NSC: C < 16, scalar channels.
    "tiny": (2, 3, 1, 5),
    # NCS: S = 49, 16 rows per lane batch (float) plus 1 row alone; the last tile overlaps.
    # NSC: C = 11, scalar channels (float), one vector + masked tail (double).
    "short": (3, 11, 7, 7),
    # NCS: S = 8, one tile. NSC: C = 16, one full chunk, no tail; 16 rows: one row block.
    "eight": (2, 16, 2, 4),
    # NCS: S = 1517: vector run, register blocks of 4 chunks, single chunks, a masked tail.
    # NSC: C = 3 scalar channels.
    "run": (2, 3, 37, 41),
    # NCS: S = 33123 in 2 pieces, merged. NSC: C = 2 scalar channels, N = 1: 33 pieces.
    "pieces": (1, 2, 181, 183),
    # NCS: S = 49 in lanes, 5 batches. NSC: C = 40: two chunks and a masked tail; S = 49 rows:
    # 3 row blocks of 4 register blocks, then one row.
    "channels": (2, 40, 7, 7),
    # NCS: S = 1089 vector run (68 chunks and a 1-element tail). NSC: C = 24 (a chunk and a
    # masked tail), S = 1089 rows in 2 pieces (68 row blocks, the last of one row).
    "channel-pieces": (2, 24, 33, 33),
}
LAYOUTS = ["contiguous", "channels_last"]
DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.float16]


def gem_input(shape, dtype, layout, gen, scale=1.0):
    """Rows of four kinds, by channel: random normal (half of it clamped to eps), increasing
    along S (the maximum grows in every block, lane and piece), decreasing, and positive with a
    few spikes up to 1000x at random places. Returns x in `dtype` and `layout`."""
    n, c = shape[:2]
    s = math.prod(shape[2:])
    base = torch.randn((n, c, s), dtype=torch.float64, generator=gen)
    ramp = torch.linspace(-3.0, 3.0, s, dtype=torch.float64)
    spikes = torch.where(
        torch.rand((n, c, s), generator=gen, dtype=torch.float64) < 0.01,
        1000.0 * torch.rand((n, c, s), generator=gen, dtype=torch.float64),
        1.0,
    )
    kinds = [
        base,
        (base.abs() + 0.05) * ramp.exp(),
        (base.abs() + 0.05) * (-ramp).exp(),
        (base.abs() + 0.1) * spikes,
    ]
    kind = torch.arange(c) % 4
    x = torch.zeros_like(base)
    for k in range(4):
        x[:, kind == k] = kinds[k][:, kind == k]
    x = (scale * x).reshape(shape).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def make_p(p, kind, channels, gen, dtype=torch.float32):
    """p as a float, a () tensor or a (C,) tensor in [1, p] (learnable: with_log runs), in the
    acc dtype of x's `dtype` (float64's gradients to p need float64)."""
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    if kind == "float":
        return p
    if kind == "scalar":
        return torch.tensor(p, dtype=pdtype, requires_grad=True)
    w = 1.0 + (p - 1.0) * (1.0 - 0.1 * torch.rand(channels, generator=gen, dtype=pdtype))
    w[0] = p
    return w.requires_grad_(True)


def run_both(x, p, gen, g=None, eps=EPS):
    """(kernel, float64 reference) of value, grad_x, grad_p (None for a float p), and the
    reference grad_p under |g|: an upper bound of the size of the terms that add up to grad_p."""
    xk = x.detach().clone().requires_grad_(True)
    pk = p.detach().clone().requires_grad_(True) if isinstance(p, torch.Tensor) else p
    out = gapkernels.global_gem_pool(xk, pk, eps, backend=BACKEND)
    if g is None:
        g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(g.to(out.dtype))

    def ref(grad):
        xr = x.detach().double().requires_grad_(True)
        pr = p.detach().double().requires_grad_(True) if isinstance(p, torch.Tensor) else p
        o = reference.global_gem_pool(xr, pr, eps)
        o.backward(grad)
        return o, xr.grad, pr.grad if isinstance(p, torch.Tensor) else None

    o_ref, gx_ref, gp_ref = ref(g)
    gp_abs = None
    if isinstance(p, torch.Tensor):
        # Plus sum |g * out| / p: d out/d p = out * (l/(r p) - log(r)/p**2) is 0 for a constant
        # row, where l (about 0) is only as exact as the logarithms that add up to it.
        gp_abs = ref(g.abs())[2] + (g.abs() * o_ref.abs()).sum() / p.detach().min().double()
    gp = pk.grad if isinstance(p, torch.Tensor) else None
    return (out, xk.grad, gp), (o_ref, gx_ref, gp_ref), gp_abs


def check(x, p, gen, dtype, rtol_scale=1.0, g=None, eps=EPS):
    (out, gx, gp), (o_ref, gx_ref, gp_ref), gp_abs = run_both(x, p, gen, g, eps)
    rtol, atol = TOLERANCES[dtype]
    rtol *= rtol_scale
    assert torch.isfinite(out).all() and torch.isfinite(gx).all()
    torch.testing.assert_close(
        out, o_ref.to(dtype), rtol=rtol, atol=atol * o_ref.abs().max().item()
    )
    # grad_x: relative to the row's largest gradient (small ones are (y/M)**(p-1) of it).
    scale = gx_ref.abs().flatten(2).amax(dim=2).view(*gx_ref.shape[:2], *[1] * (x.dim() - 2))
    assert_close_scaled(gx, gx_ref, dtype, rtol, atol, scale)
    if gp is not None:
        assert torch.isfinite(gp).all()
        # grad_p adds up float32 statistics (aux) whatever x's dtype.
        rtol_p = (
            max(rtol, TOLERANCES[torch.float32][0] * rtol_scale) if dtype != torch.float64 else rtol
        )
        torch.testing.assert_close(
            gp, gp_ref.to(gp.dtype), rtol=rtol_p, atol=rtol_p * gp_abs.abs().max().item() + 1e-30
        )
    return out, o_ref


def assert_close_scaled(actual, expected, dtype, rtol, atol, scale):
    exp = expected.to(dtype).double()
    diff = (actual.double() - exp).abs()
    # Plus the spacing of subnormals (float16's gradients of long rows are subnormal).
    fi = torch.finfo(dtype)
    bound = rtol * exp.abs() + (atol + rtol) * scale + fi.tiny * fi.eps
    bad = ~(diff <= bound)
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} differ; worst "
        f"{(diff / bound)[bad].max().item():.3g}x the bound"
    )


# Large p raises the relative error of (y/M)**(p-1) by about p ulps of the acc dtype.
def rtol_for(p, dtype):
    return 1.0 if dtype in (torch.float16, torch.bfloat16) else max(1.0, p / 10.0)


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("pkind", ["float", "scalar", "channel"])
def test_matches_reference(pkind, shape, layout, dtype, p, gen):
    if dtype == torch.float16 and pkind != "float":
        pytest.skip("float16 runs with a float p only (the others are bfloat16's paths)")
    x = gem_input(shape, dtype, layout, gen)
    w = make_p(p, pkind, shape[1], gen, dtype)
    out, o_ref = check(x, w, gen, dtype, rtol_for(p, dtype))
    # The textbook formula, where it is finite and not underflowed (float64).
    plain = reference.global_gem_pool_plain(
        x.double(), w.detach().double() if pkind != "float" else w, EPS
    )
    ok = torch.isfinite(plain) & (plain > 1e-250)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(
        out[ok], plain[ok].to(dtype), rtol=rtol * rtol_for(p, dtype), atol=atol
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("p", [7.5, 90.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_dead_channel(dtype, p, shape, layout, gen):
    """A channel that is 0 everywhere (clamped to eps): value eps, finite gradients to x and a
    learnable p, as the reference gives them."""
    x = gem_input(shape, torch.float64, "contiguous", gen)
    x[:, 1] = 0.0
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    for kind in ("scalar", "channel"):
        w = make_p(p, kind, shape[1], gen, dtype)
        out, _ = check(x, w, gen, dtype, rtol_for(p, dtype))
        torch.testing.assert_close(
            out[:, 1].float(), torch.full((shape[0],), EPS), rtol=TOLERANCES[dtype][0], atol=0
        )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_constant_three_p90(dtype, shape, layout, gen):
    """x = 3 everywhere with p = 90: 3**90 overflows float32; GeM gives 3 and grad_x g/S."""
    x = torch.full(shape, 3.0, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    for w in (90.0, make_p(90.0, "scalar", shape[1], gen, dtype)):
        out, _ = check(x, w, gen, dtype, rtol_for(90.0, dtype))
        torch.testing.assert_close(out.float(), torch.full(out.shape, 3.0), rtol=1e-5, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("p", [3.0, 7.5, 90.0])
@pytest.mark.parametrize(
    "dtype,scale,eps",
    [
        (torch.float32, 1e30, EPS),
        (torch.float32, 1e-30, 1e-37),
        (torch.float64, 1e300, EPS),
        (torch.float64, 1e-300, 1e-305),
    ],
    ids=["f32-1e30", "f32-1e-30", "f64-1e300", "f64-1e-300"],
)
def test_large_and_small_inputs(dtype, scale, eps, p, shape, layout, gen):
    """Values near the ends of the dtype's range (eps below the small ones): x**p over- or
    underflows; y/M does not."""
    x = gem_input(shape, dtype, layout, gen, scale=scale)
    for kind in ("float", "scalar", "channel"):
        w = make_p(p, kind, shape[1], gen, dtype)
        out, _ = check(x, w, gen, dtype, rtol_for(p, dtype), eps=eps)
        assert (out > 0).all()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_max_at_one_place(where, shape, layout, gen):
    """One value far above the rest (1e6x) at the start, middle or end of every row: the other
    pieces/lanes/blocks are moved to it (their terms underflow to 0 at p = 30, as they should)."""
    n, c = shape[:2]
    s = math.prod(shape[2:])
    x = torch.rand((n, c, s), generator=gen, dtype=torch.float64) + 0.5
    pos = {"first": 0, "middle": s // 2, "last": s - 1}[where]
    x[:, :, pos] = 1e6 * (1.0 + torch.rand((n, c), generator=gen, dtype=torch.float64))
    x = x.reshape(shape).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    for p in (2.0, 30.0):
        for kind in ("float", "scalar", "channel"):
            check(x, make_p(p, kind, c, gen), gen, torch.float32, rtol_for(p, torch.float32))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_nan_and_inf(shape, layout, gen):
    """A NaN in a row gives M and the value NaN; +inf (without NaN) gives +inf; the other rows
    are untouched. aux = (M, r, l) as docs/DESIGN.md says."""
    n, c = shape[:2]
    s = math.prod(shape[2:])
    x = gem_input(shape, torch.float64, "contiguous", gen).view(n, c, s)
    x[0, 0, s // 3] = float("nan")
    x[-1, -1, s - 1] = float("inf")
    if c > 2:
        x[0, 1, 0] = float("inf")
        x[0, 1, s - 1] = float("nan")
    x = x.view(shape).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    for p in (3.0, 7.5):
        w = torch.full((c,), p)
        out = gapkernels.global_gem_pool(x, w, EPS, backend=BACKEND)
        ref = reference.global_gem_pool(x.double(), w.double(), EPS).float()
        torch.testing.assert_close(out, ref, rtol=2e-5, atol=0, equal_nan=True)
        assert out[0, 0].isnan() and out[-1, -1] == float("inf")
        if c > 2:
            assert out[0, 1].isnan()
        x3 = (
            x.flatten(2)
            if layout == "contiguous"
            else x.movedim(1, -1).reshape(n, s, c).transpose(1, 2)
        )
        _, aux, _ = torch.ops.gapkernels.pool_forward(x3, 4, w, 0.0, EPS, True)
        assert aux.shape == (n, c, 3)
        big_m = reference._flat(x, "NCHW").clamp(min=EPS).amax(dim=2)
        torch.testing.assert_close(aux[..., 0], big_m, rtol=0, atol=0, equal_nan=True)
        finite = torch.isfinite(big_m)
        assert ((aux[..., 1] >= 1.0 / s * (1 - 1e-5)) & (aux[..., 1] <= 1 + 1e-5))[finite].all()
        assert (aux[..., 2] <= 1e-6)[finite].all()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "shape",
    [SHAPES["pieces"], SHAPES["channel-pieces"], SHAPES["short"]],
    ids=["pieces", "channel-pieces", "short"],
)
@pytest.mark.parametrize("p", [3.0, 7.5])
def test_deterministic(p, shape, layout, gen):
    """Bitwise the same value and gradients on a second run (data-dependent rescaling included)."""
    x = gem_input(shape, torch.float32, layout, gen)
    w = make_p(p, "channel", shape[1], gen)
    g = torch.randn((shape[0], shape[1]), generator=gen)
    results = []
    for _ in range(2):
        xk = x.clone().requires_grad_(True)
        wk = w.detach().clone().requires_grad_(True)
        out = gapkernels.global_gem_pool(xk, wk, EPS, backend=BACKEND)
        out.backward(g)
        results.append((out, xk.grad, wk.grad))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("p", [1.0, 3.0, 7.5])
@pytest.mark.parametrize("dtype,top", [(torch.float32, 1e38), (torch.float64, 1e307)], ids=str)
def test_near_largest_finite(dtype, top, p, shape, layout, gen):
    """Values up to about the largest finite one: whatever the kernel keeps relative to, it must
    not round up to inf (a float p: the gradient to p itself would overflow the dtype)."""
    n, c = shape[:2]
    x = (top * (0.1 + torch.rand(shape, generator=gen, dtype=torch.float64))).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out, _ = check(x, p, gen, dtype, rtol_for(p, dtype))
    assert torch.isfinite(out).all() and (out > 0).all()
