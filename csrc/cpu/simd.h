// The CPU kernels' vector type: Vec<T> (T float or double) of the variant's width, at::vec's
// (AVX-512: 64 bytes; AVX2 and the x86-64 baseline: 32, two SSE registers in the baseline; the
// baseline elsewhere, e.g. aarch64: 16), with exactly what the kernels use: unaligned loads and
// stores, arithmetic, compares giving all-ones lane masks (as at::vec's do: `&`, blendv and any()
// read them), max/min with x86's NaN rule, horizontal sums and maxima, float <-> float16/bfloat16
// chunks and exp/log.
//
// GCC's vector extensions (clang has them too) carry the portable part; the conversions, lane
// masks, max/min and exp/log use the instruction set's intrinsics where the variant has them.
// Results are at::vec's bit for bit (the kernels used it before; the sign of a NaN aside), except
// exp and log: at::vec called Sleef in the AVX2 and AVX-512 variants; here those take inline
// Cephes polynomials (about 1 ulp, as Sleef's), and the baseline takes the C library's per lane,
// as at::vec's baseline did. No torch header but header-only ones: the CPU libraries are built on
// the LibTorch stable ABI (TORCH_TARGET_VERSION), which forbids ATen's.
//
// Everything here lives in the inline namespace CPU_CAPABILITY: the kernel units are compiled
// once per instruction set, and each build's symbols stay apart.
#pragma once

#include <torch/headeronly/macros/Macros.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cmath>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#define GK_X86_SIMD 1
#endif

// A Vec's bytes, and those of the registers it is made of: one register, but in the x86-64
// baseline (SSE2) build, whose 32-byte vectors (at::vec's width there) are two registers; GCC
// splits a 32-byte vector type badly without AVX (through memory), so the split is ours.
#if defined(CPU_CAPABILITY_AVX512)
#define GK_VECTOR_BYTES 64
#define GK_REGISTER_BYTES 64
#elif defined(CPU_CAPABILITY_AVX2)
#define GK_VECTOR_BYTES 32
#define GK_REGISTER_BYTES 32
#elif !defined(__aarch64__)
#define GK_VECTOR_BYTES 32
#define GK_REGISTER_BYTES 16
#else
#define GK_VECTOR_BYTES 16
#define GK_REGISTER_BYTES 16
#endif

// Stack arrays that vectors are stored to and loaded from.
#define GK_ALIGNED alignas(64)

namespace gapkernels {
namespace cpu {
inline namespace CPU_CAPABILITY {

using c10::BFloat16;
using c10::Half;

// The accumulation type of an element type: double for double, float for the others.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_type = typename AccType<T>::type;

// A GCC vector reinterpreted as another of the same size (the bits unchanged).
template <typename To, typename From>
C10_ALWAYS_INLINE To vector_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  return (To)v;  // a cast between vector types keeps the bits
}

template <typename T>
struct VecRaw;
template <>
struct VecRaw<float> {
  typedef float type __attribute__((vector_size(GK_REGISTER_BYTES)));
  typedef int32_t bits __attribute__((vector_size(GK_REGISTER_BYTES)));
};
template <>
struct VecRaw<double> {
  typedef double type __attribute__((vector_size(GK_REGISTER_BYTES)));
  typedef int64_t bits __attribute__((vector_size(GK_REGISTER_BYTES)));
};

template <typename T>
class Vec {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "float or double lanes");

 public:
  using Raw = typename VecRaw<T>::type;   // one register
  using Bits = typename VecRaw<T>::bits;  // a register's lanes' bits, as signed integers
  static constexpr int kParts = GK_VECTOR_BYTES / GK_REGISTER_BYTES;
  static constexpr int kPartLanes = GK_REGISTER_BYTES / static_cast<int>(sizeof(T));

  static constexpr int size() { return GK_VECTOR_BYTES / static_cast<int>(sizeof(T)); }

  Vec() = default;
  // Every lane s (a brace list: a loop of lane stores would not always become one broadcast).
  Vec(T s)
      : regs_(build([r = splat(s, std::make_index_sequence<kPartLanes>())](int) { return r; })) {}
  // To and from the register (and so the intrinsics' types, __m256 and the like).
  Vec(Raw raw)
    requires(kParts == 1)
      : regs_(raw) {}
  operator Raw() const
    requires(kParts == 1)
  {
    return regs_;
  }
  Bits bits() const
    requires(kParts == 1)
  {
    return vector_cast<Bits>(regs_);
  }
  static Vec from_bits(Bits b)
    requires(kParts == 1)
  {
    return vector_cast<Raw>(b);
  }

