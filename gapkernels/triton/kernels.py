"""Triton kernels for the pool ops of docs/DESIGN.md: one forward kernel, one backward kernel,
and a small combine kernel for a forward whose S is split over several programs.

Mode, layout and weight kind are `tl.constexpr` parameters, so each call compiles to exactly the
code its mode needs. The tile and its index arithmetic are in layout.py, the stages shared with
the token kernels in rows.py, the math in pool_math.py.

All statistics accumulate in float32 per lane of the tile and are reduced with `tl.sum` /
`tl.max` / `tl.min` at the end: the reduction order depends only on the tile shape, which
depends only on the input's shape (deterministic, no atomics).
"""

import triton
import triton.language as tl

from .layout import (
    WEIGHT_PER_CHANNEL,
    WEIGHT_SCALAR,
    WEIGHT_SHARED,
    _float32,
    _load_weight,
    _offsets,
    _piece,
    _row_block,
)
from .pool_math import MODE_AVG, MODE_CAT, MODE_GEM, MODE_MAX, MODE_MIXED, _gem_scan
from .rows import (
    _combine_rows,
    _element_grad,
    _empty_lanes,
    _grad_terms,
    _reduce_lanes,
    _store_partials,
    _write_results,
)

__all__ = [
    "MODE_AVG",
    "MODE_CAT",
    "MODE_GEM",
    "MODE_MAX",
    "MODE_MIXED",
    "WEIGHT_PER_CHANNEL",
    "WEIGHT_SCALAR",
    "WEIGHT_SHARED",
    "pool_backward_kernel",
    "pool_combine_kernel",
    "pool_forward_kernel",
]


