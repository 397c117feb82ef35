"""Every code path of the CPU kernels (csrc/cpu/), each with an input that makes the
path matter: docs/PATHS.md lists the paths, the function each lives in, and the test here that
drives it (and which deliberate bug each test catches).

The suite's other tests compare results on small random inputs, which leave most of these paths
either untaken or taken with data for which a wrong answer looks right (a tie of the maximum
never straddles two pieces of a split reduction; a skipped row of grad_x happens to hold zeros).
Here the inputs are shaped from the kernels' own splitting rules (mirrored below from the
constants of csrc/cpu/layout.h), and ties, NaNs and +-inf are planted on both sides of
every boundary the kernel cuts at: vector chunks and their overlapping tail, max blocks, row
blocks, pieces of a split reduction, thread ranges (1 and 2 threads).

Sizes: small C with long S, or wide C with moderate S, never both (CI has 2 cores).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import gapkernels
from gapkernels import reference
from helpers import TOLERANCES, assert_close

# ---------------------------------------------------------------------------------------------
# The kernels' geometry, mirrored from the constants of csrc/cpu/layout.h. If the
# kernel changes them, the tests still pass (they only decide where specials are planted), but
# they may stop straddling the new boundaries: keep these in step.
K_TARGET_TASKS = 64
K_MIN_TASK_ELEMENTS = 32768
K_MAX_RUN_PIECE = 1 << 22
K_MIN_CHANNELS_PIECE = 1 << 20
K_MAX_ROWS_PIECE = 1024
K_MAX_BLOCK_CHUNKS = 256
K_SUM_BLOCK_CHUNKS = 16
K_ROW_BLOCK = 16
K_BATCH = 16
K_MAX_LANE_RUN = 256
K_BACKWARD_NCS_PIECE = 1 << 18
K_BACKWARD_NSC_ELEMENTS = 1 << 20


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def width(dtype: torch.dtype) -> int:
    """W: elements per chunk (two accumulator vectors of 32 bytes): 16, or 8 for float64."""
    return 8 if dtype == torch.float64 else 16


def ncs_forward_piece_len(rows: int, s: int) -> int:
    """forward_ncs: length of the pieces a run is split into (== s when not split)."""
    pieces = cdiv(s, K_MAX_RUN_PIECE)
    if rows < K_TARGET_TASKS:
        pieces = max(pieces, min(cdiv(K_TARGET_TASKS, rows), cdiv(s, K_MIN_TASK_ELEMENTS)))
    return cdiv(cdiv(s, pieces), 16) * 16


def nsc_forward_rows(n: int, c: int, s: int) -> int:
    """forward_nsc: rows (spatial positions) per piece (== s when not split)."""
    pieces = cdiv(s, K_MAX_ROWS_PIECE)
    if n < K_TARGET_TASKS:
        pieces = max(pieces, min(cdiv(K_TARGET_TASKS, n), cdiv(s * c, K_MIN_CHANNELS_PIECE)))
    pieces = min(pieces, s)
    return cdiv(s, pieces)


def ncs_backward_piece_len(s: int) -> int:
    """backward_ncs: length of the pieces of a row (== s when not split)."""
    return cdiv(s, cdiv(s, K_BACKWARD_NCS_PIECE))


def nsc_backward_rows(c: int, s: int) -> int:
    """backward_nsc: rows per block (== s for one block)."""
    return min(s, max(cdiv(K_BACKWARD_NSC_ELEMENTS, c), 1))


def uses_lanes(op: str, dtype: torch.dtype, rows: int, s: int) -> bool:
    """forward_ncs_lanes: 16 rows per vector lane (every mode but AVG, float accumulators)."""
    return (
        op != "avg"
        and dtype != torch.float64
        and ncs_forward_piece_len(rows, s) >= s
        and 8 <= s <= K_MAX_LANE_RUN
    )


def run_boundaries(s: int, dtype: torch.dtype) -> list[int]:
    """Where reduce_run / grad_run cut a run of s: max blocks, the tail chunk (overlapping the
    last full chunk), the lane tiles of forward_ncs_lanes (8 wide, last one overlapping)."""
    w = width(dtype)
    cuts = set(range(K_MAX_BLOCK_CHUNKS * w, s, K_MAX_BLOCK_CHUNKS * w))
    cuts |= set(range(K_SUM_BLOCK_CHUNKS * w, s, K_SUM_BLOCK_CHUNKS * w * 4))
    if s >= w:
        cuts |= {s - s % w, s - w}
    if s >= 8:
        cuts |= {s - s % 8, s - 8}
    return sorted(b for b in cuts if 0 < b < s)


# ---------------------------------------------------------------------------------------------
# Inputs


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """Runs the test with 1 and with 2 threads, and restores the thread count afterwards. How a
    reduction is split never depends on it, but the ranges each thread gets (and so where row
    batches and cached coefficients start) do."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


