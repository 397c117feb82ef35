// GeM in vectors, relative to a running maximum: the vector forms of pool_math.h's gem_rescale
// and gem_scan, shared by the NCS and NSC forward loops.
//
// Every vectorized GEM loop keeps, per lane, the running maximum `max` of y = clamp(x, eps), a
// reference `ref` >= max, and the sums of (y/ref)**p (and of (y/ref)**p * log(y/ref)), as
// flash-attention's online softmax does. It reads a small block of x into registers, takes the
// block's maximum, and where that exceeds ref, moves the lanes' sums to a new reference (the
// block's maximum times a headroom h = 2**(16/p), so that (max/ref)**p >= 2**-16) with
// vec_gem_rescale, before it adds the block's terms, each (y * (1/ref))**p <= 1: nothing over- or
// underflows. The headroom makes those moves rare (the running maximum of a row grows at
// ~ln(S) places, and most of them by less than h); the lane's sums are moved once more to its
// exact maximum at the end (gem_to_max), so that the pieces' statistics are relative to M.
// ref and max start at eps, a lower bound of every y. A NaN is left out of both (clamp_min
// keeps them) and turns the sum NaN instead; gem_settle turns that into M = NaN.
#pragma once

#include <cstdint>
#include <limits>

#include "cpu/stats.h"
#include "cpu/vec.h"
#include "pool_math.h"

