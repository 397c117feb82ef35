"""Triton kernels for the pool ops of docs/DESIGN.md: one forward kernel, one backward kernel,
and a small combine kernel for a forward whose S is split over several programs.

Mode, layout and weight kind are `tl.constexpr` parameters, so each call compiles to exactly the
code its mode needs. Both layouts use the same tile: ROWS (n, c) rows by BLOCK_S spatial offsets.
NCS: rows are consecutive (n, c) pairs and a row's S elements are contiguous. NSC: rows are a
block of consecutive channels of one sample, contiguous in memory for each spatial offset.

All statistics accumulate in float32 per lane of the tile and are reduced with `tl.sum` /
`tl.max` / `tl.min` at the end: the reduction order depends only on the tile shape, which
depends only on the input's shape (deterministic, no atomics).

Index arithmetic: element offsets in x are int64 (`_row_block`'s base, `_offsets`), so a tensor
may pass 2**31 elements. Row indices (n*C + c), spatial offsets, loop bounds and the arg-max
lanes are int32 unless INDEX_64 (`_row_block`, `_piece`), which the launcher sets when any of
them (or 3 * N*C, the aux offsets) could reach 2**31; the combine kernel's rows are int64.

GeM (stable, docs/DESIGN.md "Modes"): every lane keeps a running maximum m of y = clamp(x, eps)
and the sums r = sum (y/m)**p and l = sum (y/m)**p * log(y/m) relative to it; when m grows the
sums are rescaled (`_gem_merge`). Lanes, then split pieces, are merged the same way. Only
natural tl.exp / tl.log are used, on ratios in [0, 1]; a ratio that underflows (or is flushed to
zero) gives t**p = 0 and t**p * log t = 0, its exact limit, never NaN.
"""

import triton
import triton.language as tl

MODE_AVG: tl.constexpr = tl.constexpr(0)
MODE_MAX: tl.constexpr = tl.constexpr(1)
MODE_MIXED: tl.constexpr = tl.constexpr(2)
MODE_CAT: tl.constexpr = tl.constexpr(3)
MODE_GEM: tl.constexpr = tl.constexpr(4)

# How alpha (MIXED) or p (GEM) is given: the `scalar` argument, a 1-element tensor, or a
# per-channel tensor (read at `weight_ptr + c * weight_stride`: any stride, 0 included).
WEIGHT_SCALAR: tl.constexpr = tl.constexpr(0)
WEIGHT_SHARED: tl.constexpr = tl.constexpr(1)
WEIGHT_PER_CHANNEL: tl.constexpr = tl.constexpr(2)


@triton.jit
def _row_block(
    pid, N, C, S, ROWS: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr
):
    """The ROWS rows of program `pid`: their (N, C) flat index n*C + c, channel, mask, and the
    int64 offset of their element s = 0 in x (N*C*S may pass 2**31). Row index and channel are
    int64 with INDEX_64, else int32 (the launcher sets INDEX_64 when 3 * (N*C + ROWS), the
    largest row-indexed offset (aux, CAT's output), could reach 2**31): int64 rows cost a
    quarter more registers in the backward."""
    if CHANNELS_LAST:
        channel_blocks = tl.cdiv(C, ROWS)
        n = pid // channel_blocks
        channel = (pid % channel_blocks) * ROWS + tl.arange(0, ROWS)
        row_mask = channel < C
        if INDEX_64:
            n = tl.cast(n, tl.int64)
            channel = tl.cast(channel, tl.int64)
        row = n * C + channel
        base = tl.cast(n, tl.int64) * S * C + channel
    else:
        if INDEX_64:
            row = tl.cast(pid, tl.int64) * ROWS + tl.arange(0, ROWS)
            row_mask = row < tl.cast(N, tl.int64) * C
        else:
            row = pid * ROWS + tl.arange(0, ROWS)
            row_mask = row < N * C
        channel = row % C
        base = tl.cast(row, tl.int64) * S
    return row, channel, row_mask, base


@triton.jit
def _piece(pid, per_program, S, INDEX_64: tl.constexpr):
    """[s_begin, s_end) of S handled by program `pid` along grid axis 1: int64 with INDEX_64,
    else int32 (the launcher sets INDEX_64 unless S + per_program + BLOCK_S < 2**31, so that
    no spatial offset, loop bound or step past the end can wrap; see pool.index_64)."""
    if INDEX_64:
        s_begin = tl.cast(pid, tl.int64) * per_program
        s_end = tl.minimum(s_begin + per_program, tl.cast(S, tl.int64))
    else:
        s_begin = pid * per_program
        s_end = tl.minimum(s_begin + per_program, S)
    return s_begin, s_end