  // One register at a time: a copy of the whole array leaves dead stack copies in the loops.
  static Vec loadu(const T* p) {
    return Vec(FromRegisters{}, build([p](int i) {
                 Raw part;
                 std::memcpy(&part, p + i * kPartLanes, sizeof(part));
                 return part;
               }));
  }
  void store(T* p) const {
    for (int i = 0; i < kParts; ++i) {
      const Raw r = part(i);
      std::memcpy(p + i * kPartLanes, &r, sizeof(r));
    }
  }
  T operator[](int i) const { return part(i / kPartLanes)[i % kPartLanes]; }

  // base, base + step, base + 2 * step, ...
  static Vec arange(T base, T step) {
    T lanes[size()];
    for (int i = 0; i < size(); ++i) lanes[i] = base + static_cast<T>(i) * step;
    return loadu(lanes);
  }

  // f(a's register, b's register) for each of the registers.
  template <typename F>
  static Vec zip(Vec a, Vec b, F&& f) {
    return Vec(FromRegisters{}, build([&](int i) { return f(a.part(i), b.part(i)); }));
  }

  friend Vec operator+(Vec a, Vec b) {
    return zip(a, b, [](Raw x, Raw y) { return x + y; });
  }
  friend Vec operator-(Vec a, Vec b) {
    return zip(a, b, [](Raw x, Raw y) { return x - y; });
  }
  friend Vec operator*(Vec a, Vec b) {
    return zip(a, b, [](Raw x, Raw y) { return x * y; });
  }
  friend Vec operator/(Vec a, Vec b) {
    return zip(a, b, [](Raw x, Raw y) { return x / y; });
  }
  // In place (as *this = *this + b, GCC kept the loops' accumulators in memory: 7% slower).
  Vec& operator+=(Vec b) {
    if constexpr (kParts == 1) {
      regs_ += b.regs_;
    } else {
      for (int i = 0; i < kParts; ++i) regs_[i] += b.regs_[i];
    }
    return *this;
  }

  // Lane masks: all ones where the compare holds (ordered: never where a lane is NaN, but !=).
  friend Vec operator>(Vec a, Vec b) {
    return zip(a, b, mask([](Raw x, Raw y) { return x > y; }));
  }
  friend Vec operator>=(Vec a, Vec b) {
    return zip(a, b, mask([](Raw x, Raw y) { return x >= y; }));
  }
  friend Vec operator<(Vec a, Vec b) {
    return zip(a, b, mask([](Raw x, Raw y) { return x < y; }));
  }
  friend Vec operator==(Vec a, Vec b) {
    return zip(a, b, mask([](Raw x, Raw y) { return x == y; }));
  }
  friend Vec operator!=(Vec a, Vec b) {
    return zip(a, b, mask([](Raw x, Raw y) { return x != y; }));
  }
  friend Vec operator&(Vec a, Vec b) {
    return zip(a, b,
               mask([](Raw x, Raw y) { return vector_cast<Bits>(x) & vector_cast<Bits>(y); }));
  }
  friend Vec operator|(Vec a, Vec b) {
    return zip(a, b,
               mask([](Raw x, Raw y) { return vector_cast<Bits>(x) | vector_cast<Bits>(y); }));
  }
  Vec isnan() const { return *this != *this; }

  // b in the lanes of `mask` (a lane mask), a elsewhere.
  static Vec blendv(Vec a, Vec b, Vec mask) {
    return Vec(FromRegisters{}, build([&](int i) {
                 return vector_cast<Bits>(mask.part(i)) < 0 ? b.part(i) : a.part(i);
               }));
  }

  // Whether each lane's mask is set, lane 0 in bit 0 (the portable form of lane_bits).
  uint32_t sign_bits() const {
    uint32_t out = 0;
    for (int i = 0; i < size(); ++i) {
      out |= static_cast<uint32_t>(vector_cast<Bits>(part(i / kPartLanes))[i % kPartLanes] < 0)
             << i;
    }
    return out;
  }

 private:
  // The registers: one, a plain member, or an array of them.
  using Registers = std::conditional_t<kParts == 1, Raw, std::array<Raw, kParts>>;
  struct FromRegisters {};
  Vec(FromRegisters, const Registers& regs) : regs_(regs) {}
  Raw part(int i) const {
    if constexpr (kParts == 1) {
      return regs_;
    } else {
      return regs_[i];
    }
  }