namespace gapkernels {
namespace cpu {
inline namespace CPU_CAPABILITY {

template <typename acc_t>
struct GemRef {
  Vec<acc_t> ref, inv, max;  // the reference, 1/ref and the exact running maximum
};

template <typename acc_t>
inline GemRef<acc_t> gem_start(const Vec<acc_t>& eps) {
  return {eps, Vec<acc_t>(acc_t(1)) / eps, eps};
}

// log(h) * p: the headroom of a new reference is 2**16 ** (1/p).
constexpr double kGemHeadroomLog = 16 * 0.69314718055994530942;

template <typename acc_t>
inline Vec<acc_t> gem_headroom(const Vec<acc_t>& p) {
  return vec_exp(Vec<acc_t>(acc_t(kGemHeadroomLog)) / p);
}

// Adds one vector's terms (lanes outside `mask` ignored when kMasked), relative to 1/inv_m.
template <bool kMasked, int kPow, bool kLog, typename acc_t>
C10_ALWAYS_INLINE void gem_term(const Vec<acc_t>& v, const Vec<acc_t>& mask,
                                const Vec<acc_t>& inv_m, const Vec<acc_t>& p, int n,
                                const Vec<acc_t>& eps, Vec<acc_t>& sum, Vec<acc_t>& log_sum) {
  using Vec = cpu::Vec<acc_t>;
  const Vec z = clamp_min(v, eps) * inv_m;
  if constexpr (kLog) {
    // z may underflow to 0: the clamp keeps 0 * log(z) at 0 (and NaN stays NaN).
    const Vec lg = clamp_min(vec_log(z), Vec(std::numeric_limits<acc_t>::lowest()));
    const Vec pw = vec_power<kPow>(z, lg, p, n);
    const Vec pw_lg = pw * lg;
    sum += kMasked ? (pw & mask) : pw;
    log_sum += kMasked ? (pw_lg & mask) : pw_lg;
  } else {
    const Vec pw = vec_power<kPow>(z, kPow == kPowExp ? vec_log(z) : z, p, n);
    sum += kMasked ? (pw & mask) : pw;
  }
}

// pool_math.h's gem_rescale in the lanes where `grew`, for kCount pairs of sums: from the
// reference m0 to m1 (m0, m1 > 0 or m1 = inf; no NaN in either), with k = m0 / m1.
template <int kPow, bool kLog, int kCount, typename acc_t>
inline void vec_gem_rescale(const Vec<acc_t>& m0, const Vec<acc_t>& m1, const Vec<acc_t>& grew,
                            const Vec<acc_t>& p, int n, Vec<acc_t> (&sum)[kCount],
                            Vec<acc_t> (&log_sum)[kCount]) {
  using Vec = cpu::Vec<acc_t>;
  const Vec k = m0 / m1;
  const Vec log_k = kPow == kPowExp || kLog ? vec_log(k) : k;
  const Vec kp = vec_power<kPow>(k, log_k, p, n);
  for (int i = 0; i < kCount; ++i) {
    if constexpr (kLog) {
      const Vec moved = (kp * (log_sum[i] + log_k * sum[i])) & (k > Vec(acc_t(0)));
      log_sum[i] = Vec::blendv(log_sum[i], moved, grew);
    }
    sum[i] = Vec::blendv(sum[i], sum[i] * kp, grew);
  }
}

// Takes block_max into the running maximum and, where it exceeds the reference, moves the
// kCount pairs of sums to block_max * headroom (not past the largest finite value unless
// block_max is inf). A NaN in block_max leaves everything as it is. `on_grow` runs first when
// a lane grows (NCS folds its block sums into the running ones there).
template <int kPow, bool kLog, int kCount, typename acc_t, typename F>
C10_ALWAYS_INLINE void gem_grow(const Vec<acc_t>& block_max, const Vec<acc_t>& p,
                                const Vec<acc_t>& headroom, int n, GemRef<acc_t>& g,
                                Vec<acc_t> (&sum)[kCount], Vec<acc_t> (&log_sum)[kCount],
                                F&& on_grow) {
  using Vec = cpu::Vec<acc_t>;
  g.max = clamp_min(g.max, block_max);
  const Vec grew = block_max > g.ref;
  if (C10_UNLIKELY(any(grew))) {
    on_grow();
    const Vec top = clamp_min(block_max, Vec(std::numeric_limits<acc_t>::max()));
    const Vec lifted = clamp_max(block_max * headroom, top);
    const Vec ref1 = Vec::blendv(g.ref, lifted, grew);
    vec_gem_rescale<kPow, kLog, kCount>(g.ref, ref1, grew, p, n, sum, log_sum);
    g.ref = ref1;
    g.inv = Vec(acc_t(1)) / ref1;
  }
}

template <int kPow, bool kLog, int kCount, typename acc_t>
C10_ALWAYS_INLINE void gem_grow(const Vec<acc_t>& block_max, const Vec<acc_t>& p,
                                const Vec<acc_t>& headroom, int n, GemRef<acc_t>& g,
                                Vec<acc_t> (&sum)[kCount], Vec<acc_t> (&log_sum)[kCount]) {
  gem_grow<kPow, kLog, kCount>(block_max, p, headroom, n, g, sum, log_sum, [] {});
}

// Moves the sums from the lanes' references to `target` (their maximum, or the row's).
template <int kPow, bool kLog, int kCount, typename acc_t>
inline void gem_to_max(const GemRef<acc_t>& g, const Vec<acc_t>& target, const Vec<acc_t>& p, int n,
                       Vec<acc_t> (&sum)[kCount], Vec<acc_t> (&log_sum)[kCount]) {
  vec_gem_rescale<kPow, kLog, kCount>(g.ref, target, g.ref != target, p, n, sum, log_sum);
}

// The end of a piece of `count` elements of one row, `stride` apart: a NaN sum means a NaN in
// x, unless M is +inf (inf/inf is NaN too); then the piece is scanned for a NaN.
template <typename scalar_t, typename acc_t>
inline void gem_settle(Partial<acc_t>& st, const scalar_t* x, int64_t count, int64_t stride) {
  if (!is_nan(st.sum)) return;
  bool has_nan = true;
  if (st.max == std::numeric_limits<acc_t>::infinity()) {
    has_nan = false;
    for (int64_t i = 0; i < count && !has_nan; ++i) {
      has_nan = is_nan(static_cast<acc_t>(x[i * stride]));
    }
  }
  if (has_nan) st.max = std::numeric_limits<acc_t>::quiet_NaN();
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gapkernels
