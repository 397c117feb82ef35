// The pooling math, one home for every device: the modes, torch's max rule (tie, NaN, index),
// GeM's powers and its online rescaling, and each mode's finishing step. Plain C++17 with no
// torch headers, so that the CPU units (g++) and the CUDA kernel units (nvcc, __host__ __device__)
// both include it. The contract is docs/DESIGN.md ("Modes", "Max semantics").
//
// Where a device has a faster way to form 1/y than a division (the CUDA kernels' call-free
// reciprocal()), the functions that need one take it as a `Reciprocal` callable; the host passes
// DivideReciprocal.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__CUDACC__)
#define GK_HOST_DEVICE __host__ __device__
#define GK_INLINE __forceinline__
#else
#define GK_HOST_DEVICE
#define GK_INLINE inline
#endif

namespace gapkernels {

// ---------------------------------------------------------------------------------------------
// Modes (the `mode` argument of the ops).
enum class Mode : int64_t { Avg = 0, Max = 1, Mixed = 2, Cat = 3, Gem = 4 };

GK_HOST_DEVICE GK_INLINE constexpr bool mode_has_max(Mode mode) {
  return mode == Mode::Max || mode == Mode::Mixed || mode == Mode::Cat;
}

// Number of aux columns (K in docs/DESIGN.md).
GK_HOST_DEVICE GK_INLINE constexpr int64_t aux_columns(Mode mode, bool with_log) {
  return mode == Mode::Mixed ? 1 : (mode == Mode::Gem ? (with_log ? 3 : 2) : 0);
}

template <typename acc_t>
GK_HOST_DEVICE GK_INLINE bool is_nan(acc_t v) {
  return v != v;
}

// ---------------------------------------------------------------------------------------------
// Max (torch's adaptive_max_pool2d): scan s = 0 .. S-1 from (-inf, index 0).

// The scan's step: v comes after every element already seen, and replaces the running maximum
// when it is larger or NaN. Hence the first maximum wins a tie and the last NaN wins.
template <typename acc_t>
GK_HOST_DEVICE GK_INLINE void scan_max(acc_t v, int64_t i, acc_t& m, int64_t& index) {
  if (v > m || is_nan(v)) {
    m = v;
    index = i;
  }
}

// True when the candidate (value, index) beats the current one: a NaN beats numbers and the later
// NaN wins; else the larger value, and the smaller index on a tie. A total order, so pieces of a
// row may be merged in any grouping and give the scan's answer.
template <typename acc_t>
GK_HOST_DEVICE GK_INLINE bool max_candidate_wins(acc_t current, int64_t current_index,
                                                 acc_t candidate, int64_t candidate_index) {
  if (is_nan(candidate)) return !is_nan(current) || candidate_index > current_index;
  if (is_nan(current)) return false;
  return candidate > current || (candidate == current && candidate_index < current_index);
}

// Merges another piece's (v, i) into (m, index).
template <typename acc_t>
GK_HOST_DEVICE GK_INLINE void merge_max(acc_t v, int64_t i, acc_t& m, int64_t& index) {
  if (max_candidate_wins(m, index, v, i)) {
    m = v;
    index = i;
  }
}

// ---------------------------------------------------------------------------------------------
// Accurate elementary functions on the accumulator type (float or double), no fast-math.
template <typename acc_t>
GK_HOST_DEVICE GK_INLINE acc_t accurate_pow(acc_t base, acc_t e) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return ::pow(base, e);
  } else {
    return ::powf(base, e);
  }
}

template <typename acc_t>
GK_HOST_DEVICE GK_INLINE acc_t accurate_log(acc_t v) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return ::log(v);
  } else {
    return ::logf(v);
  }
}

template <typename acc_t>
GK_HOST_DEVICE GK_INLINE acc_t fused_multiply_add(acc_t a, acc_t b, acc_t c) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return ::fma(a, b, c);
  } else {
    return ::fmaf(a, b, c);
  }
}

// 1/y by division (the host's way; the CUDA kernels pass their own reciprocal()).
struct DivideReciprocal {
  template <typename acc_t>
  GK_HOST_DEVICE GK_INLINE acc_t operator()(acc_t y) const {
    return acc_t(1) / y;
  }
};