  // The registers f(0), f(1), ..., built whole.
  template <typename F>
  static Registers build(F&& f) {
    if constexpr (kParts == 1) {
      return f(0);
    } else {
      return build(f, std::make_index_sequence<kParts>());
    }
  }
  template <typename F, size_t... kIndex>
  static Registers build(F& f, std::index_sequence<kIndex...>) {
    return Registers{f(static_cast<int>(kIndex))...};
  }
  template <size_t... kLanes>
  static Raw splat(T s, std::index_sequence<kLanes...>) {
    return Raw{((void)kLanes, s)...};
  }
  // f's integer result (a compare's -1 / 0, or bits) as the register's lanes.
  template <typename F>
  static auto mask(F f) {
    return [f](Raw x, Raw y) { return vector_cast<Raw>(f(x, y)); };
  }

  Registers regs_;
};

// max(a, lo) and min(a, hi) with x86's rule (a < lo ? lo : a): a NaN in a stays, a NaN in lo or
// hi is ignored. at::vec's clamp_min / clamp_max.
// (x86's max and min instructions, as at::vec: GCC does not always turn the select into one.)
template <typename T>
C10_ALWAYS_INLINE Vec<T> clamp_min(Vec<T> a, Vec<T> lo) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_max_ps(lo, a);
  } else {
    return _mm512_max_pd(lo, a);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_max_ps(lo, a);
  } else {
    return _mm256_max_pd(lo, a);
  }
#else
  return Vec<T>::zip(a, lo, [](auto x, auto m) { return x < m ? m : x; });
#endif
}
template <typename T>
C10_ALWAYS_INLINE Vec<T> clamp_max(Vec<T> a, Vec<T> hi) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_min_ps(hi, a);
  } else {
    return _mm512_min_pd(hi, a);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_min_ps(hi, a);
  } else {
    return _mm256_min_pd(hi, a);
  }
#else
  return Vec<T>::zip(a, hi, [](auto x, auto m) { return x > m ? m : x; });
#endif
}

// The bits of the lanes whose mask is set, lane 0 the lowest.
template <typename T>
C10_ALWAYS_INLINE uint32_t lane_bits(Vec<T> mask) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_movepi32_mask(_mm512_castps_si512(mask));
  } else {
    return _mm512_movepi64_mask(_mm512_castpd_si512(mask));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    return static_cast<uint32_t>(_mm256_movemask_ps(mask));
  } else {
    return static_cast<uint32_t>(_mm256_movemask_pd(mask));
  }
#else
  return mask.sign_bits();
#endif
}

// Whether any lane of the mask is set.
template <typename T>
C10_ALWAYS_INLINE bool any(Vec<T> mask) {
  return lane_bits(mask) != 0;
}

// ---------------------------------------------------------------------------------------------
// Horizontal reductions, in at::vec's order: floats of the AVX2, AVX-512 and aarch64 builds
// halve the vector (lane i with lane i ^ half) down to one lane; otherwise lane 0 takes the
// others in turn, ((v0 op v1) op v2) ...

namespace detail {
template <int kStep, typename Raw, size_t... kLanes>
C10_ALWAYS_INLINE Raw swap_lanes(Raw v, std::index_sequence<kLanes...>) {
  return __builtin_shufflevector(v, v, (kLanes ^ kStep)...);
}

template <typename T, typename Op>
C10_ALWAYS_INLINE T reduce_lanes(Vec<T> v, Op op) {
  constexpr int kSize = Vec<T>::size();
#if defined(GK_X86_SIMD) || defined(__aarch64__)
  if constexpr (std::is_same_v<T, float>) {
    using Raw = typename Vec<T>::Raw;
    auto halve = [&](auto step_c) {
      constexpr int kStep = decltype(step_c)::value;
      if constexpr (kStep < kSize) {
        v = op(v,
               Vec<T>(swap_lanes<kStep>(static_cast<Raw>(v), std::make_index_sequence<kSize>())));
      }
    };
    halve(std::integral_constant<int, 8>());
    halve(std::integral_constant<int, 4>());
    halve(std::integral_constant<int, 2>());
    halve(std::integral_constant<int, 1>());
    static_assert(kSize <= 16, "four halvings");
    return v[0];
  }
#endif
  Vec<T> acc = v;
  for (int i = 1; i < kSize; ++i) {
    // at::vec's slow path: the next lane in lane 0, zeros elsewhere
    T next[kSize] = {};
    next[0] = v[i];
    acc = op(acc, Vec<T>::loadu(next));
  }
  return acc[0];
}
}  // namespace detail

