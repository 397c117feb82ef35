"""Triton kernels for token pooling (docs/DESIGN.md, "Token pooling"): each output row pools the
positions [begin, end) of its sample's flat spatial index (`spans`, int64 (B, 4): begin, end,
count, origin), where the optional (N, S) `mask` is nonzero.

Long rows: as the pool kernels' forward, the forward may split each row over the grid's second
axis (SPLIT): program k reduces the k-th of `splits` pieces of the row's own range [begin, end)
(`_token_piece`: whole BLOCK_S steps from begin, so a short row leaves the last pieces empty),
writes its partial statistics, and `token_combine_kernel` merges them in order (rows.py's
`_merge_pieces`: deterministic) and finishes the rows. The backward cuts each row's own range
the same way over its second axis.

The same tile as the pool kernels of gapkernels/triton/kernels.py (ROWS rows by BLOCK_S
positions; NCS: consecutive (n, c) rows, each with its own span; NSC: a block of channels of one
row), their stages (rows.py: the lanes' reduction with the max rule and GeM's rescaling, the
finishing step `_write_results` with the row's count in place of S, the gradient terms) and
their math (pool_math.py). Positions outside a
row's span are never loaded (nothing past a length is read); masked ones are loaded only where
the mask is nonzero.

VARLEN: x is the packed (total, C) batch viewed as (1, C, total) with NSC strides; output row b
reads sample 0 at positions [begin_b, end_b), reports max indices relative to `origin_b` (the
sequence's first token), and its backward writes the whole sequence [origin_b, end_b).

Max: a lane takes its first position that takes part unconditionally (as torch's scan starts at
the first element), then greater values or NaN; lanes that saw nothing keep the index S, so the
combined index of a row whose values are all -inf is its first position that takes part. An
empty row (count 0) writes 0, index -1, GeM aux (M, r, l) = (0, 1, 0), MIXED aux 0: the weight
gradients from aux are then 0 as well.
"""

import triton
import triton.language as tl

from .layout import _float32, _load_weight, _offsets
from .pool_math import MODE_CAT, MODE_GEM, MODE_MAX, MODE_MIXED, _gem_scan
from .rows import (
    _combine_rows,
    _element_grad,
    _empty_lanes,
    _grad_terms,
    _reduce_lanes,
    _store_partials,
    _write_results,
)

SPAN_COLUMNS: tl.constexpr = tl.constexpr(4)  # begin, end, count, origin


@triton.jit
def _token_rows(
    pid, B, C, S, ROWS: tl.constexpr, CHANNELS_LAST: tl.constexpr, VARLEN: tl.constexpr
):
    """The ROWS output rows of program `pid` (int64): their index b*C + c, sample b, channel,
    mask, and the offset of their element s = 0 in x."""
    if CHANNELS_LAST:
        channel_blocks = tl.cdiv(C, ROWS)
        b = tl.zeros([ROWS], tl.int64) + pid // channel_blocks
        channel = tl.cast((pid % channel_blocks) * ROWS + tl.arange(0, ROWS), tl.int64)
        row_mask = channel < C
        row = b * C + channel
        if VARLEN:
            base = channel
        else:
            base = b * S * C + channel
    else:
        row = tl.cast(pid, tl.int64) * ROWS + tl.arange(0, ROWS)
        row_mask = row < tl.cast(B, tl.int64) * C
        b = row // C
        channel = row % C
        base = row * S
    return row, b, channel, row_mask, base


@triton.jit
def _span(spans_ptr, b, row_mask):
    """(begin, end, count, origin) of each row, int64."""
    at = spans_ptr + b * SPAN_COLUMNS
    begin = tl.load(at, mask=row_mask, other=0)
    end = tl.load(at + 1, mask=row_mask, other=0)
    count = tl.load(at + 2, mask=row_mask, other=0)
    origin = tl.load(at + 3, mask=row_mask, other=0)
    return begin, end, count, origin


@triton.jit
def _takes_part(s, begin, end, b, mask_ptr, S, row_mask, HAS_MASK: tl.constexpr):
    """(ROWS, BLOCK_S): whether position s of each row takes part (mask read only in span)."""
    inside = row_mask[:, None] & (s[None, :] >= begin[:, None]) & (s[None, :] < end[:, None])
    if HAS_MASK:
        flag = tl.load(mask_ptr + b[:, None] * S + s[None, :], mask=inside, other=0)
        inside = inside & (flag != 0)
    return inside


