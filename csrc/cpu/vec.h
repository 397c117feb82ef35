// The CPU kernels' vector helpers: a chunk (two accumulator vectors) loaded from and stored to
// any dtype, the mask of a run's overlapping tail chunk, the vector steps of the max rule, and
// the vector forms of pool_math.h's powers (vec_integral_power is power()'s integer fast path,
// product for product).
//
// Everything here lives in the inline namespace CPU_CAPABILITY, as at::vec does: the kernel units
// may be compiled once per instruction set, and each build's symbols stay apart.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "pool_math.h"

namespace gapkernels {
namespace cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// The zero_mask() of a vector with no lane set.
template <typename acc_t>
constexpr int kNoLane = (1 << Vectorized<acc_t>::size()) - 1;

// Loads and stores a chunk: two accumulator vectors, 16 elements (8 for double).
template <typename scalar_t>
struct ChunkIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kVec = Vec::size();
  static constexpr int64_t kWidth = 2 * kVec;
  static constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  static_assert(!kReduced || Vectorized<scalar_t>::size() == kWidth, "chunk of 16-bit floats");

  static inline void load(const scalar_t* p, Vec& a, Vec& b) {
    if constexpr (kReduced) {
      at::vec::load_to_float(p, a, b);
    } else {
      a = Vec::loadu(p);
      b = Vec::loadu(p + kVec);
    }
  }
  static inline void store(scalar_t* p, const Vec& a, const Vec& b) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(a, b).store(p);
    } else {
      a.store(p);
      b.store(p + kVec);
    }
  }
};

// Lanes j of the chunk starting at `tail` elements before the end of a run that are not yet
// covered by the full chunks before it.
template <typename acc_t>
inline void tail_mask(int64_t tail, Vectorized<acc_t> (&mask)[2]) {
  using Vec = Vectorized<acc_t>;
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

// The largest lane (NaN-blind, as clamp_min).
template <typename acc_t>
inline acc_t max_of_lanes(const Vectorized<acc_t>& v) {
  using Vec = Vectorized<acc_t>;
  return at::vec::vec_reduce_all<acc_t>(
      [](const Vec& l, const Vec& r) { return at::vec::clamp_min(l, r); }, v);
}

template <typename acc_t>
inline acc_t sum_of_lanes(const Vectorized<acc_t>& v) {
  using Vec = Vectorized<acc_t>;
  return at::vec::vec_reduce_all<acc_t>([](const Vec& l, const Vec& r) { return l + r; }, v);
}

// The bits of the lanes where v == t (never where either is NaN), lane 0 the lowest.
template <typename acc_t>
C10_ALWAYS_INLINE uint32_t equal_lanes(const Vectorized<acc_t>& v, const Vectorized<acc_t>& t) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    return _mm512_cmp_ps_mask(v, t, _CMP_EQ_OQ);
  } else {
    return _mm512_cmp_pd_mask(v, t, _CMP_EQ_OQ);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, t, _CMP_EQ_OQ)));
  } else {
    return static_cast<uint32_t>(_mm256_movemask_pd(_mm256_cmp_pd(v, t, _CMP_EQ_OQ)));
  }
#else
  // zero_mask sets the bits of lanes that are zero: here, those that do not match.
  return ~static_cast<uint32_t>((v == t).zero_mask()) & static_cast<uint32_t>(kNoLane<acc_t>);
#endif
}

// Per lane: a > b ? x : y (y where either of a, b is NaN), with the instruction set's own compare
// and blend rather than at::vec's all-ones vector masks.
template <typename acc_t>
C10_ALWAYS_INLINE Vectorized<acc_t> where_greater(const Vectorized<acc_t>& a,
                                                  const Vectorized<acc_t>& b,
                                                  const Vectorized<acc_t>& x,
                                                  const Vectorized<acc_t>& y) {
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
  return Vectorized<acc_t>::blendv(y, x, a > b);
#endif
}

// ---------------------------------------------------------------------------------------------
// The max rule (pool_math.h's scan_max), per lane.

// Masked-out lanes read -inf, which never wins.
template <typename acc_t>
inline Vectorized<acc_t> masked_for_max(const Vectorized<acc_t>& v, const Vectorized<acc_t>& mask) {
  using Vec = Vectorized<acc_t>;
  return Vec::blendv(Vec(-std::numeric_limits<acc_t>::infinity()), v, mask);
}