@triton.jit
def _offsets(base, s, C, CHANNELS_LAST: tl.constexpr):
    """Offsets in x of rows `base` (ROWS,) int64 at spatial offsets `s` (BLOCK_S,): (ROWS,
    BLOCK_S) int64 (NSC: s * C in int64, it can pass 2**31 when S does not)."""
    if CHANNELS_LAST:
        return base[:, None] + tl.cast(s, tl.int64)[None, :] * C
    return base[:, None] + s[None, :]


@triton.jit
def _load_weight(weight_ptr, weight_stride, scalar, channel, row_mask, WEIGHT_KIND: tl.constexpr):
    """alpha or p for each row, float32."""
    if WEIGHT_KIND == WEIGHT_PER_CHANNEL:
        w = tl.load(weight_ptr + channel * weight_stride, mask=row_mask, other=1.0)
        w = w.to(tl.float32)
    elif WEIGHT_KIND == WEIGHT_SHARED:
        w = tl.zeros(channel.shape, tl.float32) + tl.load(weight_ptr).to(tl.float32)
    else:
        w = tl.zeros(channel.shape, tl.float32) + scalar
    return w


@triton.jit
def _pow_ratio(t, q):
    """(t ** q, t ** q * log t) for t in [0, 1] (or NaN) and q > 0, with natural exp/log.
    t = 0, or a t the hardware flushes to zero, gives (0, 0): the limits as t -> 0."""
    log_t = tl.log(t)
    tq = tl.exp(q * log_t)
    return tq, tl.where(tq > 0.0, tq * log_t, 0.0)


@triton.jit
def _gem_merge(m, r, lg, m2, r2, lg2, p, WITH_LOG: tl.constexpr):
    """Merges two GeM states (max m, r = sum (y/m)**p, l = sum (y/m)**p log(y/m)): the one with
    the smaller max is rescaled by k**p, k = smaller/larger (l: k**p * (l + log k * r)).
    A NaN max wins (the result is NaN); m = 0 is the empty state (r = l = 0)."""
    grow = (m2 > m) | (m2 != m2)
    m_new = tl.where(grow, m2, m)
    kp, kp_log = _pow_ratio(tl.where(grow, m, m2) / m_new, p)
    r_new = tl.where(grow, r * kp + r2, r + r2 * kp)
    if WITH_LOG:
        lg_new = tl.where(grow, kp * lg + kp_log * r + lg2, lg + kp * lg2 + kp_log * r2)
    else:
        lg_new = lg
    return m_new, r_new, lg_new


@triton.jit
def _nan_max(values, axis: tl.constexpr):
    """Max along `axis` that is NaN when any value is NaN."""
    is_nan = values != values
    any_nan = tl.max(is_nan.to(tl.int32), axis=axis) > 0
    number_max = tl.max(tl.where(is_nan, float("-inf"), values), axis=axis)
    return tl.where(any_nan, float("nan"), number_max)