SPECIALS = ("ties", "nans", "infs", "mixed_inf", "neg_inf", "constant", "random")


def plant(x3: torch.Tensor, cuts: list[int], gen: torch.Generator, kinds=SPECIALS) -> torch.Tensor:
    """Writes, into the float64 (N, C, S) tensor x3 (values from randn, |x| < ~5), one pattern
    per row, cycling through `kinds`, each placed on both sides of every cut in `cuts`:
    - ties: the maximum (8.0, exact in every dtype) at b - 1 and b for each cut b, and at S - 1;
      the first must win;
    - nans: NaN at b - 1 and b for each cut, and a number larger than any other at S - 1; the
      last NaN must win; rows alternate with a single NaN just after a cut;
    - infs: +inf at both sides of each cut (a tie of +inf);
    - mixed_inf: +inf and -inf (their sum is NaN: the NaN probes' false alarm);
    - neg_inf: every element -inf (index 0);
    - constant: every element equal (index 0);
    - random: left as it is.
    """
    n, c, s = x3.shape
    rows = x3.view(n * c, s)
    near = sorted({p for b in cuts for p in (b - 1, b) if 0 <= p < s})
    if len(near) < 2:
        # A short row has no cuts: still two ties / two NaNs in it, so that the first and the
        # last differ.
        near = sorted(set(near) | {p for p in (0, s // 2) if p < s - 1} or {0})
    for r in range(n * c):
        kind = kinds[r % len(kinds)]
        if kind == "ties":
            rows[r, near + [s - 1]] = 8.0
        elif kind == "nans":
            if (r // len(kinds)) % 2 == 0 or not near:
                rows[r, near + [s - 1]] = float("nan")
                if s > 1 and s - 2 not in near:
                    rows[r, s - 2] = 100.0
            else:
                rows[r, near[len(near) // 2]] = float("nan")
        elif kind == "infs":
            rows[r, near + [s - 1]] = float("inf")
        elif kind == "mixed_inf":
            rows[r, near[0] if near else 0] = float("-inf")
            rows[r, s - 1] = float("inf")
        elif kind == "neg_inf":
            rows[r, :] = float("-inf")
        elif kind == "constant":
            rows[r, :] = 0.5
    # A large value next to every cut, for the sums: an element counted twice or skipped at a
    # boundary moves the mean by about 20 / S, far beyond rounding.
    for r in range(n * c):
        if kinds[r % len(kinds)] == "random":
            rows[r, near] = 20.0 * torch.sign(torch.randn(len(near), generator=gen, dtype=x3.dtype))
    return x3


def random_rows(n, c, s, gen, cuts=None, kinds=SPECIALS, positive=False, below_eps=0.0):
    """(N, C, S) float64: randn with specials planted at `cuts`, or (positive) |randn| + 0.1 with
    a fraction `below_eps` of the elements set to -0.5 (GeM clamps them: no gradient)."""
    x3 = torch.randn(n, c, s, generator=gen, dtype=torch.float64)
    if positive:
        x3 = x3.abs() + 0.1
        x3[torch.rand(x3.shape, generator=gen) < below_eps] = -0.5
    elif cuts is not None:
        plant(x3, cuts, gen, kinds)
    return x3


def make_ncs(
    n,
    c,
    s,
    dtype,
    gen,
    cuts=None,
    kinds=SPECIALS,
    positive=False,
    offset=0,
    below_eps=0.0,
    device="cpu",
):
    """A contiguous (N, C, S) input (as (N, C, S, 1)), from random_rows; `offset` makes it a view
    starting `offset` elements into a larger buffer (a misaligned pointer)."""
    x3 = random_rows(n, c, s, gen, cuts, kinds, positive, below_eps)
    buf = torch.empty(x3.numel() + offset, dtype=dtype, device=device)
    buf[:offset] = 1.0
    x = buf[offset:].view(n, c, s, 1)
    x.copy_(x3.view(n, c, s, 1).to(device))
    assert x.is_contiguous() and x.storage_offset() == offset
    return x


def make_nsc(
    n,
    c,
    s,
    dtype,
    gen,
    cuts=None,
    kinds=SPECIALS,
    positive=False,
    offset=0,
    below_eps=0.0,
    device="cpu",
):
    """A channels_last (N, C, S, 1)-shaped input: the NSC layout, with the same options."""
    x3 = random_rows(n, c, s, gen, cuts, kinds, positive, below_eps)
    buf = torch.empty(x3.numel() + offset, dtype=dtype, device=device)
    buf[:offset] = 1.0
    nsc = buf[offset:].view(n, s, 1, c)
    nsc.copy_(x3.transpose(1, 2).reshape(n, s, 1, c).to(device))
    x = nsc.permute(0, 3, 1, 2)
    assert x.shape == (n, c, s, 1) and x.stride() == (s * c, 1, c, c) and c > 1 and s > 1
    return x


# ---------------------------------------------------------------------------------------------
# Checks

OPS = {
    "avg": lambda m, x, w: m.global_avg_pool(x),
    "max": lambda m, x, w: m.global_max_pool(x),
    "mixed": lambda m, x, w: m.global_mixed_pool(x, w),
    "catavgmax": lambda m, x, w: m.global_avgmax_pool(x, concat=True),
    "gem": lambda m, x, w: m.global_gem_pool(x, w, 1e-6),
}
MAX_OPS = ("max", "mixed", "catavgmax")


def default_weight(op, c, gen, kind="channel"):
    """alpha (mixed): per channel; p (gem): 3.0; others: None."""
    if op == "mixed":
        if kind == "scalar":
            return 0.3
        return 0.2 + 0.6 * torch.rand(c, generator=gen, dtype=torch.float32)
    if op == "gem":
        return 3.0
    return None


def check(op, x, weight, gen, grad_weight=False, msg="", backend="cpu"):
    """Forward and backward of `op` with the CPU kernels against gapkernels.reference on the same
    input: values (and, for max, the indices, exactly), grad_x (whose every element is compared,
    so an unwritten or misplaced element fails), and optionally the gradient to the weight.
    The output gradient is +-U(0.5, 1.5): never so small that a misplaced arg-max hides."""
    dtype = x.dtype
    xk = x.detach().requires_grad_(True)  # a view: keeps a misaligned storage offset
    xr = x.detach().clone().requires_grad_(True)
    wk = wr = weight
    if isinstance(weight, torch.Tensor):
        wk = weight.detach().clone().to(x.device).requires_grad_(grad_weight)
        wr = weight.detach().clone().to(x.device).requires_grad_(grad_weight)
    out = OPS[op](_Backend(backend), xk, wk)
    ref = OPS[op](reference, xr, wr)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, msg=f"{msg} {op} forward")
    if op == "max":
        _, idx = gapkernels.global_max_pool(x.detach(), True, backend=backend)
        _, idx_ref = reference.global_max_pool(x.detach(), True)
        assert torch.equal(idx, idx_ref), f"{msg} max indices\n{(idx != idx_ref).nonzero()}"
    g = torch.rand(out.shape, generator=gen, dtype=torch.float64) + 0.5
    g = torch.sign(torch.randn(out.shape, generator=gen, dtype=torch.float64)) * g
    g = g.to(x.device, dtype)
    inputs = [xk] + ([wk] if grad_weight else [])
    inputs_ref = [xr] + ([wr] if grad_weight else [])
    grads = torch.autograd.grad(out, inputs, g)
    grads_ref = torch.autograd.grad(ref, inputs_ref, g)
    assert same_strides(grads[0], xk), f"{msg} grad_x strides {grads[0].stride()} {xk.stride()}"
    assert_close_relative(grads[0], grads_ref[0], dtype, msg=f"{msg} {op} grad_x")
    if grad_weight:
        torch.testing.assert_close(
            grads[1],
            grads_ref[1],
            rtol=2e-4,
            atol=2e-5,
            msg=lambda m: f"{msg} {op} grad weight\n{m}",
        )


def same_strides(a, b):
    """Same strides in every dimension longer than 1 (a size-1 dimension's stride is free)."""
    return a.shape == b.shape and all(
        sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape, strict=True) if n > 1
    )


def assert_close_relative(actual, expected, dtype, msg=""):
    """assert_close with atol relative to the typical (median) magnitude of `expected`: grad_x
    of avg is g / S, far below the dtypes' absolute tolerances when S is large, so a row left
    unwritten (zeros) would pass an absolute tolerance."""
    rtol, atol = TOLERANCES[dtype]
    finite = expected[torch.isfinite(expected)].abs().double()
    typical = finite.median().item() if finite.numel() else 0.0
    # ... but never below the spacing of the dtype's subnormals (float16 gradients of long rows).
    finfo = torch.finfo(dtype)
    atol = max(atol * typical, finfo.smallest_normal * finfo.eps)
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{msg}\n{m}"
    )


class _Backend:
    """gapkernels' functions with `backend` bound, shaped like the reference module."""

    def __init__(self, backend):
        self.backend = backend

    def __getattr__(self, name):
        fn = getattr(gapkernels, name)
        return lambda *a, **k: fn(*a, backend=self.backend, **k)


# float16 takes the same code as bfloat16 (16-bit loads and stores, float accumulators); both
# are in test_ncs_split_pieces / test_nsc_split_ties_and_nans, where rounding to each differs.
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
OP_LIST = ["avg", "max", "mixed", "catavgmax", "gem"]


# ---------------------------------------------------------------------------------------------
# NCS forward: reduce_run (scalar runs below W, vector body, masked tail chunk, max blocks and
# resolve_block), forward_ncs_lanes / reduce_lanes (16 rows per lane, overlapping last tile,
# partial last group, NaN fallback), and backward: grad_run (scalar, body, overlapping tail).


# Run lengths by class, as functions of W.
NCS_LENGTHS = {
    "1": lambda w: 1,
    "5": lambda w: 5,
    "w-1": lambda w: w - 1,
    "w": lambda w: w,
    "w+1": lambda w: w + 1,
    "2w+3": lambda w: 2 * w + 3,
    "203": lambda w: 203,
    "257": lambda w: 257,
    "2blocks": lambda w: 2 * K_MAX_BLOCK_CHUNKS * w,
    "2blocks+w+3": lambda w: 2 * K_MAX_BLOCK_CHUNKS * w + w + 3,
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("length", NCS_LENGTHS)
@pytest.mark.parametrize("op", OP_LIST)
def test_ncs_runs_body_tail_blocks(op, length, dtype, gen):
    """NCS rows (N*C = 21: one full lane group of 16 plus 5 rows on their own) of every length
    class: scalar (S < W), exactly W, W +- 1 (a masked tail chunk overlapping the last full
    chunk), lane runs (8 <= S <= 256, S % 8 != 0: the last tile overlaps), just past the lane
    limit, and several max blocks with and without a tail. Ties, NaNs and infs straddle every
    chunk, tail, tile and block boundary."""
    s = NCS_LENGTHS[length](width(dtype))
    cuts = run_boundaries(s, dtype)
    positive = op == "gem"
    x = make_ncs(3, 7, s, dtype, gen, cuts, positive=positive)
    check(op, x, default_weight(op, 7, gen), gen, msg=f"S={s}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("s", [8, 13, 49, 256])
@pytest.mark.parametrize(
    "op,wkind", [("max", None), ("mixed", "channel"), ("mixed", "scalar"), ("catavgmax", None)]
)
def test_ncs_lanes_groups_and_threads(op, wkind, s, dtype, gen, threads):
    """forward_ncs_lanes: N*C = 16 * k + 5 rows, so that full groups (reduce_lanes) and the
    partial last group (reduce_run) both run, with enough groups that 2 threads split them. A
    row with a NaN or with +inf and -inf is reduced again by reduce_run (exact rule); ties must
    keep the first index (the lanes' strict compare)."""
    groups = max(3, 2 * cdiv(K_MIN_TASK_ELEMENTS, K_BATCH * s))
    rows = K_BATCH * groups + 5
    c = 7
    n = cdiv(rows, c)
    assert uses_lanes(op, dtype, n * c, s)
    x = make_ncs(n, c, s, dtype, gen, run_boundaries(s, dtype))
    check(op, x, default_weight(op, c, gen, wkind), gen, msg=f"S={s}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "n,c,s",
    [(1, 1, 3 * K_MIN_TASK_ELEMENTS + 37), (1, 2, 70000), (2, 7, 40000)],
    ids=["1row", "2rows", "14rows"],
)
@pytest.mark.parametrize("op", OP_LIST)
def test_ncs_split_pieces(op, n, c, s, dtype, gen, threads):
    """forward_ncs with few rows and long runs: each row is split into pieces (reduce_run each,
    indices shifted by the piece start) and merged in order by merge_and_finalize / merge_max.
    Ties of the maximum sit at the last element of a piece and the first of the next (the first
    must win), NaNs likewise (the last must win), a large value at each piece start (a shifted
    piece boundary moves the mean)."""
    piece = ncs_forward_piece_len(n * c, s)
    assert piece < s, "the shape must split"
    cuts = list(range(piece, s, piece)) + run_boundaries(s, dtype)
    x = make_ncs(n, c, s, dtype, gen, cuts, positive=op == "gem")
    check(op, x, default_weight(op, c, gen), gen, msg=f"piece={piece}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["avg", "max", "mixed", "catavgmax", "gem"])
def test_ncs_backward_split_rows(op, dtype, gen, threads):
    """backward_ncs with S > 2**18: each row's grad_x is written in pieces (grad_run with a
    start), the arg-max's local index found in its piece. The arg-max is placed on the last
    element of one piece, the first of the next, and in the overlapping tail chunk."""
    s = K_BACKWARD_NCS_PIECE + 3 * 16 + 5
    piece = ncs_backward_piece_len(s)
    assert piece < s
    n, c = 1, 3
    x3 = torch.randn(n, c, s, generator=gen, dtype=torch.float64)
    if op == "gem":
        x3 = x3.abs() + 0.1
    else:
        x3[0, 0, piece - 1] = 9.0
        x3[0, 1, piece] = 9.0
        x3[0, 2, s - 5] = 9.0
    x = x3.view(n, c, s, 1).to(dtype)
    check(op, x, default_weight(op, c, gen), gen)


@pytest.mark.parametrize("op", ["avg", "mixed", "gem"])
def test_ncs_row_batches_start_mid_channel(op, gen, threads):
    """forward_ncs (one piece) and backward_ncs hand rows to threads in ranges that need not
    start at channel 0: the per-channel weight and the batch of 16 rows (finalize,
    row_coefficients) must follow the range's own first row. S = 17 keeps the non-lane path for
    avg and a lane path otherwise; R = 287 * 7 = 2009 rows: with 2 threads the second range
    starts at row 1927 (avg, backward) or lane group 120 (row 1920), neither at channel 0."""
    x = make_ncs(287, 7, 17, torch.float32, gen, positive=True)
    check(op, x, default_weight(op, 7, gen), gen)


# ---------------------------------------------------------------------------------------------
# NSC forward (reduce_rows: scalar channels below W, reduce_channels / reduce_channels_max with
# full chunks and an overlapping masked tail chunk, row blocks of 16, NaN probe and rescan;
# forward_nsc's pieces and their merge) and backward (backward_nsc: scalar channels, vector
# chunks and tail, blocks of rows with the arg-max's local index, cached coefficients).


def _nsc_channels(dtype):
    w = width(dtype)
    return [3, w - 1, w + 1, 2 * w + 3]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c_index", range(4), ids=["C3", "Cw-1", "Cw+1", "C2w+3"])
@pytest.mark.parametrize("s", [5, 2 * K_ROW_BLOCK + 3, 1100])
@pytest.mark.parametrize("op", OP_LIST)
def test_nsc_channels_rows_pieces(op, s, c_index, dtype, gen):
    """NSC with C below, at and above W (scalar channels; full chunks; a masked tail chunk that
    overlaps the last full one), S within one row block, several row blocks, and S > 1024 (the
    forward splits S into pieces merged in order). Every pattern of `plant` sits on both sides
    of every row block and piece boundary."""
    c = _nsc_channels(dtype)[c_index]
    n = 2
    rows = nsc_forward_rows(n, c, s)
    cuts = sorted(set(range(K_ROW_BLOCK, s, K_ROW_BLOCK)) | set(range(rows, s, rows)))
    x = make_nsc(n, c, s, dtype, gen, cuts, positive=op == "gem")
    check(op, x, default_weight(op, c, gen), gen, msg=f"C={c} S={s}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "shape", [(2, 4, 64, 65), (2, 17, 40, 41), (1, 40, 48, 48)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("op", ["max", "mixed", "catavgmax"])
def test_nsc_split_ties_and_nans(op, shape, dtype, gen, threads):
    """forward_nsc split into pieces of rows, then merge_max: ties of the maximum in two pieces
    (the earlier piece must win), NaNs in several pieces (the last must win), +inf ties, +inf
    with -inf. (2, 4, 64, 65) is issue 19's shape: flipping merge_max's tie rule gave a wrong
    grad_x there and no test failed."""
    n, c = shape[:2]
    s = shape[2] * shape[3]
    rows = nsc_forward_rows(n, c, s)
    assert rows < s
    cuts = list(range(rows, s, rows))
    x = make_nsc(n, c, s, dtype, gen, cuts)
    check(op, x, default_weight(op, c, gen), gen, msg=f"rows={rows}")


@pytest.mark.parametrize(
    "n,c,s,dtype",
    [
        (1, 3, 350_000, torch.bfloat16),
        (1, 17, 61_781, torch.float32),
        (2, 520, 2_304, torch.bfloat16),
    ],
    ids=["C3", "C17", "C520"],
)
@pytest.mark.parametrize("op", ["avg", "max", "catavgmax", "gem"])
def test_nsc_backward_blocks(op, n, c, s, dtype, gen, threads):
    """backward_nsc with S > 2**20 / C: grad_x is written in blocks of rows (the issue's
    "wide-hw" path), for scalar channels (C = 3), one chunk and a tail (C = 17) and many chunks
    and a tail (C = 520), with N = 2 (C = 520) so that a thread's range crosses samples (the cached
    coefficients must be recomputed). The arg-max sits on the last row of a block and the first
    of the next; every grad_x element is compared (a skipped row holds garbage or zeros)."""
    rows = nsc_backward_rows(c, s)
    assert rows < s
    x3 = torch.randn(n, c, s, generator=gen, dtype=torch.float64)
    if op == "gem":
        x3 = x3.abs() + 0.1
    else:
        for ch in range(c):
            x3[ch % n, ch, (rows - 1 + ch % 2) % s] = 9.0
        x3[n - 1, 0, s - 1] = 9.0
    x = x3.transpose(1, 2).contiguous().view(n, s, 1, c).to(dtype).permute(0, 3, 1, 2)
    check(op, x, default_weight(op, c, gen), gen, msg=f"rows={rows}")


# ---------------------------------------------------------------------------------------------
# GeM's ways of raising to p: repeated multiplication unrolled (p = 1, 2, 3), at run time
# (4 <= p <= 8), exp(p * log x) (other p, and per-channel p that differ); the log-sum
# (with_log, when p requires grad). Compared where the plain and the max-relative formulas agree
# closely (p <= 9, values in [0.1, ~4]); values below eps get no gradient.

GEM_PATHS = {
    "ncs_run": lambda dt, g: make_ncs(2, 5, 300, dt, g, positive=True, below_eps=0.2),
    "ncs_lanes": lambda dt, g: make_ncs(3, 7, 49, dt, g, positive=True, below_eps=0.2),
    "ncs_short": lambda dt, g: make_ncs(3, 7, 5, dt, g, positive=True, below_eps=0.2),
    "nsc_scalar": lambda dt, g: make_nsc(2, 3, 50, dt, g, positive=True, below_eps=0.2),
    "nsc_chunks": lambda dt, g: make_nsc(2, width(dt) + 1, 50, dt, g, positive=True, below_eps=0.2),
}
GEM_POWERS = [1.0, 2.0, 3.0, 4.0, 9.0, 2.5, "channel", "channel_equal"]


def _gem_weight(p, c, gen):
    if p == "channel":
        return 1.5 + 3.0 * torch.rand(c, generator=gen, dtype=torch.float32)
    if p == "channel_equal":
        return torch.full((c,), 3.0)
    return p


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", GEM_PATHS)
@pytest.mark.parametrize("p", GEM_POWERS, ids=str)
def test_gem_powers(p, path, dtype, gen):
    """GeM's value and grad_x for every way of raising to p, on every path; a fifth of the
    elements are below eps (clamped: no gradient)."""
    x = GEM_PATHS[path](dtype, gen)
    c = x.shape[1]
    check("gem", x, _gem_weight(p, c, gen), gen, msg=f"p={p} {path}")


def _old_gem_kernel() -> bool:
    """True while the CPU kernel still computes the plain GeM (aux[..., 0] = mean(y**p)) rather
    than the max-relative one of docs/DESIGN.md (aux[..., 0] = M): the gradient to p, computed in
    Python from aux, then needs the kernel of the next commits."""
    x = torch.tensor([[[2.0, 1.0]]])
    _, aux, _ = torch.ops.gapkernels.pool_forward(x, 4, None, 1.0, 1e-6, True)
    return aux[0, 0, 0].item() != 2.0


@pytest.mark.parametrize("path", GEM_PATHS)
@pytest.mark.parametrize("p", [3.0, 2.5, "channel"], ids=str)
def test_gem_with_log_gradient_to_p(p, path, gen):
    """with_log (p requires grad): the log-sum statistic on every path, checked through the
    gradient to p."""
    if _old_gem_kernel():
        pytest.xfail(
            "the CPU kernel still has the plain GeM statistics (aux = mean(y**p)); "
            "the gradient to p needs the max-relative kernel (docs/DESIGN.md)"
        )
    x = GEM_PATHS[path](torch.float32, gen)
    c = x.shape[1]
    w = _gem_weight(p, c, gen)
    w = torch.tensor(w) if not isinstance(w, torch.Tensor) else w
    check("gem", x, w, gen, grad_weight=True, msg=f"p={p} {path}")


# ---------------------------------------------------------------------------------------------
# Misaligned data pointers: a view starting one element into a larger buffer (every load is
# unaligned; the lanes' 8-wide loads and the tail chunks included).


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["ncs", "ncs_lanes", "nsc"])
@pytest.mark.parametrize("op", OP_LIST)
def test_misaligned_views(op, layout, dtype, gen):
    w = width(dtype)
    if layout == "ncs":
        x = make_ncs(
            2,
            3,
            3 * w + 5,
            dtype,
            gen,
            run_boundaries(3 * w + 5, dtype),
            positive=op == "gem",
            offset=1,
        )
    elif layout == "ncs_lanes":
        x = make_ncs(
            3, 7, 45, dtype, gen, run_boundaries(45, dtype), positive=op == "gem", offset=1
        )
    else:
        x = make_nsc(
            2, w + 3, 37, dtype, gen, [K_ROW_BLOCK, 2 * K_ROW_BLOCK], positive=op == "gem", offset=1
        )
    assert x.data_ptr() % 32 != 0, "the view must start off a 32-byte (vector) boundary"
    check(op, x, default_weight(op, x.shape[1], gen), gen)


# ---------------------------------------------------------------------------------------------
# 64-bit offsets: every offset in the CPU kernels is int64 arithmetic; driving it needs a tensor
# over 2**31 elements (4 GiB in float16), too large for CI. Opt in with GAPKERNELS_TEST_HUGE=1.


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("GAPKERNELS_TEST_HUGE") != "1",
    reason="needs about 20 GiB of memory: set GAPKERNELS_TEST_HUGE=1",
)
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
def test_offsets_past_2_31_elements(layout):
    n, c, s = 2, 2, 2**29 + 3
    assert n * c * s > 2**31
    x3 = torch.zeros(n, c, s, dtype=torch.float16)
    x3[1, 1, s - 2] = 5.0
    x3[1, 0, 7] = 3.0
    x = x3.unsqueeze(-1)
    if layout == "nsc":
        x = x3.transpose(1, 2).contiguous().view(n, s, 1, c).permute(0, 3, 1, 2)
    values, idx = gapkernels.global_max_pool(x, True, backend="cpu")
    assert values[1].tolist() == [3.0, 5.0] and idx[1].tolist() == [7, s - 2]
    xr = x.detach().requires_grad_(True)
    gapkernels.global_avg_pool(xr, backend="cpu").sum().backward()
    assert math.isclose(xr.grad[1, 1, s - 1, 0].item(), 1.0 / s, rel_tol=1e-2)
