"""Where the pool kernels' programs work (the Triton mirror of csrc/cpu/layout.h and
csrc/cuda/layout.cuh): a tile's rows and their offsets in x, a program's piece of S, and the
weight (alpha or p) of each row.

Both layouts use the same tile: ROWS (n, c) rows by BLOCK_S spatial offsets. NCS: rows are
consecutive (n, c) pairs and a row's S elements are contiguous. NSC: rows are a block of
consecutive channels of one sample, contiguous in memory for each spatial offset.

Index arithmetic: element offsets in x are int64 (`_row_block`'s base, `_offsets`), so a tensor
may pass 2**31 elements. Row indices (n*C + c), spatial offsets, loop bounds and the arg-max
lanes are int32 unless INDEX_64 (`_row_block`, `_piece`), which the launcher sets when any of
them (or 3 * N*C, the aux offsets) could reach 2**31; the combine kernel's rows are int64.
"""

import triton
import triton.language as tl

# How alpha (MIXED) or p (GEM) is given: the `scalar` argument, a 1-element tensor, or a
# per-channel tensor (read at `weight_ptr + c * weight_stride`: any stride, 0 included). The
# kernels pass it on as the tuple `weight = (weight_ptr, weight_stride, scalar)`.
WEIGHT_SCALAR: tl.constexpr = tl.constexpr(0)
WEIGHT_SHARED: tl.constexpr = tl.constexpr(1)
WEIGHT_PER_CHANNEL: tl.constexpr = tl.constexpr(2)


@triton.jit
def _float32(value):
    """A float argument (scalar, eps) as float32, cast once at the top of every kernel. A direct
    launch types a Python float fp32, but Inductor's launch of a user-defined kernel
    (torch.compile) types it fp64: uncast, it would turn the statistics it meets fp64 (a
    loop-carried type error where they accumulate, fp64 math elsewhere)."""
    return tl.cast(value, tl.float32)


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
def _load_weight(weight, channel, row_mask, WEIGHT_KIND: tl.constexpr):
    """alpha or p for each row, float32; `weight` = (weight_ptr, weight_stride, scalar)."""
    weight_ptr, weight_stride, scalar = weight
    if WEIGHT_KIND == WEIGHT_PER_CHANNEL:
        w = tl.load(weight_ptr + channel * weight_stride, mask=row_mask, other=1.0)
        w = w.to(tl.float32)
    elif WEIGHT_KIND == WEIGHT_SHARED:
        w = tl.zeros(channel.shape, tl.float32) + tl.load(weight_ptr).to(tl.float32)
    else:
        w = tl.zeros(channel.shape, tl.float32) + scalar
    return w
