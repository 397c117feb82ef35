"""Every code path of the Triton kernels (gapkernels/triton/kernels.py, launch geometry from
gapkernels/triton/configs.py) with an input that makes it matter; docs/PATHS.md lists them.

Runs in Triton's interpreter without a GPU (TRITON_INTERPRET=1, set here when this module is the
first to import gapkernels.triton, as in tests/test_triton.py), compiled with one. Sizes are
small: the interpreter runs every program in numpy. The geometry comes from configs itself, so
specials (ties, NaNs, +-inf) are planted on both sides of the boundaries the launch really
has: lanes of a tile, steps of the loop over S, pieces of a split S, blocks of rows/channels.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from paths_common import (  # noqa: E402
    OPS,
    _Backend,
    assert_close_relative,
    plant,
    same_strides,
)

from gapkernels import reference  # noqa: E402
from helpers import assert_close  # noqa: E402

gk_triton = pytest.importorskip("gapkernels.triton", reason="Triton is not installed")
from gapkernels.triton import configs  # noqa: E402

DEVICE = "cpu" if gk_triton.INTERPRETED else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytestmark = [
        pytest.mark.skip(
            reason="gapkernels.triton was imported without TRITON_INTERPRET=1 and there is no GPU; "
            "run pytest with TRITON_INTERPRET=1 set"
        )
    ]
pytestmark = [
    *globals().get("pytestmark", []),
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

TRITON = _Backend("triton")


def triton_input(n, c, s, dtype, gen, channels_last, cuts=(), positive=False, offset=0):
    """(N, C, S, 1)-shaped input, NCS or NSC, specials planted at `cuts` (plant of
    paths_common), optionally a view `offset` elements into a larger buffer."""
    x3 = torch.randn(n, c, s, generator=gen, dtype=torch.float64)
    if positive:
        x3 = x3.abs() + 0.1
    else:
        plant(x3, list(cuts), gen)
    buf = torch.empty(x3.numel() + offset, dtype=dtype, device=DEVICE)
    if channels_last:
        view = buf[offset:].view(n, s, 1, c)
        view.copy_(x3.transpose(1, 2).reshape(n, s, 1, c))
        return view.permute(0, 3, 1, 2)
    view = buf[offset:].view(n, c, s, 1)
    view.copy_(x3.view(n, c, s, 1))
    return view


def geometry_cuts(n, c, s, channels_last):
    """Spatial offsets where the forward and backward launches cut S: loop steps (BLOCK_S),
    pieces of a split forward, pieces of the backward."""
    fwd = configs.forward_config(n, c, s, channels_last)
    bwd = configs.backward_config(n, c, s, channels_last)
    cuts = set(range(fwd.block_s, s, fwd.block_s))
    cuts |= set(range(fwd.s_per_program, s, fwd.s_per_program))
    cuts |= set(range(bwd.s_per_program, s, bwd.s_per_program))
    return sorted(cuts), fwd, bwd


def check(op, x, weight, gen, grad_weight=False, msg=""):
    """Triton against the reference on the same input: value, max indices exactly, grad_x
    (relative to its typical magnitude), optionally the gradient to the weight."""
    dtype = x.dtype
    xk = x.detach().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    wk = wr = weight
    if isinstance(weight, torch.Tensor):
        wk = weight.detach().clone().to(DEVICE).requires_grad_(grad_weight)
        wr = weight.detach().clone().to(DEVICE).requires_grad_(grad_weight)
    out = OPS[op](TRITON, xk, wk)
    ref = OPS[op](reference, xr, wr)
    assert_close(out, ref, dtype, msg=f"{msg} {op} forward")
    if op == "max":
        _, idx = TRITON.global_max_pool(x.detach(), True)
        _, idx_ref = reference.global_max_pool(x.detach(), True)
        assert torch.equal(idx, idx_ref), f"{msg} max indices"
    g = torch.rand(out.shape, generator=gen, dtype=torch.float64) + 0.5
    g = (g * torch.sign(torch.randn(out.shape, generator=gen, dtype=torch.float64))).to(out)
    inputs, inputs_ref = [xk], [xr]
    if grad_weight:
        inputs, inputs_ref = [xk, wk], [xr, wr]
    grads = torch.autograd.grad(out, inputs, g)
    grads_ref = torch.autograd.grad(ref, inputs_ref, g)
    assert same_strides(grads[0], xk)
    assert_close_relative(grads[0], grads_ref[0], dtype, msg=f"{msg} {op} grad_x")
    if grad_weight:
        torch.testing.assert_close(grads[1], grads_ref[1], rtol=2e-4, atol=2e-5)


def weight_for(op, c, gen, kind):
    if op not in ("mixed", "gem"):
        return None
    base = 0.3 if op == "mixed" else 3.0
    if kind == "scalar":
        return base
    if kind == "shared":
        return torch.tensor(base + 0.1)
    return base + 0.5 * torch.rand(c, generator=gen, dtype=torch.float32)


# Each path: the kernels' shapes that take it (N, C, S, channels_last), and what the launch
# geometry must show for it. The first candidate that takes the path under the current
# configs is used, so that a re-tuned configs.py still gets every path driven (and
# test_shapes_take_their_paths fails, naming the path, when no candidate does any more).
# TARGET_PROGRAMS is lowered for these tests (fixture `few_programs`): with the real value
# (264) a launch with more than one NCS row per program has >= 264 programs, each run in numpy
# by the interpreter. The code paths are the same; only the sizes that reach them shrink.
SMALL_TARGET_PROGRAMS = 4
PATHS = {
    # NCS, one tile wider than S (masked lanes).
    "ncs_one_tile": (
        [(2, 3, 37, False), (2, 3, 50, False)],
        lambda n, c, s, f, b: f.block_s > s and f.s_programs == 1,
    ),
    # NCS, the loop over S takes several steps, the last one masked.
    "ncs_loop": (
        [(1, 3, 1500, False), (1, 3, 700, False), (1, 3, 300, False)],
        lambda n, c, s, f, b: f.block_s < s and s % f.block_s and f.s_programs == 1,
    ),
    # NCS, S split over programs + pool_combine_kernel; backward in several pieces.
    "ncs_split": (
        [(1, 2, 9216 + 77, False), (1, 2, 20000 + 77, False)],
        lambda n, c, s, f, b: f.s_programs > 1 and b.s_programs > 1,
    ),
    # NCS, ROWS > 1 rows per program with the last block of rows masked (N*C % ROWS != 0).
    "ncs_rows_masked": (
        [(3, 7, 5, False), (7, 111, 5, False), (7, 111, 3, False)],
        lambda n, c, s, f, b: f.rows > 1 and (n * c) % f.rows,
    ),
    # NSC, a channel block with masked channels, one tile.
    "nsc_masked_channels": (
        [(2, 20, 30, True), (2, 72, 30, True)],
        lambda n, c, s, f, b: c % f.rows and f.s_programs == 1,
    ),
    # NSC, S split + combine, several backward pieces.
    "nsc_split": (
        [(1, 20, 4000, True), (1, 20, 20000, True)],
        lambda n, c, s, f, b: f.s_programs > 1 and b.s_programs > 1,
    ),
    # NSC with fewer channels than a channel block.
    "nsc_c3": ([(2, 3, 700, True)], lambda n, c, s, f, b: f.rows > 3),
}


def shape_for(path):
    """(N, C, S, channels_last) of the first candidate that takes `path`; None if none does."""
    candidates, takes = PATHS[path]
    for n, c, s, cl in candidates:
        if takes(
            n, c, s, configs.forward_config(n, c, s, cl), configs.backward_config(n, c, s, cl)
        ):
            return n, c, s, cl
    return None


@pytest.fixture(autouse=True)
def few_programs(monkeypatch):
    monkeypatch.setattr(configs, "TARGET_PROGRAMS", SMALL_TARGET_PROGRAMS)


def test_shapes_take_their_paths():
    missing = [path for path in PATHS if shape_for(path) is None]
    assert not missing, f"no candidate shape takes these paths any more: {missing}"


# Every path in float32; the paths that combine maxima across lanes and pieces also in the
# 16-bit dtypes, where ties of the maximum are common.
PATH_DTYPES = [(p, torch.float32) for p in PATHS] + [
    (p, dt) for p in ("ncs_split", "nsc_split") for dt in (torch.float16, torch.bfloat16)
]


@pytest.mark.parametrize("path,dtype", PATH_DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("op", ["avg", "max", "mixed", "catavgmax", "gem"])
def test_paths_with_specials(op, path, dtype, gen):
    """Every path, with ties (first index wins, across lanes by _combine_lanes and across
    pieces by pool_combine_kernel), NaNs (the last wins), +inf ties, +inf with -inf, all -inf
    rows, on both sides of every loop step and piece boundary."""
    n, c, s, cl = shape_for(path)
    cuts, _, _ = geometry_cuts(n, c, s, cl)
    x = triton_input(n, c, s, dtype, gen, cl, cuts, positive=op == "gem")
    check(op, x, weight_for(op, c, gen, "channel"), gen, msg=path)


@pytest.mark.parametrize("path", ["ncs_one_tile", "ncs_split", "nsc_split"])
@pytest.mark.parametrize(
    "op,kind",
    [
        ("mixed", "scalar"),
        ("mixed", "shared"),
        ("gem", "scalar"),
        ("gem", "shared"),
        ("gem", "channel"),
    ],
)
def test_weight_kinds(op, kind, path, gen):
    """WEIGHT_SCALAR / WEIGHT_SHARED / WEIGHT_PER_CHANNEL in forward, combine and backward."""
    n, c, s, cl = shape_for(path)
    x = triton_input(
        n, c, s, torch.float32, gen, cl, geometry_cuts(n, c, s, cl)[0], positive=op == "gem"
    )
    check(op, x, weight_for(op, c, gen, kind), gen, msg=path)


@pytest.mark.parametrize("path", ["ncs_one_tile", "ncs_split", "nsc_split"])
@pytest.mark.parametrize("kind", ["shared", "channel"])
def test_gem_with_log(kind, path, gen):
    """WITH_LOG (p requires grad): the log-sum lanes, their split partials and combine, checked
    through the gradient to p."""
    n, c, s, cl = shape_for(path)
    x = triton_input(n, c, s, torch.float32, gen, cl, positive=True)
    check("gem", x, weight_for("gem", c, gen, kind), gen, grad_weight=True, msg=path)


@pytest.mark.parametrize("path", ["ncs_loop", "nsc_c3"])
@pytest.mark.parametrize("op", ["max", "mixed", "gem"])
def test_misaligned_view(op, path, gen):
    """A view one element into a larger buffer (on a GPU: no 16-byte pointer specialization)."""
    n, c, s, cl = shape_for(path)
    x = triton_input(
        n,
        c,
        s,
        torch.float16,
        gen,
        cl,
        geometry_cuts(n, c, s, cl)[0],
        positive=op == "gem",
        offset=1,
    )
    assert x.storage_offset() == 1
    check(op, x, weight_for(op, c, gen, "channel"), gen, msg=path)
