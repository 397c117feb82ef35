// Shared by the forward kernels (NCS, NSC) and the combine kernel: a channel's GeM exponent and
// what a complete row or a finished piece of a row writes.
#pragma once

#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/launch.h"
#include "cuda/stats.cuh"
#include "pool_math.h"

namespace gapkernels {

template <typename scalar_t, Stat kStat>
__device__ __forceinline__ Exponent<acc_type<scalar_t>> gem_exponent(const ForwardArgs<scalar_t>& a,
                                                                     int64_t c) {
  using acc_t = acc_type<scalar_t>;
  Exponent<acc_t> e{acc_t(1), 1};
  if constexpr (Stats<acc_t, kStat>::kPow) {
    e.p = a.channel_weight(c);
    e.integral = integral_exponent(e.p);
  }
  return e;
}

// Writes out / aux / indices of row r = n * C + c from its complete statistics.
template <typename scalar_t, Stat kStat>
__device__ void write_row(const ForwardArgs<scalar_t>& a, int64_t r, int64_t n, int64_t c,
                          const Stats<acc_type<scalar_t>, kStat>& t,
                          Exponent<acc_type<scalar_t>> e) {
  using acc_t = acc_type<scalar_t>;
  using St = Stats<acc_t, kStat>;
  const acc_t count = static_cast<acc_t>(a.S);
  if constexpr (St::kMax) a.indices[r] = t.index == kNoIndex ? 0 : t.index;
  if constexpr (kStat == Stat::Sum) {
    a.out[r] = from_acc<scalar_t>(avg_value(t.v0, count));
  } else if constexpr (kStat == Stat::Max) {
    a.out[r] = from_acc<scalar_t>(t.v1);
  } else if constexpr (kStat == Stat::SumMax) {
    const acc_t avg = avg_value(t.v0, count);
    const acc_t mx = t.v1;
    if (a.cat) {
      a.out[n * 2 * a.C + c] = from_acc<scalar_t>(avg);
      a.out[n * 2 * a.C + a.C + c] = from_acc<scalar_t>(mx);
    } else {
      const acc_t alpha = a.channel_weight(c);
      a.out[r] = from_acc<scalar_t>(mixed_value(alpha, mx, avg));
      a.aux[r] = mixed_aux(mx, avg);
    }
  } else {
    // GeM: M = t.v1, r = mean (y/M)^p. (Reciprocals rather than divisions: no call, see
    // reciprocal().)
    const acc_t big_m = t.v1;
    const acc_t inv_count = reciprocal(count);
    acc_t mean_r = t.v0 * inv_count;  // then one correction step: the quotient, ~always
    mean_r = fused_multiply_add(fused_multiply_add(-mean_r, count, t.v0), inv_count, mean_r);
    const acc_t p = e.p;  // channel c's p, read before the element loop
    a.out[r] = from_acc<scalar_t>(gem_value(big_m, mean_r, p, FastReciprocal{}));
    a.aux[r * a.aux_columns] = big_m;
    a.aux[r * a.aux_columns + 1] = mean_r;
    if constexpr (St::kLog) a.aux[r * a.aux_columns + 2] = t.v2 * inv_count;
  }
}

// Row r = n * C + c's piece `piece` is complete: finish the row, or leave the piece for the
// combine kernel. (n and c come from the caller, computed before the element loop: a 64-bit
// division is a call, and values live across a call in a long kernel get spilled.)
template <typename scalar_t, Stat kStat>
__device__ __forceinline__ void emit_piece(const ForwardArgs<scalar_t>& a, int64_t r, int64_t n,
                                           int64_t c, int64_t piece,
                                           const Stats<acc_type<scalar_t>, kStat>& t,
                                           Exponent<acc_type<scalar_t>> e) {
  if (a.split == 1) {
    write_row<scalar_t, kStat>(a, r, n, c, t, e);
  } else {
    using St = Stats<acc_type<scalar_t>, kStat>;
    const int64_t slot = r * a.split + piece;
    a.partial_values[St::kPartials * slot] = t.v0;
    a.partial_values[St::kPartials * slot + 1] = t.v1;
    if constexpr (St::kLog) a.partial_values[St::kPartials * slot + 2] = t.v2;
    a.partial_indices[slot] = t.index;
  }
}

}  // namespace gapkernels
