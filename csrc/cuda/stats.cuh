// The running statistics of one piece of a row, for each forward statistic: the scan of elements,
// the merge of two pieces and the butterfly over a group of lanes. The math is pool_math.h's.
#pragma once

#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/launch.h"
#include "pool_math.h"

namespace gapkernels {

//   Sum, Max, SumMax: v0 = sum, v1 = max, index = arg-max (v2, inv_m unused).
//   Pow, PowLog (GeM, relative to the piece's running maximum M of y = clamp(x, eps)):
//     v1 = M (0 while empty), v0 = sum of (y/M)^p, v2 = sum of (y/M)^p log(y/M) (PowLog),
//     inv_m = 1/M (index unused).
template <typename acc_t, Stat kStat>
struct Stats {
  static constexpr bool kSum = kStat == Stat::Sum || kStat == Stat::SumMax;
  static constexpr bool kMax = kStat == Stat::Max || kStat == Stat::SumMax;
  static constexpr bool kPow = kStat == Stat::Pow || kStat == Stat::PowLog;
  static constexpr bool kLog = kStat == Stat::PowLog;
  static constexpr int kPartials = partials_per_piece(kStat);

  acc_t v0;
  acc_t v1;
  acc_t v2;
  acc_t inv_m;
  int64_t index;

  __device__ __forceinline__ void init() {
    v0 = acc_t(0);
    v1 = kMax ? negative_infinity<acc_t>() : acc_t(0);
    v2 = acc_t(0);
    inv_m = acc_t(0);
    index = kNoIndex;
  }

  // Elements of one piece must be added in increasing s (torch's scan order).
  __device__ __forceinline__ void add(acc_t v, int64_t s, acc_t eps, Exponent<acc_t> e) {
    if constexpr (kSum) v0 += v;
    if constexpr (kMax) scan_max(v, s, v1, index);
    if constexpr (kPow) gem_scan<kLog>(v, eps, e, v1, v0, v2, inv_m, FastReciprocal{});
  }

  // Absorbs another piece's statistics (o2: its v2, read only for PowLog; e: GeM's exponent).
  // GeM: both pieces are brought to the larger maximum, then added (this + other).
  __device__ __forceinline__ void merge(acc_t o0, acc_t o1, acc_t o2, int64_t oindex,
                                        Exponent<acc_t> e) {
    if constexpr (kSum) v0 += o0;
    if constexpr (kMax) merge_max(o1, oindex, v1, index);
    if constexpr (kPow) gem_merge<kLog>(v1, v0, v2, o1, o0, o2, e, FastReciprocal{});
  }

  // Butterfly over groups of `group` lanes (a power of two); every lane of the warp must call it.
  // Each lane ends with the same, fixed-order result (the merge is commutative bit for bit).
  __device__ __forceinline__ void group_reduce(int group, Exponent<acc_t> e) {
    for (int offset = group >> 1; offset > 0; offset >>= 1) {
      const acc_t o0 = __shfl_xor_sync(0xffffffffu, v0, offset);
      const acc_t o1 = __shfl_xor_sync(0xffffffffu, v1, offset);
      acc_t o2 = acc_t(0);
      if constexpr (kLog) o2 = __shfl_xor_sync(0xffffffffu, v2, offset);
      int64_t oi = kNoIndex;
      if constexpr (!kPow) {
        oi = static_cast<int64_t>(
            __shfl_xor_sync(0xffffffffu, static_cast<long long>(index), offset));
      }
      merge(o0, o1, o2, oi, e);
    }
  }
};

}  // namespace gapkernels
