"""The stages that the pool kernels (kernels.py) and the token kernels (token_kernels.py) share,
for a block of rows: the lanes' empty state and their reduction to one statistic per row, a split
row's partial statistics and their merge in split order, the results of complete rows (each
mode's finishing step), and backward a row's gradient terms and an element's gradient. The math
itself is in pool_math.py.

Tuples keep the argument lists short: `weight` = (weight_ptr, weight_stride, scalar) as in
layout.py, `rows` = (row, channel, row_mask), `stats` = (total, total_log, row_max, row_index)
(GEM: r-sum, l-sum, M), `outputs` = (out_ptr, aux_ptr, indices_ptr).
"""

import triton
import triton.language as tl

from .layout import _load_weight
from .pool_math import (
    MODE_AVG,
    MODE_CAT,
    MODE_GEM,
    MODE_MAX,
    MODE_MIXED,
    _combine_lanes,
    _gem_grad,
    _gem_grad_scale,
    _gem_merge,
    _gem_reduce_lanes,
    _gem_value,
    _mixed_value,
)


@triton.jit
def _empty_lanes(MODE: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr):
    """(lane_sum, lane_log, lane_max) of lanes that have seen nothing, float32 (ROWS, BLOCK_S)
    (GEM: the sums r and l and the maximum m = 0 of the empty state)."""
    lane_sum = tl.zeros([ROWS, BLOCK_S], tl.float32)
    lane_log = tl.zeros([ROWS, BLOCK_S], tl.float32)
    if MODE == MODE_GEM:
        lane_max = tl.zeros([ROWS, BLOCK_S], tl.float32)  # the empty GeM state: m = 0
    else:
        lane_max = tl.full([ROWS, BLOCK_S], float("-inf"), tl.float32)
    return lane_sum, lane_log, lane_max


@triton.jit
def _reduce_lanes(
    lane_sum, lane_log, lane_max, lane_index, p, row, S, MODE: tl.constexpr, WITH_LOG: tl.constexpr
):
    """The lanes' statistics reduced to `stats` per row (row_index: the max's index in max
    modes, else unused). `p` is GEM's (ROWS, 1) exponent (unused in the other modes)."""
    if MODE == MODE_GEM:
        row_max, total, total_log = _gem_reduce_lanes(lane_max, lane_sum, lane_log, p, WITH_LOG)
        row_index = row
    else:
        total = tl.sum(lane_sum, axis=1)
        total_log = total
        if MODE == MODE_MAX or MODE == MODE_MIXED or MODE == MODE_CAT:
            row_max, row_index = _combine_lanes(lane_max, lane_index, S)
        else:
            row_max = total
            row_index = row
    return total, total_log, row_max, row_index


@triton.jit
def _store_partials(
    stats,
    partials,
    split,
    row,
    row_mask,
    rows_total,
    MODE: tl.constexpr,
    WITH_LOG: tl.constexpr,
):
    """A split program's `stats` of its piece of its rows, into `partials` = (partial_stats_ptr,
    partial_index_ptr): [splits, 3, rows_total] float32 (sum / max / log-sum; GEM: r-sum / M /
    l-sum) and [splits, rows_total] int64 (the max's index), for `_merge_pieces`."""
    NEEDS_MAX: tl.constexpr = MODE == MODE_MAX or MODE == MODE_MIXED or MODE == MODE_CAT
    total, total_log, row_max, row_index = stats
    partial_stats_ptr, partial_index_ptr = partials
    partial = partial_stats_ptr + tl.cast(split, tl.int64) * 3 * rows_total + row
    tl.store(partial, total, mask=row_mask)
    if NEEDS_MAX or MODE == MODE_GEM:
        tl.store(partial + rows_total, row_max, mask=row_mask)
    if WITH_LOG:
        tl.store(partial + 2 * rows_total, total_log, mask=row_mask)
    if NEEDS_MAX:
        tl.store(
            partial_index_ptr + tl.cast(split, tl.int64) * rows_total + row,
            row_index.to(tl.int64),
            mask=row_mask,
        )


