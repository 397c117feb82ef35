// The CPU kernels' vector helpers: a chunk (two accumulator vectors) loaded from and stored to
// any dtype, the mask of a run's overlapping tail chunk, the vector steps of the max rule, and
// the vector forms of pool_math.h's powers (vec_integral_power is power()'s integer fast path,
// product for product).
//
// The vector type itself (Vec, its conversions, exp and log) is simd.h's. Everything here lives
// in the inline namespace CPU_CAPABILITY: the kernel units are compiled once per instruction set,
// and each build's symbols stay apart.
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/simd.h"
#include "pool_math.h"

namespace gapkernels {
namespace cpu {
inline namespace CPU_CAPABILITY {

// Loads and stores a chunk: two accumulator vectors (float16 and bfloat16 widened to float).
template <typename scalar_t>
struct ChunkIO {
  using acc_t = acc_type<scalar_t>;
  using Vec = cpu::Vec<acc_t>;
  static constexpr int64_t kVec = Vec::size();
  static constexpr int64_t kWidth = 2 * kVec;
  static constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;

  static inline void load(const scalar_t* p, Vec& a, Vec& b) {
    if constexpr (kReduced) {
      load_widened(p, a, b);
    } else {
      a = Vec::loadu(p);
      b = Vec::loadu(p + kVec);
    }
  }
  static inline void store(scalar_t* p, const Vec& a, const Vec& b) {
    if constexpr (kReduced) {
      store_narrowed(p, a, b);
    } else {
      a.store(p);
      b.store(p + kVec);
    }
  }
};

// Lanes j of the chunk starting at `tail` elements before the end of a run that are not yet
// covered by the full chunks before it.
template <typename acc_t>
inline void tail_mask(int64_t tail, Vec<acc_t> (&mask)[2]) {
  using Vec = cpu::Vec<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec first(static_cast<acc_t>(2 * V - tail));
  mask[0] = Vec::arange(acc_t(0), acc_t(1)) >= first;
  mask[1] = Vec::arange(acc_t(V), acc_t(1)) >= first;
}

// Prefetches the cache lines of the addresses [begin, end) into L1 (kLocality 3) or L2 (2). A
// prefetch never faults.
template <int kLocality>
C10_ALWAYS_INLINE void prefetch_lines(uintptr_t begin, uintptr_t end) {
  for (uintptr_t line = begin & ~uintptr_t{63}; line < end; line += 64) {
    __builtin_prefetch(reinterpret_cast<const void*>(line), 0, kLocality);
  }
}
inline void prefetch_l2(uintptr_t begin, uintptr_t end) {
  prefetch_lines<2>(begin, end);
}

// The bits of the lanes where v == t (never where either is NaN), lane 0 the lowest.
template <typename acc_t>
C10_ALWAYS_INLINE uint32_t equal_lanes(const Vec<acc_t>& v, const Vec<acc_t>& t) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    return _mm512_cmp_ps_mask(v, t, _CMP_EQ_OQ);
  } else {
    return _mm512_cmp_pd_mask(v, t, _CMP_EQ_OQ);
  }
#else
  return lane_bits(v == t);
#endif
}

// Per lane: a > b ? x : y (y where either of a, b is NaN), with the instruction set's own compare
// and blend (AVX-512: a mask register) rather than a vector of lane masks.
template <typename acc_t>
C10_ALWAYS_INLINE Vec<acc_t> where_greater(const Vec<acc_t>& a, const Vec<acc_t>& b,
                                           const Vec<acc_t>& x, const Vec<acc_t>& y) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ), y, x);
  } else {
    return _mm512_mask_blend_pd(_mm512_cmp_pd_mask(a, b, _CMP_GT_OQ), y, x);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_GT_OQ));
  } else {
    return _mm256_blendv_pd(y, x, _mm256_cmp_pd(a, b, _CMP_GT_OQ));
  }
#else
  return Vec<acc_t>::blendv(y, x, a > b);
#endif
}

// ---------------------------------------------------------------------------------------------
// The max rule (pool_math.h's scan_max), per lane.