@triton.jit
def _token_piece(begin, end, piece, pieces, BLOCK_S: tl.constexpr):
    """Piece `piece` of `pieces` of each row's range [begin, end): [piece_begin, piece_end),
    pieces of whole BLOCK_S steps from begin (the last ones empty when the range is short)."""
    length = tl.maximum(end - begin, 0)
    per_piece = tl.cdiv(tl.cdiv(length, pieces), BLOCK_S) * BLOCK_S
    piece_begin = tl.minimum(begin + piece * per_piece, end)
    piece_end = tl.minimum(piece_begin + per_piece, end)
    return piece_begin, piece_end


@triton.jit
def _token_write(
    stats,
    count,
    origin,
    rows,
    weight,
    outputs,
    C,
    MODE: tl.constexpr,
    WEIGHT_KIND: tl.constexpr,
    WITH_LOG: tl.constexpr,
):
    """Writes complete rows from their `stats` (max index absolute, S where nothing was seen):
    finished with their count, the index relative to the origin; an empty row (count 0) as the
    module's docstring says."""
    total, total_log, row_max, row_index = stats
    empty = count == 0
    if MODE == MODE_GEM:
        row_max = tl.where(empty, 0.0, row_max)
        total = tl.where(empty, 1.0, total)
        total_log = tl.where(empty, 0.0, total_log)
    elif MODE == MODE_MAX or MODE == MODE_MIXED or MODE == MODE_CAT:
        row_max = tl.where(empty, 0.0, row_max)
        row_index = tl.where(empty, -1, row_index - origin)
    count_f = tl.where(empty, 1.0, count.to(tl.float32))
    stats = (total, total_log, row_max, row_index)
    _write_results(stats, rows, weight, outputs, C, count_f, MODE, WEIGHT_KIND, WITH_LOG)