// scan_max per lane: v replaces the running maximum when larger or NaN. cur (each lane's element
// index) must exceed every index already in ix, so max(ix, take & cur) selects it.
template <bool kMasked, typename acc_t>
C10_ALWAYS_INLINE void vec_scan_max(const Vectorized<acc_t>& v, const Vectorized<acc_t>& cur,
                                    const Vectorized<acc_t>& mask, Vectorized<acc_t>& mx,
                                    Vectorized<acc_t>& ix) {
  using Vec = Vectorized<acc_t>;
  const Vec value = kMasked ? masked_for_max(v, mask) : v;
  const Vec take = (value > mx) | value.isnan();
  mx = Vec::blendv(mx, value, take);
  ix = at::vec::clamp_min(ix, take & cur);
}

// ---------------------------------------------------------------------------------------------
// log and exp of float vectors for GeM's per-element powers, inline (at::vec's are calls into
// Sleef, measured at a fifth of a GeM forward with the log statistic). Cephes' single-precision
// logf and expf (a polynomial on the mantissa; on 2**n * e**r, |r| <= log(2)/2), about 1 ulp
// (tests/test_cpu_vmath.py bounds the error against float64). Zero, negative, infinite, NaN and
// subnormal inputs of log (results of exp below 2**-126) go to at::vec's log (exp), so every
// special value is handled as there. Other dtypes and the portable build use at::vec's.

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
namespace vmath {
#if defined(CPU_CAPABILITY_AVX512)
using F = __m512;
using I = __m512i;
#define GK_VM(name) _mm512_##name
#define GK_VM_SET1(value) _mm512_set1_ps(value)
C10_ALWAYS_INLINE I as_int(F x) {
  return _mm512_castps_si512(x);
}
C10_ALWAYS_INLINE F as_float(I x) {
  return _mm512_castsi512_ps(x);
}
C10_ALWAYS_INLINE I bit_and(I a, I b) {
  return _mm512_and_si512(a, b);
}
C10_ALWAYS_INLINE I bit_or(I a, I b) {
  return _mm512_or_si512(a, b);
}
C10_ALWAYS_INLINE F round_nearest(F x) {
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
#else
using F = __m256;
using I = __m256i;
#define GK_VM(name) _mm256_##name
#define GK_VM_SET1(value) _mm256_set1_ps(value)
C10_ALWAYS_INLINE I as_int(F x) {
  return _mm256_castps_si256(x);
}
C10_ALWAYS_INLINE F as_float(I x) {
  return _mm256_castsi256_ps(x);
}
C10_ALWAYS_INLINE I bit_and(I a, I b) {
  return _mm256_and_si256(a, b);
}
C10_ALWAYS_INLINE I bit_or(I a, I b) {
  return _mm256_or_si256(a, b);
}
C10_ALWAYS_INLINE F round_nearest(F x) {
  return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
#endif

C10_ALWAYS_INLINE F fma(F a, F b, F c) {
  return GK_VM(fmadd_ps)(a, b, c);
}

// log(x) for x normal, positive and finite.
C10_ALWAYS_INLINE F log_normal(F x) {
  const I bits = as_int(x);
  // x = 2**e * m, m in [sqrt(1/2), sqrt(2)): the mantissa with the exponent of 1, or of 1/2
  // where it is at least sqrt(2) (then e is one more).
  F m =
      as_float(bit_or(bit_and(bits, GK_VM(set1_epi32)(0x007fffff)), GK_VM(set1_epi32)(0x3f800000)));
  I exponent = GK_VM(sub_epi32)(GK_VM(srli_epi32)(bits, 23), GK_VM(set1_epi32)(127));
#if defined(CPU_CAPABILITY_AVX512)
  const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356237f), _CMP_GE_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  exponent = _mm512_mask_add_epi32(exponent, big, exponent, _mm512_set1_epi32(1));
#else
  const F big = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356237f), _CMP_GE_OQ);
  m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
  exponent = _mm256_sub_epi32(exponent, _mm256_castps_si256(big));  // big lanes are -1
#endif
  const F e = GK_VM(cvtepi32_ps)(exponent);
  const F f = GK_VM(sub_ps)(m, GK_VM_SET1(1.0f));
  const F z = GK_VM(mul_ps)(f, f);
  F y = GK_VM_SET1(7.0376836292E-2f);
  y = fma(y, f, GK_VM_SET1(-1.1514610310E-1f));
  y = fma(y, f, GK_VM_SET1(1.1676998740E-1f));
  y = fma(y, f, GK_VM_SET1(-1.2420140846E-1f));
  y = fma(y, f, GK_VM_SET1(1.4249322787E-1f));
  y = fma(y, f, GK_VM_SET1(-1.6668057665E-1f));
  y = fma(y, f, GK_VM_SET1(2.0000714765E-1f));
  y = fma(y, f, GK_VM_SET1(-2.4999993993E-1f));
  y = fma(y, f, GK_VM_SET1(3.3333331174E-1f));
  y = GK_VM(mul_ps)(GK_VM(mul_ps)(y, f), z);
  y = fma(e, GK_VM_SET1(-2.12194440E-4f), y);
  y = fma(z, GK_VM_SET1(-0.5f), y);
  return fma(e, GK_VM_SET1(0.693359375f), GK_VM(add_ps)(f, y));
}