@triton.jit
def pool_forward_kernel(
    x_ptr,
    weight_ptr,
    out_ptr,
    aux_ptr,
    indices_ptr,
    partial_stats_ptr,
    partial_index_ptr,
    N,
    C,
    S,
    s_per_split,
    weight_stride,
    scalar,
    eps,
    MODE: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    WEIGHT_KIND: tl.constexpr,
    WITH_LOG: tl.constexpr,
    SPLIT: tl.constexpr,
    INDEX_64: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Reads each element of x once. Grid: (row blocks, splits of S). Without SPLIT it writes
    out/aux/indices; with SPLIT, each program writes its rows' partial statistics for its piece
    of S ([splits, 3, N*C]: sum / max / log-sum, GEM: r-sum / M / l-sum; and [splits, N*C]
    index) for the combine kernel."""
    NEEDS_SUM: tl.constexpr = MODE != MODE_MAX and MODE != MODE_GEM
    NEEDS_MAX: tl.constexpr = MODE == MODE_MAX or MODE == MODE_MIXED or MODE == MODE_CAT
    weight = (weight_ptr, weight_stride, _float32(scalar))
    eps = _float32(eps)
    row, channel, row_mask, base = _row_block(
        tl.program_id(0), N, C, S, ROWS, CHANNELS_LAST, INDEX_64
    )
    split = tl.program_id(1)
    s_begin, s_end = _piece(split, s_per_split, S, INDEX_64)

    lane_sum, lane_log, lane_max = _empty_lanes(MODE, ROWS, BLOCK_S)
    p = 0.0  # GeM's exponent, (ROWS, 1)
    if MODE == MODE_GEM:
        p = _load_weight(weight, channel, row_mask, WEIGHT_KIND)[:, None]
    lane_index = tl.zeros([ROWS, BLOCK_S], s_begin.dtype)
    for s_start in range(s_begin, s_end, BLOCK_S):
        s = s_start + tl.arange(0, BLOCK_S)
        mask = row_mask[:, None] & (s < s_end)[None, :]
        v = tl.load(x_ptr + _offsets(base, s, C, CHANNELS_LAST), mask=mask, other=0.0)
        v = v.to(tl.float32)
        if MODE == MODE_GEM:
            lane_max, lane_sum, lane_log = _gem_scan(
                lane_max, lane_sum, lane_log, v, mask, p, eps, WITH_LOG
            )
        elif NEEDS_SUM:
            lane_sum += v
        if NEEDS_MAX:
            v = tl.where(mask, v, float("-inf"))
            take = (v > lane_max) | (v != v)  # torch's rule: greater, or NaN
            lane_max = tl.where(take, v, lane_max)
            lane_index = tl.where(take, s[None, :], lane_index)

    stats = _reduce_lanes(lane_sum, lane_log, lane_max, lane_index, p, row, S, MODE, WITH_LOG)
    if SPLIT:
        rows_total = tl.cast(N, tl.int64) * C
        partials = (partial_stats_ptr, partial_index_ptr)
        _store_partials(stats, partials, split, row, row_mask, rows_total, MODE, WITH_LOG)
    else:
        outputs = (out_ptr, aux_ptr, indices_ptr)
        _write_results(
            stats, (row, channel, row_mask), weight, outputs, C, S, MODE, WEIGHT_KIND, WITH_LOG
        )


@triton.jit
def pool_combine_kernel(
    partial_stats_ptr,
    partial_index_ptr,
    weight_ptr,
    out_ptr,
    aux_ptr,
    indices_ptr,
    N,
    C,
    S,
    splits,
    weight_stride,
    scalar,
    MODE: tl.constexpr,
    WEIGHT_KIND: tl.constexpr,
    WITH_LOG: tl.constexpr,
    ROWS: tl.constexpr,
):
    """Combines the splits' partial statistics in split order (rows.py's `_merge_pieces`) and
    writes the results."""
    weight = (weight_ptr, weight_stride, _float32(scalar))
    partials = (partial_stats_ptr, partial_index_ptr)
    stats, rows = _combine_rows(
        partials, weight, N, C, S, splits, MODE, WEIGHT_KIND, WITH_LOG, ROWS
    )
    outputs = (out_ptr, aux_ptr, indices_ptr)
    _write_results(stats, rows, weight, outputs, C, S, MODE, WEIGHT_KIND, WITH_LOG)


@triton.jit
def pool_backward_kernel(
    grad_out_ptr,
    x_ptr,
    aux_ptr,
    indices_ptr,
    weight_ptr,
    grad_x_ptr,
    N,
    C,
    S,
    s_per_program,
    weight_stride,
    scalar,
    eps,
    MODE: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    WEIGHT_KIND: tl.constexpr,
    AUX_COLUMNS: tl.constexpr,
    INDEX_64: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Writes each element of grad_x once: A + (s == index) * B per row, or for GEM
    coef * (x / M) ** (p - 1) where x >= eps. Grid: (row blocks, pieces of S)."""
    weight = (weight_ptr, weight_stride, _float32(scalar))
    eps = _float32(eps)
    row, channel, row_mask, base = _row_block(
        tl.program_id(0), N, C, S, ROWS, CHANNELS_LAST, INDEX_64
    )
    s_begin, s_end = _piece(tl.program_id(1), s_per_program, S, INDEX_64)
    grad_dtype = grad_x_ptr.dtype.element_ty
    terms = _grad_terms(
        grad_out_ptr,
        aux_ptr,
        weight,
        (row, channel, row_mask),
        C,
        S,
        MODE,
        WEIGHT_KIND,
        AUX_COLUMNS,
    )
    index = 0  # the max's index, (ROWS, 1) (max modes)
    if MODE == MODE_MAX or MODE == MODE_MIXED or MODE == MODE_CAT:
        index = tl.load(indices_ptr + row, mask=row_mask, other=-1)[:, None]

    for s_start in range(s_begin, s_end, BLOCK_S):
        s = s_start + tl.arange(0, BLOCK_S)
        mask = row_mask[:, None] & (s < s_end)[None, :]
        offsets = _offsets(base, s, C, CHANNELS_LAST)
        grad = _element_grad(x_ptr, offsets, mask, s, index, terms, eps, MODE, False)
        tl.store(grad_x_ptr + offsets, grad.to(grad_dtype), mask=mask)