@triton.jit
def _gem_reduce_lanes(lane_m, lane_r, lane_log, p, WITH_LOG: tl.constexpr):
    """Per row, the GeM state of all lanes: each lane rescaled to the row's maximum, then summed
    (lanes that saw no element have m = 0: they add 0)."""
    row_m = _nan_max(lane_m, 1)
    kp, kp_log = _pow_ratio(lane_m / row_m[:, None], p)
    row_r = tl.sum(kp * lane_r, axis=1)
    if WITH_LOG:
        row_log = tl.sum(kp * lane_log + kp_log * lane_r, axis=1)
    else:
        row_log = row_r
    return row_m, row_r, row_log


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
def _write_results(
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
    S,
    MODE: tl.constexpr,
    WEIGHT_KIND: tl.constexpr,
    WITH_LOG: tl.constexpr,
):
    """out, aux and indices of complete rows (int64 `row`) from their float32 statistics
    (GEM: total = r-sum, row_max = M, total_log = l-sum)."""
    out_dtype = out_ptr.dtype.element_ty
    mean = total / S
    if MODE == MODE_AVG:
        tl.store(out_ptr + row, mean.to(out_dtype), mask=row_mask)
    elif MODE == MODE_MAX:
        tl.store(out_ptr + row, row_max.to(out_dtype), mask=row_mask)
    elif MODE == MODE_MIXED:
        alpha = _load_weight(weight_ptr, weight_stride, scalar, channel, row_mask, WEIGHT_KIND)
        mixed = alpha * row_max + (1.0 - alpha) * mean
        tl.store(out_ptr + row, mixed.to(out_dtype), mask=row_mask)
        tl.store(aux_ptr + row, row_max - mean, mask=row_mask)
    elif MODE == MODE_CAT:
        avg_offset = row + (row - channel)  # n * 2C + c
        tl.store(out_ptr + avg_offset, mean.to(out_dtype), mask=row_mask)
        tl.store(out_ptr + avg_offset + C, row_max.to(out_dtype), mask=row_mask)
    else:
        p = _load_weight(weight_ptr, weight_stride, scalar, channel, row_mask, WEIGHT_KIND)
        # r = mean (y/M)**p is in [1/S, 1]: its log is finite and accurate
        gem = row_max * tl.exp(tl.log(mean) / p)
        gem = tl.where(row_max == float("inf"), row_max, gem)
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
    row, channel, row_mask, base = _row_block(
        tl.program_id(0), N, C, S, ROWS, CHANNELS_LAST, INDEX_64
    )
    split = tl.program_id(1)
    s_begin, s_end = _piece(split, s_per_split, S, INDEX_64)

    lane_sum = tl.zeros([ROWS, BLOCK_S], tl.float32)
    lane_log = tl.zeros([ROWS, BLOCK_S], tl.float32)
    if MODE == MODE_GEM:
        p = _load_weight(weight_ptr, weight_stride, scalar, channel, row_mask, WEIGHT_KIND)[:, None]
        lane_max = tl.zeros([ROWS, BLOCK_S], tl.float32)  # the empty GeM state: m = 0
    else:
        lane_max = tl.full([ROWS, BLOCK_S], float("-inf"), tl.float32)
    lane_index = tl.zeros([ROWS, BLOCK_S], s_begin.dtype)
    for s_start in range(s_begin, s_end, BLOCK_S):
        s = s_start + tl.arange(0, BLOCK_S)
        mask = row_mask[:, None] & (s < s_end)[None, :]
        v = tl.load(x_ptr + _offsets(base, s, C, CHANNELS_LAST), mask=mask, other=0.0)
        v = v.to(tl.float32)
        if MODE == MODE_GEM:
            # clamp(v, min=eps) that keeps NaN (tl.maximum's NaN handling is not portable)
            y = tl.where(v < eps, eps, v)
            m_new, r_new, log_new = _gem_merge(
                lane_max, lane_sum, lane_log, y, 1.0, 0.0, p, WITH_LOG
            )
            lane_max = tl.where(mask, m_new, lane_max)
            lane_sum = tl.where(mask, r_new, lane_sum)
            if WITH_LOG:
                lane_log = tl.where(mask, log_new, lane_log)
        elif NEEDS_SUM:
            lane_sum += v
        if NEEDS_MAX:
            v = tl.where(mask, v, float("-inf"))
            take = (v > lane_max) | (v != v)  # torch's rule: greater, or NaN
            lane_max = tl.where(take, v, lane_max)
            lane_index = tl.where(take, s[None, :], lane_index)

    if MODE == MODE_GEM:
        row_max, total, total_log = _gem_reduce_lanes(lane_max, lane_sum, lane_log, p, WITH_LOG)
        row_index = row
    else:
        total = tl.sum(lane_sum, axis=1)
        total_log = total
        if NEEDS_MAX:
            row_max, row_index = _combine_lanes(lane_max, lane_index, S)
        else:
            row_max = total
            row_index = row
    if SPLIT:
        rows_total = tl.cast(N, tl.int64) * C
        stats = partial_stats_ptr + tl.cast(split, tl.int64) * 3 * rows_total + row
        tl.store(stats, total, mask=row_mask)
        if NEEDS_MAX or MODE == MODE_GEM:
            tl.store(stats + rows_total, row_max, mask=row_mask)
        if WITH_LOG:
            tl.store(stats + 2 * rows_total, total_log, mask=row_mask)
        if NEEDS_MAX:
            tl.store(
                partial_index_ptr + tl.cast(split, tl.int64) * rows_total + row,
                row_index.to(tl.int64),
                mask=row_mask,
            )
    else:
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
            S,
            MODE,
            WEIGHT_KIND,
            WITH_LOG,
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
    """Combines the splits' partial statistics in split order (the scan order of S, so the
    max rule of torch applies to them as it does to elements; GEM merges the pieces' states
    in that order) and writes the results."""
    NEEDS_MAX: tl.constexpr = MODE == MODE_MAX or MODE == MODE_MIXED or MODE == MODE_CAT
    rows_total = tl.cast(N, tl.int64) * C
    row = tl.cast(tl.program_id(0), tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = row < rows_total
    channel = row % C
    total = tl.zeros([ROWS], tl.float32)
    total_log = tl.zeros([ROWS], tl.float32)
    row_index = tl.zeros([ROWS], tl.int64)
    if MODE == MODE_GEM:
        p = _load_weight(weight_ptr, weight_stride, scalar, channel, row_mask, WEIGHT_KIND)
        row_max = tl.zeros([ROWS], tl.float32)  # the empty GeM state
    else:
        row_max = tl.full([ROWS], float("-inf"), tl.float32)
    stats = partial_stats_ptr + row
    index_ptr = partial_index_ptr + row
    for _ in range(0, splits):
        piece_total = tl.load(stats, mask=row_mask, other=0.0)
        if MODE == MODE_GEM:
            piece_max = tl.load(stats + rows_total, mask=row_mask, other=1.0)
            if WITH_LOG:
                piece_log = tl.load(stats + 2 * rows_total, mask=row_mask, other=0.0)
            else:
                piece_log = piece_total
            row_max, total, total_log = _gem_merge(
                row_max, total, total_log, piece_max, piece_total, piece_log, p, WITH_LOG
            )
        else:
            total += piece_total
        if NEEDS_MAX:
            piece_max = tl.load(stats + rows_total, mask=row_mask, other=float("-inf"))
            piece_index = tl.load(index_ptr, mask=row_mask, other=0)
            take = (piece_max > row_max) | (piece_max != piece_max)
            row_max = tl.where(take, piece_max, row_max)
            row_index = tl.where(take, piece_index, row_index)
        stats += 3 * rows_total
        index_ptr += rows_total
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
        S,
        MODE,
        WEIGHT_KIND,
        WITH_LOG,
    )


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
    row, channel, row_mask, base = _row_block(
        tl.program_id(0), N, C, S, ROWS, CHANNELS_LAST, INDEX_64
    )
    s_begin, s_end = _piece(tl.program_id(1), s_per_program, S, INDEX_64)
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
            alpha = _load_weight(weight_ptr, weight_stride, scalar, channel, row_mask, WEIGHT_KIND)
            per_element = (1.0 - alpha) * g / S
            at_index = alpha * g
        else:
            p = _load_weight(weight_ptr, weight_stride, scalar, channel, row_mask, WEIGHT_KIND)
            big_m = tl.load(aux_ptr + AUX_COLUMNS * row, mask=row_mask, other=1.0)
            r = tl.load(aux_ptr + AUX_COLUMNS * row + 1, mask=row_mask, other=1.0)
            # r is in [1/S, 1]: r ** (1/p - 1) is finite
            coef = (g * tl.exp((1.0 / p - 1.0) * tl.log(r)) / S)[:, None]
            big_m = big_m[:, None]
            p_minus_one = (p - 1.0)[:, None]
    if MODE == MODE_MAX or MODE == MODE_MIXED or MODE == MODE_CAT:
        index = tl.load(indices_ptr + row, mask=row_mask, other=-1)[:, None]

    for s_start in range(s_begin, s_end, BLOCK_S):
        s = s_start + tl.arange(0, BLOCK_S)
        mask = row_mask[:, None] & (s < s_end)[None, :]
        offsets = _offsets(base, s, C, CHANNELS_LAST)
        if MODE == MODE_GEM:
            v = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            # (x/M) ** (p-1), 1 when p == 1 (also where x/M flushes to 0)
            powered = tl.where(p_minus_one == 0.0, 1.0, tl.exp(p_minus_one * tl.log(v / big_m)))
            # x >= eps is False for NaN: NaN gets 0, as clamp's gradient gives
            grad = tl.where(v >= eps, coef * powered, 0.0)
        elif MODE == MODE_AVG:
            grad = tl.zeros([ROWS, BLOCK_S], tl.float32) + per_element[:, None]
        elif MODE == MODE_MAX:
            grad = tl.where(s[None, :] == index, at_index[:, None], 0.0)
        else:
            grad = per_element[:, None] + tl.where(s[None, :] == index, at_index[:, None], 0.0)
        tl.store(grad_x_ptr + offsets, grad.to(grad_dtype), mask=mask)
