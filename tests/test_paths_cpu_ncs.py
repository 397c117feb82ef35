"""The NCS (contiguous rows) paths of the CPU kernels, forward and backward, each with an input
that makes the path matter (docs/PATHS.md lists them; the geometry and the checks are in
tests/paths_common.py): reduce_run (scalar runs below W, vector body, masked tail chunk, max
blocks and resolve_block), forward_ncs_lanes / reduce_lanes (16 rows per lane, overlapping last
tile, partial last group, NaN fallback: 8x8 tiles with 8-float vectors, 16x8 with 16-float
ones; avx512's rows: AVG, and from K_MIN_ROWS_MAX_RUN the modes with a max in 16-bit dtypes),
split rows merged in order, and backward: grad_run (scalar, body, overlapping tail), rows in
pieces."""

from __future__ import annotations

import pytest
import torch
from paths_common import (  # noqa: F401  (threads: a fixture)
    DTYPES,
    K_BACKWARD_NCS_PIECE,
    K_BATCH,
    K_MAX_BLOCK_CHUNKS,
    K_MIN_ROWS16_RUN,
    K_MIN_ROWS_MAX_RUN,
    K_MIN_TASK_ELEMENTS,
    OP_LIST,
    avg_rows,
    cdiv,
    check,
    default_weight,
    has_lanes,
    make_ncs,
    ncs_backward_piece_len,
    ncs_forward_piece_len,
    run_boundaries,
    threads,
    uses_lanes,
    uses_rows16,
    vector_bytes,
    width,
)

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


@pytest.mark.skipif(
    not has_lanes(), reason="this CPU variant has no lane path (8- or 16-float vectors only)"
)
@pytest.mark.usefixtures("threads")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "s",
    [
        8,
        13,
        49,
        K_MIN_ROWS16_RUN - 1,
        K_MIN_ROWS16_RUN,
        K_MIN_ROWS_MAX_RUN - 1,
        K_MIN_ROWS_MAX_RUN + 2,
        256,
    ],
)
@pytest.mark.parametrize(
    "op,wkind",
    [
        ("max", None),
        ("mixed", "channel"),
        ("mixed", "scalar"),
        ("catavgmax", None),
        ("avg", None),
    ],
)
def test_ncs_lanes_groups_and_threads(op, wkind, s, dtype, gen):
    """forward_ncs_lanes: N*C = 16 * k + 5 rows, so that full groups (reduce_lanes) and the
    partial last group (reduce_run) both run, with enough groups that 2 threads split them. A
    row with a NaN or with +inf and -inf is reduced again by reduce_run (exact rule); ties must
    keep the first index (the lanes' strict compare; avx512's rows, bfloat16 from
    K_MIN_ROWS_MAX_RUN on: the smallest matching index). On an AVX-512 machine the avx2 and
    default variants run it (tests/test_cpu_isa.py). AVG takes this path with avx2 and avx512
    (row by row), the run loop in the default variant."""
    groups = max(3, 2 * cdiv(K_MIN_TASK_ELEMENTS, K_BATCH * s))
    rows = K_BATCH * groups + 5
    c = 7
    n = cdiv(rows, c)
    assert uses_lanes(op, dtype, n * c, s) or (op == "avg" and not avg_rows())
    if s > K_MIN_ROWS_MAX_RUN and dtype == torch.bfloat16 and vector_bytes() == 64:
        assert uses_rows16(op, dtype, s)
    x = make_ncs(n, c, s, dtype, gen, run_boundaries(s, dtype))
    check(op, x, default_weight(op, c, gen, wkind), gen, msg=f"S={s}")


@pytest.mark.usefixtures("threads")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "n,c,s",
    [(1, 1, 3 * K_MIN_TASK_ELEMENTS + 37), (1, 2, 70000), (2, 7, 40000)],
    ids=["1row", "2rows", "14rows"],
)
@pytest.mark.parametrize("op", OP_LIST)
def test_ncs_split_pieces(op, n, c, s, dtype, gen):
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


@pytest.mark.usefixtures("threads")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", OP_LIST)
def test_ncs_backward_split_rows(op, dtype, gen):
    """backward_ncs with S > 2**18: each row's grad_x is written in pieces (grad_run with a
    start), the arg-max's local index found in its piece. The arg-max is placed on the last
    element of one piece, the first of the next, and in the overlapping tail chunk."""
    w = width(dtype)
    s = K_BACKWARD_NCS_PIECE + 3 * w + 5
    piece = ncs_backward_piece_len(s)
    # Two pieces, each ending in a partial chunk: the arg-max at piece - 1 and at s - 5 is in
    # the lanes only the overlapping tail chunk covers.
    assert cdiv(s, piece) == 2 and piece % w >= 1 and (s - piece) % w >= 5
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


@pytest.mark.usefixtures("threads")
@pytest.mark.parametrize("op", ["avg", "mixed", "gem"])
def test_ncs_row_batches_start_mid_channel(op, gen):
    """forward_ncs (one piece) and backward_ncs hand rows to threads in ranges that need not
    start at channel 0: the per-channel weight and the batch of 16 rows (finalize,
    row_coefficients) must follow the range's own first row. S = 17 keeps the non-lane path for
    avg, and a lane path otherwise where the variant has one; R = 287 * 7 = 2009 rows: with 2
    threads the second range starts at row 1927 (the run path) or lane group 120 (row 1920),
    neither at channel 0."""
    x = make_ncs(287, 7, 17, torch.float32, gen, positive=True)
    check(op, x, default_weight(op, 7, gen), gen)