// exp(x) for x in [-87, 88], where 2**n below is a normal float.
C10_ALWAYS_INLINE F exp_normal(F x) {
  const F n = round_nearest(GK_VM(mul_ps)(x, GK_VM_SET1(1.44269504088896341f)));
  F r = fma(n, GK_VM_SET1(-0.693359375f), x);
  r = fma(n, GK_VM_SET1(2.12194440E-4f), r);
  F p = GK_VM_SET1(1.9875691500E-4f);
  p = fma(p, r, GK_VM_SET1(1.3981999507E-3f));
  p = fma(p, r, GK_VM_SET1(8.3334519073E-3f));
  p = fma(p, r, GK_VM_SET1(4.1665795894E-2f));
  p = fma(p, r, GK_VM_SET1(1.6666665459E-1f));
  p = fma(p, r, GK_VM_SET1(5.0000001201E-1f));
  p = fma(p, GK_VM(mul_ps)(r, r), GK_VM(add_ps)(r, GK_VM_SET1(1.0f)));
  const I scale =
      GK_VM(slli_epi32)(GK_VM(add_epi32)(GK_VM(cvtps_epi32)(n), GK_VM(set1_epi32)(127)), 23);
  return GK_VM(mul_ps)(p, as_float(scale));
}

// Whether every lane of x lies in [lo, hi] (false where one is NaN).
C10_ALWAYS_INLINE bool all_within(F x, float lo, float hi) {
#if defined(CPU_CAPABILITY_AVX512)
  return (_mm512_cmp_ps_mask(x, _mm512_set1_ps(lo), _CMP_GE_OQ) &
          _mm512_cmp_ps_mask(x, _mm512_set1_ps(hi), _CMP_LE_OQ)) == 0xffff;
#else
  const F in = _mm256_and_ps(_mm256_cmp_ps(x, _mm256_set1_ps(lo), _CMP_GE_OQ),
                             _mm256_cmp_ps(x, _mm256_set1_ps(hi), _CMP_LE_OQ));
  return _mm256_movemask_ps(in) == 0xff;
#endif
}
#undef GK_VM
#undef GK_VM_SET1
}  // namespace vmath
#endif

template <typename acc_t>
C10_ALWAYS_INLINE Vectorized<acc_t> vec_log(const Vectorized<acc_t>& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (C10_LIKELY(vmath::all_within(x, std::numeric_limits<float>::min(),
                                     std::numeric_limits<float>::max()))) {
      return vmath::log_normal(x);
    }
  }
#endif
  return x.log();
}

template <typename acc_t>
C10_ALWAYS_INLINE Vectorized<acc_t> vec_exp(const Vectorized<acc_t>& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (C10_LIKELY(vmath::all_within(x, -87.0f, 88.0f))) return vmath::exp_normal(x);
  }
#endif
  return x.exp();
}

// ---------------------------------------------------------------------------------------------
// GeM's powers. pool_math.h's power(base, e, integral): an integral exponent n in
// [0, kMaxIntPower] by multiplications, any other by pow; here the vector forms.

// base ** n for n in [0, kMaxIntPower]: pool_math.h's binary powering with the same products in
// the same order (a factor of 1 left out, which changes no bit), so a lane's result is power()'s.
// With n a compile-time constant, only its products remain.
template <typename acc_t>
C10_ALWAYS_INLINE Vectorized<acc_t> vec_integral_power(const Vectorized<acc_t>& base, int n) {
  using Vec = Vectorized<acc_t>;
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
C10_ALWAYS_INLINE Vectorized<acc_t> vec_power(const Vectorized<acc_t>& z,
                                              const Vectorized<acc_t>& log_z,
                                              const Vectorized<acc_t>& e, int n) {
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
