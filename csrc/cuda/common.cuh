// Device helpers shared by the kernel units: element conversions, call-free reciprocal and index
// division, and the 16-byte vector loads and stores. CUDA headers and ours only (no torch).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "cuda/launch.h"
#include "pool_math.h"

namespace gapkernels {

// Marks "no element taken yet" in a max statistic; resolved to index 0 (torch's start index).
constexpr int64_t kNoIndex = std::numeric_limits<int64_t>::max();

template <typename scalar_t, int VEC>
struct alignas(16) Pack {
  scalar_t v[VEC];
};

// ---------------------------------------------------------------------------------------------
// Element <-> accumulator conversions, as torch's c10::Half and c10::BFloat16 do them on the
// device (round to nearest even; below sm_80 c10's bfloat16 rounding, NaN -> 0x7fc0).
__device__ __forceinline__ float to_acc(float v) {
  return v;
}
__device__ __forceinline__ double to_acc(double v) {
  return v;
}
__device__ __forceinline__ float to_acc(__half v) {
  return __half2float(v);
}
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

__device__ __forceinline__ __nv_bfloat16 float_to_bfloat16(float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __float2bfloat16(v);
#else
  if (v != v) return __ushort_as_bfloat16(static_cast<unsigned short>(0x7FC0u));
  const uint32_t bits = __float_as_uint(v);
  const uint32_t rounding_bias = ((bits >> 16) & 1u) + 0x7FFFu;
  return __ushort_as_bfloat16(static_cast<unsigned short>((bits + rounding_bias) >> 16));
#endif
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(acc_type<scalar_t> v) {
  if constexpr (std::is_same_v<scalar_t, __half>) {
    return __float2half(v);
  } else if constexpr (std::is_same_v<scalar_t, __nv_bfloat16>) {
    return float_to_bfloat16(v);
  } else {
    return v;
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t negative_infinity() {
  if constexpr (std::is_same_v<acc_t, double>) {
    return __longlong_as_double(static_cast<long long>(0xfff0000000000000ULL));
  } else {
    return __int_as_float(static_cast<int>(0xff800000u));
  }
}

// ---------------------------------------------------------------------------------------------
// 1/y for y > 0 to within about an ulp (subnormal and overflowing results included; +inf gives 0,
// NaN gives NaN), with no call: the IEEE division and reciprocal keep their slow path in a
// called subroutine, and the registers live across such a call in an element loop are spilled.
// y is scaled by a power of two into a range where the hardware approximation has no special
// case, refined by Newton steps, and scaled back (exactly, or with one rounding if subnormal).
__device__ __forceinline__ float reciprocal(float y) {
  const float scale = y > 0x1p+64f ? 0x1p-64f : (y < 0x1p-64f ? 0x1p+64f : 1.0f);
  const float ys = y * scale;
  float r = __fdividef(1.0f, ys);  // MUFU.RCP; ys in [2^-64, 2^64] here (no flush, no zero)
  r = fmaf(r, fmaf(-ys, r, 1.0f), r);
  r *= scale;
  return isinf(y) ? 0.0f : r;
}

__device__ __forceinline__ double reciprocal(double y) {
  const double scale = y > 0x1p+500 ? 0x1p-500 : (y < 0x1p-500 ? 0x1p+500 : 1.0);
  const double ys = y * scale;
  double r;
  asm("rcp.approx.ftz.f64 %0, %1;" : "=d"(r) : "d"(ys));  // about 20 bits
#pragma unroll
  for (int step = 0; step < 3; ++step) r = fma(r, fma(-ys, r, 1.0), r);  // 20 -> 40 -> 53
  r *= scale;
  return isinf(y) ? 0.0 : r;
}

// reciprocal() as the `Reciprocal` callable of pool_math.h's GeM functions.
struct FastReciprocal {
  template <typename acc_t>
  __device__ __forceinline__ acc_t operator()(acc_t y) const {
    return reciprocal(y);
  }
};

// floor(a / b) for indices 0 <= a < 2^51, 1 <= b, with no call (the compiler's 64-bit division
// is one, and in the GeM forward kernels the registers live across it got spilled): 32-bit
// division when both fit, else a double-precision estimate (relative error < 2^-51, so off by at
// most 1) corrected to the exact quotient. (Fixed correction steps, not loops: the compiler turns
// such a loop back into a division.)
__device__ __forceinline__ int64_t divide_index(int64_t a, int64_t b) {
  if (((a | b) >> 32) == 0) {
    return static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b));
  }
  int64_t q = static_cast<int64_t>(static_cast<double>(a) * reciprocal(static_cast<double>(b)));
  int64_t rest = a - q * b;
#pragma unroll
  for (int step = 0; step < 2; ++step) {
    const bool low = rest < 0;
    q = low ? q - 1 : q;
    rest = low ? rest + b : rest;
    const bool high = rest >= b;
    q = high ? q + 1 : q;
    rest = high ? rest - b : rest;
  }
  return q;
}

// ---------------------------------------------------------------------------------------------
// Loads and stores.

// The widest access (16, 8, 4 bytes, or one element) that a piece starting at `start` allows for
// each of its VEC-element slots (a slot is 16 bytes, so every slot has the start's alignment).
template <typename scalar_t>
__device__ __forceinline__ int slot_access_bytes(const scalar_t* start) {
  const auto address = reinterpret_cast<uintptr_t>(start);
  if ((address & 15u) == 0) return 16;
  if ((address & 7u) == 0) return 8;
  if ((address & 3u) == 0) return 4;
  return static_cast<int>(sizeof(scalar_t));
}

// Loads one slot of VEC elements with accesses of `bytes` (from slot_access_bytes): the same
// values whatever the width, so the width never changes the arithmetic.
template <typename scalar_t, int VEC>
__device__ __forceinline__ Pack<scalar_t, VEC> load_slot(const scalar_t* p, int bytes) {
  static_assert(sizeof(Pack<scalar_t, VEC>) == 16, "a slot is 16 bytes");
  Pack<scalar_t, VEC> loaded;
  if (bytes == 16) {
    loaded = *reinterpret_cast<const Pack<scalar_t, VEC>*>(p);
  } else if (bytes == 8) {
    const uint2* words = reinterpret_cast<const uint2*>(p);
    uint2* into = reinterpret_cast<uint2*>(loaded.v);
    into[0] = words[0];
    into[1] = words[1];
  } else if (sizeof(scalar_t) <= 4 && bytes == 4) {
    const unsigned int* words = reinterpret_cast<const unsigned int*>(p);
    unsigned int* into = reinterpret_cast<unsigned int*>(loaded.v);
#pragma unroll
    for (int w = 0; w < 4; ++w) into[w] = words[w];
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) loaded.v[j] = p[j];
  }
  return loaded;
}

// VEC adjacent elements (channels), as one 16-byte vector or, when not `vectorized`, element by
// element with zeros past `channels_left`.
template <typename scalar_t, int VEC>
__device__ __forceinline__ Pack<scalar_t, VEC> load_channels(const scalar_t* p, bool vectorized,
                                                             int64_t channels_left) {
  if (vectorized) return *reinterpret_cast<const Pack<scalar_t, VEC>*>(p);
  Pack<scalar_t, VEC> loaded;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    loaded.v[j] = j < channels_left ? p[j] : from_acc<scalar_t>(acc_type<scalar_t>(0));
  }
  return loaded;
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ void store_channels(scalar_t* p, const Pack<scalar_t, VEC>& values,
                                               bool vectorized, int64_t channels_left) {
  if (vectorized) {
    *reinterpret_cast<Pack<scalar_t, VEC>*>(p) = values;
    return;
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    if (j < channels_left) p[j] = values.v[j];
  }
}

}  // namespace gapkernels