@triton.jit
def _merge_pieces(
    partials,
    row,
    row_mask,
    rows_total,
    splits,
    p,
    S,
    MODE: tl.constexpr,
    WITH_LOG: tl.constexpr,
):
    """`stats` of rows `row` (int64) from the `splits` pieces `_store_partials` wrote to
    `partials`, merged in split order (the scan order of S, so the max rule of torch applies to
    them as it does to elements; GEM merges the pieces' states in that order). A piece that saw
    no element (token kernels: its max index is S, its GEM maximum M is 0) is passed over; the
    first piece that saw one is taken whatever its maximum (a row of -inf has its first
    position's index). `p`: GEM's exponent (ROWS,)."""
    NEEDS_MAX: tl.constexpr = MODE == MODE_MAX or MODE == MODE_MIXED or MODE == MODE_CAT
    total = tl.zeros(row.shape, tl.float32)
    total_log = tl.zeros(row.shape, tl.float32)
    row_index = tl.zeros(row.shape, tl.int64) + S  # S: no piece seen yet
    if MODE == MODE_GEM:
        row_max = tl.zeros(row.shape, tl.float32)  # the empty GeM state
    else:
        row_max = tl.full(row.shape, float("-inf"), tl.float32)
    partial_stats_ptr, partial_index_ptr = partials
    partial = partial_stats_ptr + row
    index_ptr = partial_index_ptr + row
    for _ in range(0, splits):
        piece_total = tl.load(partial, mask=row_mask, other=0.0)
        if MODE == MODE_GEM:
            piece_max = tl.load(partial + rows_total, mask=row_mask, other=0.0)
            if WITH_LOG:
                piece_log = tl.load(partial + 2 * rows_total, mask=row_mask, other=0.0)
            else:
                piece_log = piece_total
            merged_max, merged, merged_log = _gem_merge(
                row_max, total, total_log, piece_max, piece_total, piece_log, p, WITH_LOG
            )
            seen = piece_max != 0.0  # y >= eps > 0 for every element seen
            row_max = tl.where(seen, merged_max, row_max)
            total = tl.where(seen, merged, total)
            total_log = tl.where(seen, merged_log, total_log)
        else:
            total += piece_total
        if NEEDS_MAX:
            piece_max = tl.load(partial + rows_total, mask=row_mask, other=float("-inf"))
            piece_index = tl.load(index_ptr, mask=row_mask, other=S)
            first = (row_index == S) & (piece_index != S)
            take = (piece_max > row_max) | (piece_max != piece_max) | first
            row_max = tl.where(take, piece_max, row_max)
            row_index = tl.where(take, piece_index, row_index)
        partial += 3 * rows_total
        index_ptr += rows_total
    return total, total_log, row_max, row_index


