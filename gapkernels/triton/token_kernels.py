"""Triton kernels for token pooling (docs/DESIGN.md, "Token pooling"): each output row pools the
positions [begin, end) of its sample's flat spatial index (`spans`, int64 (B, 4): begin, end,
count, origin), where the optional (N, S) `mask` is nonzero.

The same tile as gapkernels/triton/kernels.py (ROWS rows by BLOCK_S positions; NCS: consecutive
(n, c) rows, each with its own span; NSC: a block of channels of one row) and its math helpers:
the max rule (`_combine_lanes`), GeM's online rescaling (`_gem_merge`, `_gem_reduce_lanes`) and
the finishing step (`_write_results`, with the row's count in place of S). Positions outside a
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

from gapkernels.triton.kernels import (
    MODE_AVG,
    MODE_CAT,
    MODE_GEM,
    MODE_MAX,
    MODE_MIXED,
    _combine_lanes,
    _gem_merge,
    _gem_reduce_lanes,
    _load_weight,
    _offsets,
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
def token_forward_kernel(
    x_ptr,
    spans_ptr,
    mask_ptr,
    weight_ptr,
    out_ptr,
    aux_ptr,
    indices_ptr,
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
    ROWS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Reads each position that takes part once; writes out, aux and indices. Grid: row blocks."""
    NEEDS_SUM: tl.constexpr = MODE != MODE_MAX and MODE != MODE_GEM
    NEEDS_MAX: tl.constexpr = MODE == MODE_MAX or MODE == MODE_MIXED or MODE == MODE_CAT
    row, b, channel, row_mask, base = _token_rows(
        tl.program_id(0), B, C, S, ROWS, CHANNELS_LAST, VARLEN
    )
    begin, end, count, origin = _span(spans_ptr, b, row_mask)
    lo = tl.min(tl.where(row_mask, begin, S))
    hi = tl.max(tl.where(row_mask, end, 0))

    lane_sum = tl.zeros([ROWS, BLOCK_S], tl.float32)
    lane_log = tl.zeros([ROWS, BLOCK_S], tl.float32)
    if MODE == MODE_GEM:
        p = _load_weight(weight_ptr, weight_stride, scalar, channel, row_mask, WEIGHT_KIND)[:, None]
        lane_max = tl.zeros([ROWS, BLOCK_S], tl.float32)  # the empty GeM state: m = 0
    else:
        lane_max = tl.full([ROWS, BLOCK_S], float("-inf"), tl.float32)
    lane_index = tl.zeros([ROWS, BLOCK_S], tl.int64) + S  # S: the lane has seen nothing
    for s_start in range(lo, hi, BLOCK_S):
        s = s_start + tl.arange(0, BLOCK_S)
        part = _takes_part(s, begin, end, b, mask_ptr, S, row_mask, HAS_MASK)
        v = tl.load(x_ptr + _offsets(base, s, C, CHANNELS_LAST), mask=part, other=0.0)
        v = v.to(tl.float32)
        if MODE == MODE_GEM:
            y = tl.where(v < eps, eps, v)  # clamp(v, min=eps), keeping NaN
            m_new, r_new, log_new = _gem_merge(
                lane_max, lane_sum, lane_log, y, 1.0, 0.0, p, WITH_LOG
            )
            lane_max = tl.where(part, m_new, lane_max)
            lane_sum = tl.where(part, r_new, lane_sum)
            if WITH_LOG:
                lane_log = tl.where(part, log_new, lane_log)
        elif NEEDS_SUM:
            lane_sum += v
        if NEEDS_MAX:
            first = lane_index == S
            take = part & ((v > lane_max) | (v != v) | first)
            lane_max = tl.where(take, v, lane_max)
            lane_index = tl.where(take, s[None, :], lane_index)

    empty = count == 0
    count_f = tl.where(empty, 1.0, count.to(tl.float32))
    if MODE == MODE_GEM:
        row_max, total, total_log = _gem_reduce_lanes(lane_max, lane_sum, lane_log, p, WITH_LOG)
        row_max = tl.where(empty, 0.0, row_max)
        total = tl.where(empty, 1.0, total)
        total_log = tl.where(empty, 0.0, total_log)
        row_index = row
    else:
        total = tl.sum(lane_sum, axis=1)
        total_log = total
        if NEEDS_MAX:
            row_max, row_index = _combine_lanes(lane_max, lane_index, S)
            row_max = tl.where(empty, 0.0, row_max)
            row_index = tl.where(empty, -1, row_index - origin)
        else:
            row_max = total
            row_index = row
    _write_results(
        total,
        total_log,
        row_max,
        row_index,
        row,
        channel,
        row_mask,
        weight_ptr,
        weight_stride,
        scalar,
        out_ptr,
        aux_ptr,
        indices_ptr,
        C,
        count_f,
        MODE,
        WEIGHT_KIND,
        WITH_LOG,
    )


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
    s_per_program,
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
    Grid: (row blocks, pieces of s_per_program positions of the rows' own range)."""
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
    piece_begin = own_begin + tl.program_id(1) * s_per_program
    piece_end = tl.minimum(piece_begin + s_per_program, own_end)
    lo = tl.min(tl.where(row_mask, piece_begin, S))
    hi = tl.max(tl.where(row_mask, piece_end, 0))
    grad_dtype = grad_x_ptr.dtype.element_ty
    count_f = tl.maximum(count, 1).to(tl.float32)

    if MODE == MODE_CAT:
        out_offset = row + (row - channel)  # b * 2C + c
        per_element = tl.load(grad_out_ptr + out_offset, mask=row_mask, other=0.0)
        at_index = tl.load(grad_out_ptr + out_offset + C, mask=row_mask, other=0.0)
        per_element = per_element.to(tl.float32) / count_f
        at_index = at_index.to(tl.float32)
    else:
        g = tl.load(grad_out_ptr + row, mask=row_mask, other=0.0).to(tl.float32)
        if MODE == MODE_AVG:
            per_element = g / count_f
        elif MODE == MODE_MAX:
            at_index = g
        elif MODE == MODE_MIXED:
            alpha = _load_weight(weight_ptr, weight_stride, scalar, channel, row_mask, WEIGHT_KIND)
            per_element = (1.0 - alpha) * g / count_f
            at_index = alpha * g
        else:
            p = _load_weight(weight_ptr, weight_stride, scalar, channel, row_mask, WEIGHT_KIND)
            big_m = tl.load(aux_ptr + AUX_COLUMNS * row, mask=row_mask, other=1.0)
            r = tl.load(aux_ptr + AUX_COLUMNS * row + 1, mask=row_mask, other=1.0)
            coef = (g * tl.exp((1.0 / p - 1.0) * tl.log(r)) / count_f)[:, None]
            big_m = big_m[:, None]
            p_minus_one = (p - 1.0)[:, None]
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
        if MODE == MODE_GEM:
            v = tl.load(x_ptr + offsets, mask=part, other=0.0).to(tl.float32)
            powered = tl.where(p_minus_one == 0.0, 1.0, tl.exp(p_minus_one * tl.log(v / big_m)))
            grad = tl.where(part & (v >= eps), coef * powered, 0.0)
        elif MODE == MODE_AVG:
            grad = tl.where(part, per_element[:, None], 0.0)
        elif MODE == MODE_MAX:
            grad = tl.where(part & (s[None, :] == index), at_index[:, None], 0.0)
        else:
            grad = tl.where(part, per_element[:, None], 0.0) + tl.where(
                part & (s[None, :] == index), at_index[:, None], 0.0
            )
        tl.store(grad_x_ptr + offsets, grad.to(grad_dtype), mask=own)