// ---------------------------------------------------------------------------------------------
// GeM powers: one integer fast path. An exponent that is an integer in [0, kMaxIntPower] is
// computed with multiplications (GeM's p in [1, 8] forward, p - 1 in [0, 7] backward), any
// other with pow.
constexpr int kMaxIntPower = 8;
static_assert(kMaxIntPower < 16, "power() handles the bits 1, 2, 4 and 8 of the exponent");

// 0..kMaxIntPower when the exponent is that integer, else -1 (NaN: -1).
template <typename acc_t>
GK_HOST_DEVICE GK_INLINE int integral_exponent(acc_t e) {
  if (!(e >= acc_t(0) && e <= acc_t(kMaxIntPower))) return -1;
  const int n = static_cast<int>(e);
  return static_cast<acc_t>(n) == e ? n : -1;
}

// GeM's exponent, with its integral fast-path code.
template <typename acc_t>
struct Exponent {
  acc_t p;
  int integral;
};

template <typename acc_t>
GK_HOST_DEVICE GK_INLINE Exponent<acc_t> make_exponent(acc_t p) {
  return {p, integral_exponent(p)};
}

// base ** e; `integral` from integral_exponent(e). One code path for every integer 0..8: binary
// powering with selects (no table, no branch per exponent). No fast-math: a tiny base gives a
// correctly rounded subnormal or 0, never a flushed or NaN result.
template <typename acc_t>
GK_HOST_DEVICE GK_INLINE acc_t power(acc_t base, acc_t e, int integral) {
  if (integral < 0) return accurate_pow(base, e);
  const acc_t b2 = base * base;
  const acc_t b4 = b2 * b2;
  acc_t result = (integral & 1) ? base : acc_t(1);
  if (integral & 2) result *= b2;
  if (integral & 4) result *= b4;
  if (integral & 8) result *= b4 * b4;
  return result;
}

// ---------------------------------------------------------------------------------------------
// GeM relative to the running maximum (docs/DESIGN.md "Modes"): with y = clamp(x, min=eps) > 0, a
// piece keeps M (its maximum of y, 0 while empty), r = sum of (y/M)^p and, with kLog,
// l = sum of (y/M)^p log(y/M).

// z = y/M in (0, 1]: exactly 1 for y == M (ties with the maximum: constant and dead rows give
// r = 1, l = 0 exactly), else y * (1/M), within an ulp or so of the quotient, clamped to 1 (so
// log(z) <= 0). M = +inf: z = 0 for finite y. NaN y: 1 (its maximum is NaN already).
template <typename acc_t>
GK_HOST_DEVICE GK_INLINE acc_t gem_ratio(acc_t y, acc_t m, acc_t inv_m) {
  acc_t z = y < m ? y * inv_m : acc_t(1);
  return z > acc_t(1) ? acc_t(1) : z;
}

// Brings a piece's sums to a maximum m_to >= m_from: with k = m_from / m_to (as
// m_from * (1/m_to)), r' = k^p r and, as log(y/m_to) = log(y/m_from) + log(k),
// l' = k^p (l + log(k) r). m_from == 0 (an empty piece: its sums are 0) or k^p == 0 (underflow)
// leaves exact zeros; a NaN maximum makes both NaN.
template <bool kLog, typename acc_t, typename Reciprocal>
GK_HOST_DEVICE GK_INLINE void gem_rescale(acc_t& r, acc_t& l, acc_t m_from, acc_t m_to,
                                          Exponent<acc_t> e, Reciprocal reciprocal) {
  if (m_from == m_to) return;
  const acc_t k = m_from * reciprocal(m_to);  // <= 1; 0 when m_from = 0 or m_to = +inf
  const acc_t kp = power(k, e.p, e.integral);
  if constexpr (kLog) l = kp == acc_t(0) ? acc_t(0) : kp * (l + accurate_log(k) * r);
  r *= kp;
}

