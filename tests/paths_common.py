"""The shared part of the CPU path tests (tests/test_paths_cpu_*.py; their inputs and checks are
also used by tests/test_paths_triton.py and tests/test_paths_cuda.py): the CPU kernels' geometry,
the inputs with specials planted at its boundaries, and the check against gapkernels.reference.
docs/PATHS.md lists the paths and the test that drives each.

The suite's other tests compare results on small random inputs, which leave most of the kernels'
paths either untaken or taken with data for which a wrong answer looks right (a tie of the
maximum never straddles two pieces of a split reduction; a skipped row of grad_x happens to hold
zeros). The path tests shape their inputs from the kernels' own splitting rules (mirrored below
from csrc/cpu/layout.h and csrc/cpu/vec.h), and plant ties, NaNs and +-inf on both sides of every
boundary the kernel cuts at: vector chunks and their overlapping tail, max blocks, row blocks,
pieces of a split reduction, thread ranges (1 and 2 threads).

Sizes: small C with long S, or wide C with moderate S, never both (CI has 2 cores).
"""

from __future__ import annotations

import pytest
import torch

import gapkernels
from gapkernels import _ext, reference
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
K_MIN_ROWS_MAX_RUN = 128
K_MIN_ROWS16_RUN = 64
K_BACKWARD_NCS_PIECE = 1 << 18
K_BACKWARD_NSC_ELEMENTS = 1 << 20
# ncs_forward_pieces rounds its piece length up to a multiple of 16 elements, whatever W is.
K_PIECE_ALIGN = 16


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def vector_bytes() -> int:
    """Bytes of one vector (csrc/cpu/simd.h's Vec) in the CPU kernels loaded in this process (the
    variant gapkernels/_ext.py chose: avx512 64, avx2 32, default 32, or 16 on aarch64).
    tests/test_cpu_isa.py runs these tests again under GAPKERNELS_CPU_CAPABILITY for every other
    variant this machine executes: the geometry follows."""
    return _ext.cpu_vector_bytes(_ext.cpu_variant or "default")


def width(dtype: torch.dtype) -> int:
    """W: elements per chunk, two vectors of the accumulator type (float for float16 and bfloat16,
    whose chunk is one vector of 16-bit values: vec.h's ChunkIO). avx2: 16 (8 for float64);
    avx512: 32 (16)."""
    acc_bytes = 8 if dtype == torch.float64 else 4
    return 2 * vector_bytes() // acc_bytes


def has_lanes() -> bool:
    """Whether the loaded variant has the NCS lanes path (ncs_forward.h's kLanes: 8-float vectors
    (avx2, x86's default: 8x8 tiles) or 16-float vectors (avx512: 16x8 tiles); not aarch64's)."""
    return vector_bytes() in (32, 64)


def ncs_forward_piece_len(rows: int, s: int) -> int:
    """forward_ncs: length of the pieces a run is split into (== s when not split)."""
    pieces = cdiv(s, K_MAX_RUN_PIECE)
    if rows < K_TARGET_TASKS:
        pieces = max(pieces, min(cdiv(K_TARGET_TASKS, rows), cdiv(s, K_MIN_TASK_ELEMENTS)))
    return cdiv(cdiv(s, pieces), K_PIECE_ALIGN) * K_PIECE_ALIGN


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


def uses_rows16(op: str, dtype: torch.dtype, s: int) -> bool:
    """Whether reduce_lanes goes row by row (short_rows16, first_equal_rows16) rather than one
    row per lane, with the max's index: avx512 only; AVG always, the modes with a max in
    float16/bfloat16 from K_MIN_ROWS_MAX_RUN on. (Without the index, the forward without grad of
    paths_common.check, the modes with a max go row by row too: avx512 16 rows at a time, or 8
    below K_MIN_ROWS16_RUN; avx2 8 at a time.)"""
    half = dtype in (torch.float16, torch.bfloat16)
    return vector_bytes() == 64 and (op == "avg" or (half and s >= K_MIN_ROWS_MAX_RUN))


def avg_rows() -> bool:
    """Whether AVG takes forward_ncs_lanes (row by row: avx512's short_rows16, avx2's
    sum_short_rows8); in the default variant it takes the run loop."""
    return _ext.cpu_variant in ("avx2", "avx512")


def uses_lanes(op: str, dtype: torch.dtype, rows: int, s: int) -> bool:
    """forward_ncs_lanes: 16 rows at a time (reduce_lanes: one row per vector lane, or row by row:
    uses_rows16, avg_rows) for every mode but AVG (AVG too with avx2 and avx512), float
    accumulators, in the variants with 8- or 16-float vectors."""
    return (
        has_lanes()
        and (op != "avg" or avg_rows())
        and dtype != torch.float64
        and ncs_forward_piece_len(rows, s) >= s
        and 8 <= s <= K_MAX_LANE_RUN
    )


def run_boundaries(s: int, dtype: torch.dtype) -> list[int]:
    """Where reduce_run / grad_run cut a run of s: max blocks, sum blocks, the tail chunk
    (overlapping the last full chunk), the lane tiles of forward_ncs_lanes (8 wide, last one
    overlapping) where the variant has them."""
    w = width(dtype)
    cuts = set(range(K_MAX_BLOCK_CHUNKS * w, s, K_MAX_BLOCK_CHUNKS * w))
    cuts |= set(range(K_SUM_BLOCK_CHUNKS * w, s, K_SUM_BLOCK_CHUNKS * w * 4))
    if s >= w:
        cuts |= {s - s % w, s - w}
    if s >= 8 and has_lanes():
        cuts |= {s - s % 8, s - 8}
    if vector_bytes() == 64 and s >= 16:
        cuts |= {s - s % 16, s - 16}  # avx512's rows: 16-element vectors, a masked rest
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


def make_rows(
    channels_last,
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
    """An (N, C, S, 1)-shaped input from random_rows, contiguous (NCS) or channels_last (NSC);
    `offset` makes it a view starting `offset` elements into a larger buffer (a misaligned
    pointer)."""
    x3 = random_rows(n, c, s, gen, cuts, kinds, positive, below_eps)
    buf = torch.empty(x3.numel() + offset, dtype=dtype, device=device)
    buf[:offset] = 1.0
    if not channels_last:
        x = buf[offset:].view(n, c, s, 1)
        x.copy_(x3.view(n, c, s, 1).to(device))
        assert x.is_contiguous() and x.storage_offset() == offset
        return x
    nsc = buf[offset:].view(n, s, 1, c)
    nsc.copy_(x3.transpose(1, 2).reshape(n, s, 1, c).to(device))
    x = nsc.permute(0, 3, 1, 2)
    assert x.shape == (n, c, s, 1) and x.stride() == (s * c, 1, c, c) and c > 1 and s > 1
    return x


def make_ncs(*args, **kwargs):
    """A contiguous (N, C, S) input (as (N, C, S, 1)): make_rows' options."""
    return make_rows(False, *args, **kwargs)


def make_nsc(*args, **kwargs):
    """A channels_last (N, C, S, 1)-shaped input: the NSC layout, make_rows' options."""
    return make_rows(True, *args, **kwargs)


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
    input: values with and without grad (the forward without its index: with_index=False), for
    max the indices, exactly, grad_x (whose every element is compared,
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
    # Nothing to differentiate: the modes with a max then skip their index (with_index=False).
    with torch.no_grad():
        out_nograd = OPS[op](_Backend(backend), x.detach(), weight)
    assert_close(out_nograd, ref, dtype, msg=f"{msg} {op} forward without grad")
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