@triton.jit
def token_forward_kernel(
    x_ptr,
    spans_ptr,
    mask_ptr,
    weight_ptr,
    out_ptr,
    aux_ptr,
    indices_ptr,
    partial_stats_ptr,
    partial_index_ptr,
    B,
    C,
    S,
    weight_stride,
    scalar,
    eps,
    MODE: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WEIGHT_KIND: tl.constexpr,
    WITH_LOG: tl.constexpr,
    SPLIT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Reads each position that takes part once. Grid: (row blocks, pieces of each row's range).
    Without SPLIT (one piece) it writes out, aux and indices; with SPLIT, each program writes
    its rows' partial statistics of its piece (rows.py's `_store_partials`) for
    token_combine_kernel."""
    NEEDS_SUM: tl.constexpr = MODE != MODE_MAX and MODE != MODE_GEM
    NEEDS_MAX: tl.constexpr = MODE == MODE_MAX or MODE == MODE_MIXED or MODE == MODE_CAT
    weight = (weight_ptr, weight_stride, _float32(scalar))
    eps = _float32(eps)
    row, b, channel, row_mask, base = _token_rows(
        tl.program_id(0), B, C, S, ROWS, CHANNELS_LAST, VARLEN
    )
    begin, end, count, origin = _span(spans_ptr, b, row_mask)
    if SPLIT:
        begin, end = _token_piece(begin, end, tl.program_id(1), tl.num_programs(1), BLOCK_S)
    lo = tl.min(tl.where(row_mask, begin, S))
    hi = tl.max(tl.where(row_mask, end, 0))

    lane_sum, lane_log, lane_max = _empty_lanes(MODE, ROWS, BLOCK_S)
    p = 0.0  # GeM's exponent, (ROWS, 1)
    if MODE == MODE_GEM:
        p = _load_weight(weight, channel, row_mask, WEIGHT_KIND)[:, None]
    lane_index = tl.zeros([ROWS, BLOCK_S], tl.int64) + S  # S: the lane has seen nothing
    for s_start in range(lo, hi, BLOCK_S):
        s = s_start + tl.arange(0, BLOCK_S)
        part = _takes_part(s, begin, end, b, mask_ptr, S, row_mask, HAS_MASK)
        v = tl.load(x_ptr + _offsets(base, s, C, CHANNELS_LAST), mask=part, other=0.0)
        v = v.to(tl.float32)
        if MODE == MODE_GEM:
            lane_max, lane_sum, lane_log = _gem_scan(
                lane_max, lane_sum, lane_log, v, part, p, eps, WITH_LOG
            )
        elif NEEDS_SUM:
            lane_sum += v
        if NEEDS_MAX:
            first = lane_index == S
            take = part & ((v > lane_max) | (v != v) | first)
            lane_max = tl.where(take, v, lane_max)
            lane_index = tl.where(take, s[None, :], lane_index)

    stats = _reduce_lanes(lane_sum, lane_log, lane_max, lane_index, p, row, S, MODE, WITH_LOG)
    if SPLIT:
        partials = (partial_stats_ptr, partial_index_ptr)
        rows_total = tl.cast(B, tl.int64) * C
        split = tl.program_id(1)
        _store_partials(stats, partials, split, row, row_mask, rows_total, MODE, WITH_LOG)
    else:
        rows = (row, channel, row_mask)
        outputs = (out_ptr, aux_ptr, indices_ptr)
        _token_write(stats, count, origin, rows, weight, outputs, C, MODE, WEIGHT_KIND, WITH_LOG)


@triton.jit
def token_combine_kernel(
    partial_stats_ptr,
    partial_index_ptr,
    spans_ptr,
    weight_ptr,
    out_ptr,
    aux_ptr,
    indices_ptr,
    B,
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
    """Merges the pieces of a SPLIT token_forward_kernel in order (rows.py's `_merge_pieces`)
    and writes out, aux and indices as the unsplit forward does. Grid: blocks of ROWS rows."""
    weight = (weight_ptr, weight_stride, _float32(scalar))
    partials = (partial_stats_ptr, partial_index_ptr)
    stats, rows = _combine_rows(
        partials, weight, B, C, S, splits, MODE, WEIGHT_KIND, WITH_LOG, ROWS
    )
    row, _, row_mask = rows
    _, _, count, origin = _span(spans_ptr, row // C, row_mask)
    outputs = (out_ptr, aux_ptr, indices_ptr)
    _token_write(stats, count, origin, rows, weight, outputs, C, MODE, WEIGHT_KIND, WITH_LOG)


@triton.jit
def token_backward_kernel(
    grad_out_ptr,
    x_ptr,
    spans_ptr,
    mask_ptr,
    aux_ptr,
    indices_ptr,
    weight_ptr,
    grad_x_ptr,
    B,
    C,
    S,
    weight_stride,
    scalar,
    eps,
    MODE: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WEIGHT_KIND: tl.constexpr,
    AUX_COLUMNS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Writes each element of grad_x once: the gradient where the position takes part, 0
    elsewhere (padded: all of [0, S); VARLEN: the row's sequence [origin, end)).
    Grid: (row blocks, pieces of each row's own range, as `_token_piece` cuts it)."""
    weight = (weight_ptr, weight_stride, _float32(scalar))
    eps = _float32(eps)
    row, b, channel, row_mask, base = _token_rows(
        tl.program_id(0), B, C, S, ROWS, CHANNELS_LAST, VARLEN
    )
    begin, end, count, origin = _span(spans_ptr, b, row_mask)
    if VARLEN:
        own_begin = origin
        own_end = end
    else:
        own_begin = tl.zeros_like(origin)
        own_end = tl.zeros_like(origin) + S
    piece_begin, piece_end = _token_piece(
        own_begin, own_end, tl.program_id(1), tl.num_programs(1), BLOCK_S
    )
    lo = tl.min(tl.where(row_mask, piece_begin, S))
    hi = tl.max(tl.where(row_mask, piece_end, 0))
    grad_dtype = grad_x_ptr.dtype.element_ty
    count_f = tl.maximum(count, 1).to(tl.float32)

    terms = _grad_terms(
        grad_out_ptr,
        aux_ptr,
        weight,
        (row, channel, row_mask),
        C,
        count_f,
        MODE,
        WEIGHT_KIND,
        AUX_COLUMNS,
    )
    index = 0  # the max's index, (ROWS, 1) (max modes)
    if MODE == MODE_MAX or MODE == MODE_MIXED or MODE == MODE_CAT:
        # relative to the origin, -1 for an empty row: never matched
        index = (tl.load(indices_ptr + row, mask=row_mask, other=-1) + origin)[:, None]
        index = tl.where(index < origin[:, None], -1, index)

    for s_start in range(lo, hi, BLOCK_S):
        s = s_start + tl.arange(0, BLOCK_S)
        own = (
            row_mask[:, None]
            & (s[None, :] >= piece_begin[:, None])
            & (s[None, :] < piece_end[:, None])
        )
        part = _takes_part(s, begin, end, b, mask_ptr, S, row_mask, HAS_MASK) & own
        offsets = _offsets(base, s, C, CHANNELS_LAST)
        grad = _element_grad(x_ptr, offsets, part, s, index, terms, eps, MODE, True)
        tl.store(grad_x_ptr + offsets, grad.to(grad_dtype), mask=own)