@triton.jit
def _combine_rows(
    partials,
    weight,
    N,
    C,
    S,
    splits,
    MODE: tl.constexpr,
    WEIGHT_KIND: tl.constexpr,
    WITH_LOG: tl.constexpr,
    ROWS: tl.constexpr,
):
    """A combine kernel's block of ROWS of the N*C rows (grid axis 0): their `stats` merged from
    the `splits` pieces (`_merge_pieces`), and `rows` (int64)."""
    rows_total = tl.cast(N, tl.int64) * C
    row = tl.cast(tl.program_id(0), tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = row < rows_total
    channel = row % C
    p = 0.0  # GeM's exponent (ROWS,)
    if MODE == MODE_GEM:
        p = _load_weight(weight, channel, row_mask, WEIGHT_KIND)
    stats = _merge_pieces(partials, row, row_mask, rows_total, splits, p, S, MODE, WITH_LOG)
    return stats, (row, channel, row_mask)


@triton.jit
def _write_results(
    stats,
    rows,
    weight,
    outputs,
    C,
    S,
    MODE: tl.constexpr,
    WEIGHT_KIND: tl.constexpr,
    WITH_LOG: tl.constexpr,
):
    """out, aux and indices of complete rows (int64 `row`) from their float32 statistics;
    S: the number of elements each row pooled (token kernels: its count)."""
    total, total_log, row_max, row_index = stats
    row, channel, row_mask = rows
    out_ptr, aux_ptr, indices_ptr = outputs
    out_dtype = out_ptr.dtype.element_ty
    mean = total / S
    if MODE == MODE_AVG:
        tl.store(out_ptr + row, mean.to(out_dtype), mask=row_mask)
    elif MODE == MODE_MAX:
        tl.store(out_ptr + row, row_max.to(out_dtype), mask=row_mask)
    elif MODE == MODE_MIXED:
        alpha = _load_weight(weight, channel, row_mask, WEIGHT_KIND)
        mixed = _mixed_value(alpha, row_max, mean)
        tl.store(out_ptr + row, mixed.to(out_dtype), mask=row_mask)
        tl.store(aux_ptr + row, row_max - mean, mask=row_mask)
    elif MODE == MODE_CAT:
        avg_offset = row + (row - channel)  # n * 2C + c
        tl.store(out_ptr + avg_offset, mean.to(out_dtype), mask=row_mask)
        tl.store(out_ptr + avg_offset + C, row_max.to(out_dtype), mask=row_mask)
    else:
        p = _load_weight(weight, channel, row_mask, WEIGHT_KIND)
        gem = _gem_value(row_max, mean, p)
        tl.store(out_ptr + row, gem.to(out_dtype), mask=row_mask)
        if WITH_LOG:
            aux_row = aux_ptr + 3 * row
            tl.store(aux_row + 2, total_log / S, mask=row_mask)
        else:
            aux_row = aux_ptr + 2 * row
        tl.store(aux_row, row_max, mask=row_mask)
        tl.store(aux_row + 1, mean, mask=row_mask)
    if MODE == MODE_MAX or MODE == MODE_MIXED or MODE == MODE_CAT:
        tl.store(indices_ptr + row, row_index.to(tl.int64), mask=row_mask)


@triton.jit
def _grad_terms(
    grad_out_ptr,
    aux_ptr,
    weight,
    rows,
    C,
    count,
    MODE: tl.constexpr,
    WEIGHT_KIND: tl.constexpr,
    AUX_COLUMNS: tl.constexpr,
):
    """A row's gradient terms, float32: (per_element, at_index, coef, big_m, p_minus_one).
    Each element gets per_element, plus at_index at the max's index (both (ROWS,)); GEM:
    coef * (x / M) ** (p - 1) where x >= eps (coef, big_m, p_minus_one (ROWS, 1)). A mode fills
    only the terms it has (0.0 else). count: the number of elements each row pooled."""
    row, channel, row_mask = rows
    per_element = 0.0
    at_index = 0.0
    coef = 0.0
    big_m = 0.0
    p_minus_one = 0.0
    if MODE == MODE_CAT:
        out_offset = row + (row - channel)  # n * 2C + c
        per_element = tl.load(grad_out_ptr + out_offset, mask=row_mask, other=0.0)
        at_index = tl.load(grad_out_ptr + out_offset + C, mask=row_mask, other=0.0)
        per_element = per_element.to(tl.float32) / count
        at_index = at_index.to(tl.float32)
    else:
        g = tl.load(grad_out_ptr + row, mask=row_mask, other=0.0).to(tl.float32)
        if MODE == MODE_AVG:
            per_element = g / count
        elif MODE == MODE_MAX:
            at_index = g
        elif MODE == MODE_MIXED:
            alpha = _load_weight(weight, channel, row_mask, WEIGHT_KIND)
            per_element = (1.0 - alpha) * g / count
            at_index = alpha * g
        else:
            p = _load_weight(weight, channel, row_mask, WEIGHT_KIND)
            big_m = tl.load(aux_ptr + AUX_COLUMNS * row, mask=row_mask, other=1.0)
            r = tl.load(aux_ptr + AUX_COLUMNS * row + 1, mask=row_mask, other=1.0)
            coef = _gem_grad_scale(g, r, p, count)[:, None]
            big_m = big_m[:, None]
            p_minus_one = (p - 1.0)[:, None]
    return per_element, at_index, coef, big_m, p_minus_one


@triton.jit
def _element_grad(
    x_ptr, offsets, load_mask, s, index, terms, eps, MODE: tl.constexpr, MASKED: tl.constexpr
):
    """The gradient of the elements at `offsets` (positions `s` of rows whose max is at
    `index`, (ROWS, 1)), float32 (ROWS, BLOCK_S), from the rows' `terms` (_grad_terms); GEM
    reads x where `load_mask`. MASKED (token kernels): 0 where not `load_mask` (the positions
    that do not take part)."""
    per_element, at_index, coef, big_m, p_minus_one = terms
    if MODE == MODE_GEM:
        v = tl.load(x_ptr + offsets, mask=load_mask, other=0.0).to(tl.float32)
        grad = _gem_grad(v, eps, coef, big_m, p_minus_one)
        if MASKED:
            grad = tl.where(load_mask, grad, 0.0)
    elif MODE == MODE_AVG:
        if MASKED:
            grad = tl.where(load_mask, per_element[:, None], 0.0)
        else:
            grad = tl.zeros(offsets.shape, tl.float32) + per_element[:, None]
    else:
        if MODE != MODE_MAX:  # MIXED, CAT: per_element, plus at_index at the max
            spread = per_element[:, None]
            if MASKED:
                spread = tl.where(load_mask, spread, 0.0)
        at_max = s[None, :] == index
        if MASKED:
            at_max = load_mask & at_max
        grad = tl.where(at_max, at_index[:, None], 0.0)
        if MODE != MODE_MAX:
            grad = spread + grad
    return grad
