"""Triton kernels for the pool ops of docs/DESIGN.md: one forward kernel, one backward kernel,
and a small combine kernel for a forward whose S is split over several programs.

Mode, layout and weight kind are `tl.constexpr` parameters, so each call compiles to exactly the
code its mode needs. Both layouts use the same tile: ROWS (n, c) rows by BLOCK_S spatial offsets.
NCS: rows are consecutive (n, c) pairs and a row's S elements are contiguous. NSC: rows are a
block of consecutive channels of one sample, contiguous in memory for each spatial offset.

All statistics accumulate in float32 per lane of the tile and are reduced with `tl.sum` /
`tl.max` / `tl.min` at the end: the reduction order depends only on the tile shape, which
depends only on the input's shape (deterministic, no atomics).
"""
import triton
import triton.language as tl

MODE_AVG: tl.constexpr = tl.constexpr(0)
MODE_MAX: tl.constexpr = tl.constexpr(1)
MODE_MIXED: tl.constexpr = tl.constexpr(2)
MODE_CAT: tl.constexpr = tl.constexpr(3)
MODE_GEM: tl.constexpr = tl.constexpr(4)

# How alpha (MIXED) or p (GEM) is given: the `scalar` argument, a 1-element tensor, or a
# per-channel tensor.
WEIGHT_SCALAR: tl.constexpr = tl.constexpr(0)
WEIGHT_SHARED: tl.constexpr = tl.constexpr(1)
WEIGHT_PER_CHANNEL: tl.constexpr = tl.constexpr(2)

LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _row_block(pid, N, C, S, ROWS: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """The ROWS rows of program `pid`: their (N, C) flat index n*C + c, channel, mask, and the
    int64 offset of their element s = 0 in x."""
    if CHANNELS_LAST:
        channel_blocks = tl.cdiv(C, ROWS)
        n = pid // channel_blocks
        channel = (pid % channel_blocks) * ROWS + tl.arange(0, ROWS)
        row_mask = channel < C
        row = n * C + channel
        base = n.to(tl.int64) * S * C + channel
    else:
        row = pid * ROWS + tl.arange(0, ROWS)
        row_mask = row < N * C
        channel = row % C
        base = row.to(tl.int64) * S
    return row, channel, row_mask, base


@triton.jit
def _offsets(base, s, C, CHANNELS_LAST: tl.constexpr):
    """Offsets in x of rows `base` (ROWS,) at spatial offsets `s` (BLOCK_S,): (ROWS, BLOCK_S)."""
    if CHANNELS_LAST:
        return base[:, None] + s.to(tl.int64)[None, :] * C
    return base[:, None] + s[None, :]


@triton.jit
def _load_weight(weight_ptr, scalar, channel, row_mask, WEIGHT_KIND: tl.constexpr):
    """alpha or p for each row, float32."""
    if WEIGHT_KIND == WEIGHT_PER_CHANNEL:
        w = tl.load(weight_ptr + channel, mask=row_mask, other=1.0).to(tl.float32)
    elif WEIGHT_KIND == WEIGHT_SHARED:
        w = tl.zeros(channel.shape, tl.float32) + tl.load(weight_ptr).to(tl.float32)
    else:
        w = tl.zeros(channel.shape, tl.float32) + scalar
    return w


@triton.jit
def _combine_lanes(lane_max, lane_index, S):
    """Per row, the (max, index) of torch's scan over all lanes, from each lane's own scan:
    a NaN lane wins (the largest index among NaN lanes: the last NaN), else the largest value
    with the smallest index among the lanes that reach it (the first maximum)."""
    lane_nan = lane_max != lane_max
    any_nan = tl.max(lane_nan.to(tl.int32), axis=1) > 0
    nan_index = tl.max(tl.where(lane_nan, lane_index, -1), axis=1)
    number_max = tl.max(tl.where(lane_nan, float("-inf"), lane_max), axis=1)
    first_index = tl.min(tl.where(lane_max == number_max[:, None], lane_index, S), axis=1)
    row_max = tl.where(any_nan, float("nan"), number_max)
    row_index = tl.where(any_nan, nan_index, first_index)
    return row_max, row_index


@triton.jit
def _write_results(total, total_log, row_max, row_index, row, channel, row_mask,
                   weight_ptr, scalar, out_ptr, aux_ptr, indices_ptr, C, S,
                   MODE: tl.constexpr, WEIGHT_KIND: tl.constexpr, WITH_LOG: tl.constexpr):
    """out, aux and indices of complete rows from their float32 statistics."""
    out_dtype = out_ptr.dtype.element_ty
    mean = total / S
    if MODE == MODE_AVG:
        tl.store(out_ptr + row, mean.to(out_dtype), mask=row_mask)
    elif MODE == MODE_MAX:
        tl.store(out_ptr + row, row_max.to(out_dtype), mask=row_mask)
    elif MODE == MODE_MIXED:
        alpha = _load_weight(weight_ptr, scalar, channel, row_mask, WEIGHT_KIND)
        mixed = alpha * row_max + (1.0 - alpha) * mean
        tl.store(out_ptr + row, mixed.to(out_dtype), mask=row_mask)
        tl.store(aux_ptr + row, row_max - mean, mask=row_mask)
    elif MODE == MODE_CAT:
        avg_offset = row + (row - channel)  # n * 2C + c
        tl.store(out_ptr + avg_offset, mean.to(out_dtype), mask=row_mask)
        tl.store(out_ptr + avg_offset + C, row_max.to(out_dtype), mask=row_mask)
    else:
        p = _load_weight(weight_ptr, scalar, channel, row_mask, WEIGHT_KIND)
        gem = tl.exp2(tl.log2(mean) / p)
        tl.store(out_ptr + row, gem.to(out_dtype), mask=row_mask)
        if WITH_LOG:
            tl.store(aux_ptr + 2 * row, mean, mask=row_mask)
            tl.store(aux_ptr + 2 * row + 1, total_log * LN2 / S, mask=row_mask)
        else:
            tl.store(aux_ptr + row, mean, mask=row_mask)
    if MODE == MODE_MAX or MODE == MODE_MIXED or MODE == MODE_CAT:
        tl.store(indices_ptr + row, row_index.to(tl.int64), mask=row_mask)


@triton.jit
def pool_forward_kernel(x_ptr, weight_ptr, out_ptr, aux_ptr, indices_ptr,
                        partial_stats_ptr, partial_index_ptr,
                        N, C, S, s_per_split, scalar, eps,
                        MODE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                        WEIGHT_KIND: tl.constexpr, WITH_LOG: tl.constexpr,
                        SPLIT: tl.constexpr, INDEX_64: tl.constexpr,
                        ROWS: tl.constexpr, BLOCK_S: tl.constexpr):
    """Reads each element of x once. Grid: (row blocks, splits of S). Without SPLIT it writes
    out/aux/indices; with SPLIT, each program writes its rows' partial statistics for its piece
    of S ([splits, 3, N*C] sum / max / log-sum and [splits, N*C] index) for the combine kernel."""
    NEEDS_SUM: tl.constexpr = MODE != MODE_MAX
    NEEDS_MAX: tl.constexpr = MODE == MODE_MAX or MODE == MODE_MIXED or MODE == MODE_CAT
    row, channel, row_mask, base = _row_block(tl.program_id(0), N, C, S, ROWS, CHANNELS_LAST)
    split = tl.program_id(1)
    s_begin = split * s_per_split
    s_end = tl.minimum(S, s_begin + s_per_split)
    if MODE == MODE_GEM:
        p = _load_weight(weight_ptr, scalar, channel, row_mask, WEIGHT_KIND)[:, None]

    lane_sum = tl.zeros([ROWS, BLOCK_S], tl.float32)
    lane_log = tl.zeros([ROWS, BLOCK_S], tl.float32)
    lane_max = tl.full([ROWS, BLOCK_S], float("-inf"), tl.float32)
    if INDEX_64:
        lane_index = tl.zeros([ROWS, BLOCK_S], tl.int64)
    else:
        lane_index = tl.zeros([ROWS, BLOCK_S], tl.int32)
    for s_start in range(s_begin, s_end, BLOCK_S):
        s = (s_start + tl.arange(0, BLOCK_S)).to(lane_index.dtype)
        mask = row_mask[:, None] & (s < s_end)[None, :]
        v = tl.load(x_ptr + _offsets(base, s, C, CHANNELS_LAST), mask=mask, other=0.0)
        v = v.to(tl.float32)
        if MODE == MODE_GEM:
            # clamp(v, min=eps) that keeps NaN (tl.maximum's NaN handling is not portable)
            clamped = tl.where(v < eps, eps, v)
            log2_clamped = tl.log2(clamped)
            powered = tl.where(mask, tl.exp2(p * log2_clamped), 0.0)
            lane_sum += powered
            if WITH_LOG:
                lane_log += powered * log2_clamped
        elif NEEDS_SUM:
            lane_sum += v
        if NEEDS_MAX:
            v = tl.where(mask, v, float("-inf"))
            take = (v > lane_max) | (v != v)  # torch's rule: greater, or NaN
            lane_max = tl.where(take, v, lane_max)
            lane_index = tl.where(take, s[None, :], lane_index)

    total = tl.sum(lane_sum, axis=1)
    total_log = tl.sum(lane_log, axis=1)
    if NEEDS_MAX:
        row_max, row_index = _combine_lanes(lane_max, lane_index, S)
    else:
        row_max = total
        row_index = row
    if SPLIT:
        rows_total = N * C
        stats = partial_stats_ptr + split.to(tl.int64) * 3 * rows_total + row
        tl.store(stats, total, mask=row_mask)
        tl.store(stats + rows_total, row_max, mask=row_mask)
        tl.store(stats + 2 * rows_total, total_log, mask=row_mask)
        if NEEDS_MAX:
            tl.store(partial_index_ptr + split.to(tl.int64) * rows_total + row,
                     row_index.to(tl.int64), mask=row_mask)
    else:
        _write_results(total, total_log, row_max, row_index, row, channel, row_mask,
                       weight_ptr, scalar, out_ptr, aux_ptr, indices_ptr, C, S,
                       MODE, WEIGHT_KIND, WITH_LOG)


@triton.jit
def pool_combine_kernel(partial_stats_ptr, partial_index_ptr, weight_ptr,
                        out_ptr, aux_ptr, indices_ptr, N, C, S, splits, scalar,
                        MODE: tl.constexpr, WEIGHT_KIND: tl.constexpr, WITH_LOG: tl.constexpr,
                        ROWS: tl.constexpr):
    """Combines the splits' partial statistics in split order (the scan order of S, so the
    max rule of torch applies to them as it does to elements) and writes the results."""
    NEEDS_MAX: tl.constexpr = MODE == MODE_MAX or MODE == MODE_MIXED or MODE == MODE_CAT
    rows_total = N * C
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = row < rows_total
    channel = row % C
    total = tl.zeros([ROWS], tl.float32)
    total_log = tl.zeros([ROWS], tl.float32)
    row_max = tl.full([ROWS], float("-inf"), tl.float32)
    row_index = tl.zeros([ROWS], tl.int64)
    # int32 offsets suffice: S is split only when there are few rows (configs.forward_config),
    # so the partial buffers hold a few million elements at most.
    for split in range(0, splits):
        stats = partial_stats_ptr + split * 3 * rows_total + row
        total += tl.load(stats, mask=row_mask, other=0.0)
        total_log += tl.load(stats + 2 * rows_total, mask=row_mask, other=0.0)
        if NEEDS_MAX:
            piece_max = tl.load(stats + rows_total, mask=row_mask, other=float("-inf"))
            piece_index = tl.load(partial_index_ptr + split * rows_total + row,
                                  mask=row_mask, other=0)
            take = (piece_max > row_max) | (piece_max != piece_max)
            row_max = tl.where(take, piece_max, row_max)
            row_index = tl.where(take, piece_index, row_index)
    _write_results(total, total_log, row_max, row_index, row, channel, row_mask,
                   weight_ptr, scalar, out_ptr, aux_ptr, indices_ptr, C, S,
                   MODE, WEIGHT_KIND, WITH_LOG)


@triton.jit
def pool_backward_kernel(grad_out_ptr, x_ptr, aux_ptr, indices_ptr, weight_ptr, grad_x_ptr,
                         N, C, S, s_per_program, scalar, eps,
                         MODE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                         WEIGHT_KIND: tl.constexpr, AUX_COLUMNS: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK_S: tl.constexpr):
    """Writes each element of grad_x once: A + (s == index) * B per row, or for GEM
    coef * clamp(x, eps) ** (p - 1) where x >= eps. Grid: (row blocks, pieces of S)."""
    row, channel, row_mask, base = _row_block(tl.program_id(0), N, C, S, ROWS, CHANNELS_LAST)
    s_begin = tl.program_id(1) * s_per_program
    s_end = tl.minimum(S, s_begin + s_per_program)
    grad_dtype = grad_x_ptr.dtype.element_ty

    if MODE == MODE_CAT:
        out_offset = row + (row - channel)  # n * 2C + c
        per_element = tl.load(grad_out_ptr + out_offset, mask=row_mask, other=0.0)
        at_index = tl.load(grad_out_ptr + out_offset + C, mask=row_mask, other=0.0)
        per_element = per_element.to(tl.float32) / S
        at_index = at_index.to(tl.float32)
    else:
        g = tl.load(grad_out_ptr + row, mask=row_mask, other=0.0).to(tl.float32)
        if MODE == MODE_AVG:
            per_element = g / S
        elif MODE == MODE_MAX:
            at_index = g
        elif MODE == MODE_MIXED:
            alpha = _load_weight(weight_ptr, scalar, channel, row_mask, WEIGHT_KIND)
            per_element = (1.0 - alpha) * g / S
            at_index = alpha * g
        else:
            p = _load_weight(weight_ptr, scalar, channel, row_mask, WEIGHT_KIND)
            mean = tl.load(aux_ptr + AUX_COLUMNS * row, mask=row_mask, other=1.0)
            coef = (g * tl.exp2((1.0 / p - 1.0) * tl.log2(mean)) / S)[:, None]
            p_minus_one = (p - 1.0)[:, None]
    if MODE == MODE_MAX or MODE == MODE_MIXED or MODE == MODE_CAT:
        index = tl.load(indices_ptr + row, mask=row_mask, other=-1)[:, None]

    for s_start in range(s_begin, s_end, BLOCK_S):
        s = s_start + tl.arange(0, BLOCK_S)
        mask = row_mask[:, None] & (s < s_end)[None, :]
        offsets = _offsets(base, s, C, CHANNELS_LAST)
        if MODE == MODE_GEM:
            v = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            # x >= eps is False for NaN: NaN gets 0, as clamp's gradient gives
            grad = tl.where(v >= eps, coef * tl.exp2(p_minus_one * tl.log2(v)), 0.0)
        elif MODE == MODE_AVG:
            grad = tl.zeros([ROWS, BLOCK_S], tl.float32) + per_element[:, None]
        elif MODE == MODE_MAX:
            grad = tl.where(s[None, :] == index, at_index[:, None], 0.0)
        else:
            grad = per_element[:, None] + tl.where(s[None, :] == index, at_index[:, None], 0.0)
        tl.store(grad_x_ptr + offsets, grad.to(grad_dtype), mask=mask)