// The scan's step: x comes after every element already seen by (m, r, l, inv_m = 1/m).
template <bool kLog, typename acc_t, typename Reciprocal>
GK_HOST_DEVICE GK_INLINE void gem_scan(acc_t x, acc_t eps, Exponent<acc_t> e, acc_t& m, acc_t& r,
                                       acc_t& l, acc_t& inv_m, Reciprocal reciprocal) {
  const acc_t y = x < eps ? eps : x;  // NaN stays NaN, as torch.clamp; y > 0 (eps > 0)
  if (y > m || is_nan(y)) {
    // A new maximum (a NaN is one for good: every later z is NaN): rescale, then y/M = 1 adds 1
    // to r and log(1) = 0 to l.
    gem_rescale<kLog>(r, l, m, y, e, reciprocal);
    m = y;
    inv_m = reciprocal(y);
    r += acc_t(1);
  } else {
    const acc_t z = gem_ratio(y, m, inv_m);
    const acc_t zp = power(z, e.p, e.integral);
    r += zp;
    if constexpr (kLog) l += zp * accurate_log(z);
  }
}

// Merges another piece's (other_m, other_r, other_l) into (m, r, l): both are brought to the
// larger maximum (a NaN maximum wins), then added (this + other).
template <bool kLog, typename acc_t, typename Reciprocal>
GK_HOST_DEVICE GK_INLINE void gem_merge(acc_t& m, acc_t& r, acc_t& l, acc_t other_m, acc_t other_r,
                                        acc_t other_l, Exponent<acc_t> e, Reciprocal reciprocal) {
  const acc_t to = (is_nan(m) || m >= other_m) ? m : other_m;
  gem_rescale<kLog>(r, l, m, to, e, reciprocal);
  gem_rescale<kLog>(other_r, other_l, other_m, to, e, reciprocal);
  r += other_r;
  if constexpr (kLog) l += other_l;
  m = to;
}

// ---------------------------------------------------------------------------------------------
// Each mode's finishing step, from a row's complete statistics (count = S). AVG: avg_value;
// MAX: the maximum; CAT: avg_value and the maximum side by side (out[n, c] and out[n, C + c]).

template <typename acc_t>
GK_HOST_DEVICE GK_INLINE acc_t avg_value(acc_t sum, acc_t count) {
  return sum / count;
}

// MIXED (and avgmax, alpha = 0.5): out = alpha * max + (1 - alpha) * avg, aux = max - avg.
template <typename acc_t>
GK_HOST_DEVICE GK_INLINE acc_t mixed_value(acc_t alpha, acc_t max, acc_t avg) {
  return alpha * max + (acc_t(1) - alpha) * avg;
}

template <typename acc_t>
GK_HOST_DEVICE GK_INLINE acc_t mixed_aux(acc_t max, acc_t avg) {
  return max - avg;
}

// GeM: out = M r^(1/p) with r = mean (y/M)^p in [1/S, 1]; M itself when M = +inf; a NaN M gives
// NaN. gem_value_of_root takes root = r^(1/p) (the CPU forms the roots of many rows at once).
template <typename acc_t>
GK_HOST_DEVICE GK_INLINE acc_t gem_value_of_root(acc_t m, acc_t root) {
  return std::isinf(m) ? m : m * root;
}

template <typename acc_t, typename Reciprocal>
GK_HOST_DEVICE GK_INLINE acc_t gem_value(acc_t m, acc_t mean_r, acc_t p, Reciprocal reciprocal) {
  return gem_value_of_root(m, accurate_pow(mean_r, reciprocal(p)));
}

// GeM backward: grad_x = A (y/M)^(p-1) where x >= eps (y = x), else 0 (NaN x: 0), with
// A = g r^(1/p - 1) / S (r in [1/S, 1]: no overflow) and z = y/M as in the forward (gem_ratio).
template <typename acc_t, typename Reciprocal>
GK_HOST_DEVICE GK_INLINE acc_t gem_grad_scale(acc_t g, acc_t mean_r, acc_t p, acc_t count,
                                              Reciprocal reciprocal) {
  return g * accurate_pow(mean_r, reciprocal(p) - acc_t(1)) * reciprocal(count);
}

// e: the exponent p - 1 (make_exponent(p - 1)).
template <typename acc_t>
GK_HOST_DEVICE GK_INLINE acc_t gem_grad(acc_t x, acc_t eps, acc_t scale, acc_t m, acc_t inv_m,
                                        Exponent<acc_t> e) {
  const acc_t z = gem_ratio(x, m, inv_m);
  return x >= eps ? scale * power(z, e.p, e.integral) : acc_t(0);
}

}  // namespace gapkernels
