"""GeM's per-element log and exp in the CPU kernels (csrc/cpu/simd.h: vec_log, vec_exp, inline
polynomials of about 1 ulp in the AVX2 and AVX-512 variants, the C library's elsewhere), held
to float64 at a tolerance a wrong coefficient or a wrong range reduction cannot meet (the
suite's other GeM tests use the float32 tolerances of the whole op).

Every path that takes a log or exp per element: the forward's log statistic (`with_log`, a
learnable p) and a non-integral p, on the NCS run, NCS lanes and NSC chunk paths, one p or one per
channel; the backward's (x/M)**(p-1) with a non-integral p. Inputs span many binades (so the
mantissa reduction meets every exponent) and include values below eps (their z is tiny, its log
near -100), negative ones (the backward's log of a negative z: the vector takes the polynomials'
general form, simd.h's log_any) and the special values (NaN, +-inf rows are left to
test_gem_stable_cpu.py; here a NaN lane among finite ones, whose vector takes the general form).
"""

from __future__ import annotations

import pytest
import torch

import gapkernels  # noqa: F401  (registers the ops)

GEM = 4
EPS = 1e-6
# Float32 results of sums of ~1000 terms each within ~1 ulp: a few 1e-6 relative at most.
RTOL = 2e-5

# (N, C, S): NCS rows the lanes path reduces (8 <= S <= 256), long NCS rows (run path, several
# chunks and a tail), and the same shapes channels_last (NSC chunks with a tail).
SHAPES = {"lanes": (2, 24, 49), "run": (2, 5, 1000), "nsc": (2, 40, 37)}


def view3(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x (N, C, S) as the kernels' 3-D view: NCS, or NSC strides (S*C, 1, C)."""
    if layout == "ncs":
        return x.contiguous()
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def inputs(shape, gen) -> torch.Tensor:
    """Magnitudes from 1e-4 to 1e3 with both signs (the negatives clamp to eps)."""
    mag = torch.exp(torch.empty(shape, dtype=torch.float64).uniform_(-9, 7, generator=gen))
    sign = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.3, -1.0, 1.0)
    return (mag * sign).float()


def reference(x: torch.Tensor, p: torch.Tensor):
    """M, r, l (docs/DESIGN.md, "Modes") and out in float64; p broadcast per channel."""
    y = x.double().clamp(min=EPS)
    big_m = y.amax(dim=2, keepdim=True)
    z = y / big_m
    pc = p.double().reshape(1, -1, 1)
    zp = z**pc
    r = zp.mean(dim=2)
    lg = (zp * torch.log(z)).mean(dim=2)
    out = big_m.squeeze(2) * r ** (1 / pc.squeeze(2))
    return big_m.squeeze(2), r, lg, out


def p_values(kind: str, c: int, gen) -> tuple[torch.Tensor | None, float, torch.Tensor]:
    """(weight, scalar, p per channel) for the op."""
    if kind == "scalar":
        return None, 2.5, torch.full((c,), 2.5)
    if kind == "learnable":
        return torch.tensor([3.0]), 0.0, torch.full((c,), 3.0)
    per_channel = torch.empty(c).uniform_(1.2, 6.7, generator=gen)
    return per_channel, 0.0, per_channel


def case(layout_path: str, p_kind: str, gen):
    """x (N, C, S) float32, its 3-D view for the path, weight, scalar, p per channel."""
    shape = SHAPES[layout_path]
    x = inputs(shape, gen)
    weight, scalar, p = p_values(p_kind, shape[1], gen)
    return x, view3(x, "nsc" if layout_path == "nsc" else "ncs"), weight, scalar, p


@pytest.mark.parametrize("layout_path", ["lanes", "run", "nsc"])
@pytest.mark.parametrize("p_kind", ["scalar", "learnable", "channel"])
def test_forward_log_and_power_match_float64(layout_path, p_kind):
    x, x3, weight, scalar, p = case(layout_path, p_kind, torch.Generator().manual_seed(0))
    out, aux, _ = torch.ops.gapkernels.pool_forward(x3, GEM, weight, scalar, EPS, True)
    big_m, r, lg, expected = reference(x, p)
    torch.testing.assert_close(aux[..., 0].double(), big_m, rtol=0, atol=0)
    torch.testing.assert_close(aux[..., 1].double(), r, rtol=RTOL, atol=0)
    # l sums terms that are all <= 0: no cancellation.
    torch.testing.assert_close(aux[..., 2].double(), lg, rtol=RTOL, atol=1e-7)
    torch.testing.assert_close(out.double(), expected, rtol=RTOL, atol=0)


@pytest.mark.parametrize("layout_path", ["lanes", "run", "nsc"])
@pytest.mark.parametrize("p_kind", ["scalar", "channel"])
def test_backward_power_matches_float64(layout_path, p_kind):
    gen = torch.Generator().manual_seed(1)
    x, x3, weight, scalar, p = case(layout_path, p_kind, gen)
    out, aux, indices = torch.ops.gapkernels.pool_forward(x3, GEM, weight, scalar, EPS, False)
    grad_out = torch.randn(out.shape, generator=gen)
    grad_x = torch.ops.gapkernels.pool_backward(
        grad_out, x3, aux, indices, GEM, weight, scalar, EPS
    )
    big_m, r, _, _ = reference(x, p)
    pc = p.double().reshape(1, -1, 1)
    scale = grad_out.double().unsqueeze(2) * r.unsqueeze(2) ** (1 / pc - 1) / x.shape[2]
    xd = x.double()
    expected = torch.where(xd >= EPS, scale * (xd / big_m.unsqueeze(2)) ** (pc - 1), 0.0)
    torch.testing.assert_close(grad_x.double(), expected, rtol=RTOL, atol=1e-30)


def test_nan_lane_takes_the_fallback():
    """A NaN among finite values: that vector's log takes the general form, and the row is NaN
    (M = NaN); the other rows keep the polynomial's accuracy."""
    gen = torch.Generator().manual_seed(2)
    shape = SHAPES["run"]
    x = inputs(shape, gen)
    x[0, 1, 517] = float("nan")
    out, aux, _ = torch.ops.gapkernels.pool_forward(x, GEM, torch.tensor([3.0]), 0.0, EPS, True)
    assert torch.isnan(out[0, 1]) and torch.isnan(aux[0, 1, 0])
    finite = torch.ones(shape[:2], dtype=torch.bool)
    finite[0, 1] = False
    _, r, lg, expected = reference(x.nan_to_num(0.0), torch.full((shape[1],), 3.0))
    torch.testing.assert_close(out[finite].double(), expected[finite], rtol=RTOL, atol=0)
    torch.testing.assert_close(aux[..., 2][finite].double(), lg[finite], rtol=RTOL, atol=1e-7)