// The lanes' sum.
template <typename T>
C10_ALWAYS_INLINE T sum_of_lanes(Vec<T> v) {
  return detail::reduce_lanes(v, [](Vec<T> a, Vec<T> b) { return a + b; });
}

// The largest lane (with clamp_min's NaN rule, lane by lane in the reduction's order).
template <typename T>
C10_ALWAYS_INLINE T max_of_lanes(Vec<T> v) {
  return detail::reduce_lanes(v, [](Vec<T> a, Vec<T> b) { return clamp_min(a, b); });
}

// ---------------------------------------------------------------------------------------------
// 2 * Vec<float>::size() float16 or bfloat16 elements to and from two float vectors. Widening is
// exact; narrowing rounds to nearest even. The AVX2 and AVX-512 builds convert in vectors, as
// at::vec does there (a NaN narrows to bfloat16 0xffff), the others element by element with
// c10's conversions, as at::vec's baseline did (a NaN narrows to 0x7fc0).

namespace detail {
template <typename T>
C10_ALWAYS_INLINE void widen_each(const T* p, Vec<float>& a, Vec<float>& b) {
  constexpr int V = Vec<float>::size();
  GK_ALIGNED float f[2 * V];
  for (int i = 0; i < 2 * V; ++i) f[i] = static_cast<float>(p[i]);
  a = Vec<float>::loadu(f);
  b = Vec<float>::loadu(f + V);
}
template <typename T>
C10_ALWAYS_INLINE void narrow_each(T* p, Vec<float> a, Vec<float> b) {
  constexpr int V = Vec<float>::size();
  GK_ALIGNED float f[2 * V];
  a.store(f);
  b.store(f + V);
  for (int i = 0; i < 2 * V; ++i) p[i] = static_cast<T>(f[i]);
}
}  // namespace detail

C10_ALWAYS_INLINE void load_widened(const Half* p, Vec<float>& a, Vec<float>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  a = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  b = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p) + 1));
#elif defined(CPU_CAPABILITY_AVX2)
  a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p) + 1));
#else
  detail::widen_each(p, a, b);
#endif
}

C10_ALWAYS_INLINE void load_widened(const BFloat16* p, Vec<float>& a, Vec<float>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  auto widen = [](const void* q) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(q)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  };
#elif defined(CPU_CAPABILITY_AVX2)
  auto widen = [](const void* q) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(q)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  };
#endif
#if defined(GK_X86_SIMD)
  a = widen(p);
  b = widen(p + Vec<float>::size());
#else
  detail::widen_each(p, a, b);
#endif
}

C10_ALWAYS_INLINE void store_narrowed(Half* p, Vec<float> a, Vec<float> b) {
#if defined(CPU_CAPABILITY_AVX512)
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(a, kRound));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p) + 1, _mm512_cvtps_ph(b, kRound));
#elif defined(CPU_CAPABILITY_AVX2)
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a, kRound));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p) + 1, _mm256_cvtps_ph(b, kRound));
#else
  detail::narrow_each(p, a, b);
#endif
}

#if defined(GK_X86_SIMD)
namespace detail {
// The bfloat16 bits of each lane (in the low half of a 32-bit lane): round to nearest even.
C10_ALWAYS_INLINE Vec<float>::Bits bfloat16_bits(Vec<float> v) {
  typedef uint32_t U __attribute__((vector_size(GK_REGISTER_BYTES)));
  const U u = vector_cast<U>(v.bits());
  const U rounded = (u + (((u >> 16) & 1) + 0x7fff)) >> 16;
  return vector_cast<Vec<float>::Bits>(v.isnan().bits() ? U{} + 0xffff : rounded);
}
}  // namespace detail
#endif

C10_ALWAYS_INLINE void store_narrowed(BFloat16* p, Vec<float> a, Vec<float> b) {
#if defined(GK_X86_SIMD)
  const auto lo = detail::bfloat16_bits(a), hi = detail::bfloat16_bits(b);
#endif
#if defined(CPU_CAPABILITY_AVX512)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtepi32_epi16(vector_cast<__m512i>(lo)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p) + 1,
                      _mm512_cvtepi32_epi16(vector_cast<__m512i>(hi)));
