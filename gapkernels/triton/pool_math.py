"""The pooling math of the Triton kernels, in one place: the Triton mirror of csrc/pool_math.h
(the modes, torch's max rule, GeM's online rescaling, each mode's finishing formula and GeM's
gradient). The contract is docs/DESIGN.md ("Modes", "Max semantics").

All statistics are float32. The max rule: a lane scans its elements in order and takes a value
that is greater than its maximum or NaN (`(v > m) | (v != v)`, in the kernels' loops), so the
first maximum wins a tie and the last NaN wins; `_combine_lanes` merges the lanes' scans.

GeM (stable): every lane keeps a running maximum m of y = clamp(x, eps) and the sums
r = sum (y/m)**p and l = sum (y/m)**p * log(y/m) relative to it; when m grows the sums are
rescaled (`_gem_merge`). Lanes, then split pieces, are merged the same way. Only natural
tl.exp / tl.log are used, on ratios in [0, 1]; a ratio that underflows (or is flushed to zero)
gives t**p = 0 and t**p * log t = 0, its exact limit, never NaN.

Loaded without torch by the ahead-of-time compile (gapkernels/triton/aot.py) and by
tests/test_definitions.py, which checks the mode numbers against gapkernels.ops.
"""

import triton
import triton.language as tl

MODE_AVG: tl.constexpr = tl.constexpr(0)
MODE_MAX: tl.constexpr = tl.constexpr(1)
MODE_MIXED: tl.constexpr = tl.constexpr(2)
MODE_CAT: tl.constexpr = tl.constexpr(3)
MODE_GEM: tl.constexpr = tl.constexpr(4)


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
def _nan_max(values, axis: tl.constexpr):
    """Max along `axis` that is NaN when any value is NaN."""
    is_nan = values != values
    any_nan = tl.max(is_nan.to(tl.int32), axis=axis) > 0
    number_max = tl.max(tl.where(is_nan, float("-inf"), values), axis=axis)
    return tl.where(any_nan, float("nan"), number_max)


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
def _gem_scan(m, r, lg, v, mask, p, eps, WITH_LOG: tl.constexpr):
    """The scan's step: each lane's state (m, r, l) merged with its element v where `mask`
    (y = clamp(v, min=eps) is the state (y, 1, 0))."""
    # clamp(v, min=eps) that keeps NaN (tl.maximum's NaN handling is not portable)
    y = tl.where(v < eps, eps, v)
    m_new, r_new, lg_new = _gem_merge(m, r, lg, y, 1.0, 0.0, p, WITH_LOG)
    m = tl.where(mask, m_new, m)
    r = tl.where(mask, r_new, r)
    if WITH_LOG:
        lg = tl.where(mask, lg_new, lg)
    return m, r, lg


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
def _mixed_value(alpha, row_max, mean):
    """MIXED (and avgmax, alpha = 0.5): alpha * max + (1 - alpha) * avg."""
    return alpha * row_max + (1.0 - alpha) * mean


@triton.jit
def _gem_value(row_max, mean, p):
    """GeM: M * r ** (1/p) with r = mean (y/M)**p; M itself when M = +inf."""
    # r is in [1/S, 1]: its log is finite and accurate
    gem = row_max * tl.exp(tl.log(mean) / p)
    return tl.where(row_max == float("inf"), row_max, gem)


@triton.jit
def _gem_grad_scale(g, r, p, count):
    """GeM backward's row coefficient A = g * r ** (1/p - 1) / count."""
    # r is in [1/S, 1]: r ** (1/p - 1) is finite
    return g * tl.exp((1.0 / p - 1.0) * tl.log(r)) / count


@triton.jit
def _gem_grad(v, eps, coef, big_m, p_minus_one):
    """GeM backward's element gradient: coef * (x / M) ** (p - 1) where x >= eps, else 0."""
    # (x/M) ** (p-1), 1 when p == 1 (also where x/M flushes to 0)
    powered = tl.where(p_minus_one == 0.0, 1.0, tl.exp(p_minus_one * tl.log(v / big_m)))
    # x >= eps is False for NaN: NaN gets 0, as clamp's gradient gives
    return tl.where(v >= eps, coef * powered, 0.0)
