"""The NSC (channels_last) paths of the CPU kernels, forward and backward, each with an input
that makes the path matter (docs/PATHS.md lists them; the geometry and the checks are in
tests/paths_common.py). Forward: reduce_rows (scalar channels below W, reduce_channels /
reduce_channels_max with full chunks and an overlapping masked tail chunk, row blocks of 16, NaN
probe and rescan), forward_nsc's pieces and their merge. Backward: backward_nsc (scalar channels,
vector chunks and tail, blocks of rows with the arg-max's local index, cached coefficients)."""

from __future__ import annotations

import pytest
import torch
from paths_common import (  # noqa: F401  (threads: a fixture)
    DTYPES,
    K_BACKWARD_NSC_ELEMENTS,
    K_ROW_BLOCK,
    OP_LIST,
    cdiv,
    check,
    default_weight,
    make_nsc,
    nsc_backward_rows,
    nsc_forward_rows,
    threads,
    width,
)

# Channel counts by class, as functions of W: scalar, one chunk short, one chunk and a tail of
# one, two chunks and a tail of three.
NSC_CHANNELS = {
    "C3": lambda w: 3,
    "Cw-1": lambda w: w - 1,
    "Cw+1": lambda w: w + 1,
    "C2w+3": lambda w: 2 * w + 3,
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels", NSC_CHANNELS)
@pytest.mark.parametrize("s", [5, 2 * K_ROW_BLOCK + 3, 1100])
@pytest.mark.parametrize("op", OP_LIST)
def test_nsc_channels_rows_pieces(op, s, channels, dtype, gen):
    """NSC with C below, at and above W (scalar channels; full chunks; a masked tail chunk that
    overlaps the last full one), S within one row block, several row blocks, and S > 1024 (the
    forward splits S into pieces merged in order). Every pattern of `plant` sits on both sides
    of every row block and piece boundary."""
    c = NSC_CHANNELS[channels](width(dtype))
    n = 2
    rows = nsc_forward_rows(n, c, s)
    cuts = sorted(set(range(K_ROW_BLOCK, s, K_ROW_BLOCK)) | set(range(rows, s, rows)))
    x = make_nsc(n, c, s, dtype, gen, cuts, positive=op == "gem")
    check(op, x, default_weight(op, c, gen), gen, msg=f"C={c} S={s}")


# (N, C, H, W) by W (the chunk width): issue 19's shape; one chunk and a tail of one; two chunks
# and a tail of 8.
NSC_SPLIT_SHAPES = {
    "2x4x64x65": lambda w: (2, 4, 64, 65),
    "2xCw+1x40x41": lambda w: (2, w + 1, 40, 41),
    "1xC2w+8x48x48": lambda w: (1, 2 * w + 8, 48, 48),
}


@pytest.mark.usefixtures("threads")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", NSC_SPLIT_SHAPES)
@pytest.mark.parametrize("op", ["max", "mixed", "catavgmax"])
def test_nsc_split_ties_and_nans(op, shape, dtype, gen):
    """forward_nsc split into pieces of rows, then merge_max: ties of the maximum in two pieces
    (the earlier piece must win), NaNs in several pieces (the last must win), +inf ties, +inf
    with -inf. (2, 4, 64, 65) is issue 19's shape: flipping merge_max's tie rule gave a wrong
    grad_x there and no test failed."""
    n, c, h, w = NSC_SPLIT_SHAPES[shape](width(dtype))
    s = h * w
    rows = nsc_forward_rows(n, c, s)
    assert rows < s
    cuts = list(range(rows, s, rows))
    x = make_nsc(n, c, s, dtype, gen, cuts)
    check(op, x, default_weight(op, c, gen), gen, msg=f"C={c} rows={rows}")


# (N, C, S, dtype) by W: scalar channels (C = 3), one chunk and a tail of one (C = W + 1), many
# chunks and a tail (C = 520, N = 2); S just past one block of rows (2**20 / C) for the first
# two.
NSC_BACKWARD_CASES = {
    "C3": lambda w: (1, 3, 350_000, torch.bfloat16),
    "Cw+1": lambda w: (1, w + 1, cdiv(K_BACKWARD_NSC_ELEMENTS, w + 1) + 100, torch.float32),
    "C520": lambda w: (2, 520, 2_304, torch.bfloat16),
}


@pytest.mark.usefixtures("threads")
@pytest.mark.parametrize("case", NSC_BACKWARD_CASES)
@pytest.mark.parametrize("op", ["avg", "max", "catavgmax", "gem"])
def test_nsc_backward_blocks(op, case, gen):
    """backward_nsc with S > 2**20 / C: grad_x is written in blocks of rows (the issue's
    "wide-hw" path), for scalar channels (C = 3), one chunk and a tail (C = W + 1) and many
    chunks and a tail (C = 520), with N = 2 (C = 520) so that a thread's range crosses samples
    (the cached coefficients must be recomputed). The arg-max sits on the last row of a block and
    the first of the next; every grad_x element is compared (a skipped row holds garbage or
    zeros)."""
    n, c, s, dtype = NSC_BACKWARD_CASES[case](width(torch.float32))
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
    check(op, x, default_weight(op, c, gen), gen, msg=f"C={c} rows={rows}")