#elif defined(CPU_CAPABILITY_AVX2)
  // packus interleaves the 128-bit halves of lo and hi; the permute puts them back in order.
  const __m256i packed = _mm256_packus_epi32(vector_cast<__m256i>(lo), vector_cast<__m256i>(hi));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xd8));
#else
  detail::narrow_each(p, a, b);
#endif
}

// ---------------------------------------------------------------------------------------------
// exp and log. Float in the AVX2 and AVX-512 builds: Cephes' single-precision expf and logf (a
// polynomial on 2**n * e**r, |r| <= log(2)/2, resp. on the mantissa), inline, about 1 ulp
// (tests/test_cpu_gem_math.py bounds the error against float64); a vector with a lane outside
// the polynomials' plain range (exp: a result below 2**-126 or above the largest float; log: a
// zero, negative, subnormal, infinite or NaN input) takes a slower form of the same polynomials
// that handles every input as the C library does. Doubles, and floats elsewhere: the C
// library's exp and log per lane.

#if defined(GK_X86_SIMD)
namespace vmath {
using F = Vec<float>;
using Bits = F::Bits;
typedef uint32_t UBits __attribute__((vector_size(GK_VECTOR_BYTES)));

#if defined(CPU_CAPABILITY_AVX512)
C10_ALWAYS_INLINE F fma(F a, F b, F c) {
  return _mm512_fmadd_ps(a, b, c);
}
C10_ALWAYS_INLINE F round_nearest(F x) {
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
#else
C10_ALWAYS_INLINE F fma(F a, F b, F c) {
  return _mm256_fmadd_ps(a, b, c);
}
C10_ALWAYS_INLINE F round_nearest(F x) {
  return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
#endif

// Integral lanes to int32 and back (exact).
C10_ALWAYS_INLINE Bits to_int(F x) {
  return __builtin_convertvector(static_cast<F::Raw>(x), Bits);
}
C10_ALWAYS_INLINE F to_float(Bits n) {
  return __builtin_convertvector(n, F::Raw);
}
// 2**n for integers n in [-126, 127].
C10_ALWAYS_INLINE F two_to(Bits n) {
  return F::from_bits((n + 127) << 23);
}

// log(x) for x normal, positive and finite; `bias` is the exponent bias, 127 (more where x was
// scaled up by a power of 2).
C10_ALWAYS_INLINE F log_normal(F x, Bits bias) {
  const Bits bits = x.bits();
  // x = 2**e * m, m in [sqrt(1/2), sqrt(2)): the mantissa with the exponent of 1, or of 1/2
  // where it is at least sqrt(2) (then e is one more).
  F m = F::from_bits((bits & 0x007fffff) | 0x3f800000);
  Bits exponent = vector_cast<Bits>(vector_cast<UBits>(bits) >> 23) - bias;
#if defined(CPU_CAPABILITY_AVX512)
  const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356237f), _CMP_GE_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  const __m512i e_bits = vector_cast<__m512i>(exponent);
  exponent = vector_cast<Bits>(_mm512_mask_add_epi32(e_bits, big, e_bits, _mm512_set1_epi32(1)));
#else
  const F big = m >= F(1.41421356237f);
  m = F::blendv(m, m * F(0.5f), big);
  exponent -= big.bits();  // big lanes are -1
#endif
  const F e = to_float(exponent);
  const F f = m - F(1.0f);
  const F z = f * f;
  F y(7.0376836292E-2f);
  y = fma(y, f, F(-1.1514610310E-1f));
  y = fma(y, f, F(1.1676998740E-1f));
  y = fma(y, f, F(-1.2420140846E-1f));
  y = fma(y, f, F(1.4249322787E-1f));
  y = fma(y, f, F(-1.6668057665E-1f));
  y = fma(y, f, F(2.0000714765E-1f));
  y = fma(y, f, F(-2.4999993993E-1f));
  y = fma(y, f, F(3.3333331174E-1f));
  y = y * f * z;
  y = fma(e, F(-2.12194440E-4f), y);
  y = fma(z, F(-0.5f), y);
  return fma(e, F(0.693359375f), f + y);
}

// e**r and the integer n of x = n log(2) + r, |r| <= log(2)/2.
C10_ALWAYS_INLINE F exp_reduced(F x, Bits& n) {
  const F whole = round_nearest(x * F(1.44269504088896341f));
  F r = fma(whole, F(-0.693359375f), x);
  r = fma(whole, F(2.12194440E-4f), r);
  F p(1.9875691500E-4f);
  p = fma(p, r, F(1.3981999507E-3f));
  p = fma(p, r, F(8.3334519073E-3f));
  p = fma(p, r, F(4.1665795894E-2f));
  p = fma(p, r, F(1.6666665459E-1f));
  p = fma(p, r, F(5.0000001201E-1f));
  n = to_int(whole);
  return fma(p, r * r, r + F(1.0f));
}

// exp(x) for x in [-87, 88], where 2**n is a normal float.
C10_ALWAYS_INLINE F exp_normal(F x) {
  Bits n;
  const F p = exp_reduced(x, n);
  return p * two_to(n);
}

// exp(x) for every x: x clamped to [-104, 89] (beyond, the result is 0, resp. inf), and 2**n
// as 2**(n/2) * 2**(n - n/2), each a normal float, so that a subnormal result is rounded once.
// Out of line, as the rare path: inlined at every call, it doubled the code of GeM's loops
// (measured 20% slower).
__attribute__((noinline, cold)) inline F exp_any(F x) {
  Bits n;
  const F p = exp_reduced(clamp_max(clamp_min(x, F(-104.0f)), F(89.0f)), n);
  const Bits half = n >> 1;
  const F y = p * two_to(half) * two_to(n - half);
  return F::blendv(y, x, x.isnan());
}

// log(x) for every x, as the C library's: log(+-0) = -inf, log(x < 0) = NaN, log(inf) = inf,
// NaN stays NaN; a subnormal x is scaled by 2**24 first (exact) and its exponent corrected.
// Out of line, as exp_any.
__attribute__((noinline, cold)) inline F log_any(F x) {
  const F tiny = x < F(std::numeric_limits<float>::min());
  const F scaled = F::blendv(x, x * F(16777216.0f), tiny);
  F y = log_normal(scaled, 127 + (tiny.bits() & 24));
  const float inf = std::numeric_limits<float>::infinity();
  y = F::blendv(y, F(-inf), x == F(0.0f));
  y = F::blendv(y, F(std::numeric_limits<float>::quiet_NaN()), x < F(0.0f));
  y = F::blendv(y, F(inf), x == F(inf));
  return F::blendv(y, x, x.isnan());
}

// Whether every lane of x lies in [lo, hi] (false where one is NaN).
C10_ALWAYS_INLINE bool all_within(F x, float lo, float hi) {
#if defined(CPU_CAPABILITY_AVX512)
  return (_mm512_cmp_ps_mask(x, _mm512_set1_ps(lo), _CMP_GE_OQ) &
          _mm512_cmp_ps_mask(x, _mm512_set1_ps(hi), _CMP_LE_OQ)) == 0xffff;
#else
  return lane_bits((x >= F(lo)) & (F(hi) >= x)) == 0xff;
#endif
}
}  // namespace vmath
#endif

// f applied to each lane (the C library's functions, where there is no vector form).
template <typename T, typename F>
C10_ALWAYS_INLINE Vec<T> map_lanes(Vec<T> x, F&& f) {
  GK_ALIGNED T lanes[Vec<T>::size()];
  x.store(lanes);
  for (T& v : lanes) v = f(v);
  return Vec<T>::loadu(lanes);
}

template <typename T>
C10_ALWAYS_INLINE Vec<T> vec_log(Vec<T> x) {
#if defined(GK_X86_SIMD)
  if constexpr (std::is_same_v<T, float>) {
    if (C10_LIKELY(vmath::all_within(x, std::numeric_limits<float>::min(),
                                     std::numeric_limits<float>::max()))) {
      return vmath::log_normal(x, vmath::Bits{} + 127);
    }
    return vmath::log_any(x);
  }
#endif
  return map_lanes(x, [](T v) { return std::log(v); });
}

template <typename T>
C10_ALWAYS_INLINE Vec<T> vec_exp(Vec<T> x) {
#if defined(GK_X86_SIMD)
  if constexpr (std::is_same_v<T, float>) {
    if (C10_LIKELY(vmath::all_within(x, -87.0f, 88.0f))) return vmath::exp_normal(x);
    return vmath::exp_any(x);
  }
#endif
  return map_lanes(x, [](T v) { return std::exp(v); });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gapkernels