// Masked-out lanes read -inf, which never wins.
template <typename acc_t>
inline Vec<acc_t> masked_for_max(const Vec<acc_t>& v, const Vec<acc_t>& mask) {
  return Vec<acc_t>::blendv(Vec<acc_t>(-std::numeric_limits<acc_t>::infinity()), v, mask);
}

// scan_max per lane: v replaces the running maximum when larger or NaN. cur (each lane's element
// index) must exceed every index already in ix, so max(ix, take & cur) selects it.
template <bool kMasked, typename acc_t>
C10_ALWAYS_INLINE void vec_scan_max(const Vec<acc_t>& v, const Vec<acc_t>& cur,
                                    const Vec<acc_t>& mask, Vec<acc_t>& mx, Vec<acc_t>& ix) {
  using Vec = cpu::Vec<acc_t>;
  const Vec value = kMasked ? masked_for_max(v, mask) : v;
  const Vec take = (value > mx) | value.isnan();
  mx = Vec::blendv(mx, value, take);
  ix = clamp_min(ix, take & cur);
}

// ---------------------------------------------------------------------------------------------
// GeM's powers. pool_math.h's power(base, e, integral): an integral exponent n in
// [0, kMaxIntPower] by multiplications, any other by pow; here the vector forms.

// base ** n for n in [0, kMaxIntPower]: pool_math.h's binary powering with the same products in
// the same order (a factor of 1 left out, which changes no bit), so a lane's result is power()'s.
// With n a compile-time constant, only its products remain.
template <typename acc_t>
C10_ALWAYS_INLINE Vec<acc_t> vec_integral_power(const Vec<acc_t>& base, int n) {
  using Vec = cpu::Vec<acc_t>;
  static_assert(kMaxIntPower < 16, "the bits 1, 2, 4 and 8 of the exponent");
  const Vec b2 = base * base;
  const Vec b4 = b2 * b2;
  Vec result = (n & 1) ? base : Vec(acc_t(1));
  if (n & 2) result = (n & 1) ? result * b2 : b2;
  if (n & 4) result = (n & 3) ? result * b4 : b4;
  if (n & 8) result = (n & 7) ? result * (b4 * b4) : b4 * b4;
  return result;
}

// How a loop raises to GeM's exponent, fixed before the loop as a template argument kPow:
// kPowExp: exp(e * log z) per lane (a non-integral exponent, or exponents that differ per lane);
// kPowRuntimeInt: vec_integral_power with n known at run time; kPow >= 0: that n, unrolled.
constexpr int kPowExp = -1;
constexpr int kPowRuntimeInt = -2;

// z ** e; log_z is log(z) for kPowExp (unused otherwise), n the integral exponent.
template <int kPow, typename acc_t>
C10_ALWAYS_INLINE Vec<acc_t> vec_power(const Vec<acc_t>& z, const Vec<acc_t>& log_z,
                                       const Vec<acc_t>& e, int n) {
  if constexpr (kPow == kPowExp) {
    return vec_exp(e * log_z);
  } else if constexpr (kPow == kPowRuntimeInt) {
    return vec_integral_power(z, n);
  } else {
    return vec_integral_power(z, kPow);
  }
}

// Calls f(kPow) with the way of raising to an exponent whose integral code (pool_math.h's
// integral_exponent) is `integral`: kFirst .. kFirst + 2 unrolled (the common p = 1, 2, 3: forward
// exponents p, backward p - 1), the rest of the integral range at run time, else kPowExp.
template <int kFirst, typename F>
C10_ALWAYS_INLINE void dispatch_power(int integral, bool per_lane, F&& f) {
  if (per_lane || integral < 0) return f(std::integral_constant<int, kPowExp>());
  switch (integral - kFirst) {
    case 0:
      return f(std::integral_constant<int, kFirst>());
    case 1:
      return f(std::integral_constant<int, kFirst + 1>());
    case 2:
      return f(std::integral_constant<int, kFirst + 2>());
    default:
      return f(std::integral_constant<int, kPowRuntimeInt>());
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gapkernels
