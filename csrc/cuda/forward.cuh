// Shared by the forward kernels (NCS, NSC) and the combine kernel: a channel's GeM exponent and
// what a complete row or a finished piece of a row writes (token rows: over their `count`
// positions, an empty row as docs/DESIGN.md "Token pooling" says).
#pragma once

#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/launch.h"
#include "cuda/rows.cuh"
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

// Writes out / aux / indices of row r = n * C + c from its complete statistics over `elements`
// positions (a max index: from `origin`).
template <typename scalar_t, Stat kStat>
__device__ __forceinline__ void write_row(const ForwardArgs<scalar_t>& a, int64_t r, int64_t n,
                                          int64_t c, const Stats<acc_type<scalar_t>, kStat>& t,
                                          Exponent<acc_type<scalar_t>> e, int64_t elements,
                                          int64_t origin) {
  using acc_t = acc_type<scalar_t>;
  using St = Stats<acc_t, kStat>;
  const acc_t count = static_cast<acc_t>(elements);
  if constexpr (St::kMax) a.indices[r] = t.index == kNoIndex ? 0 : t.index - origin;
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

// A token row where nothing took part: out 0, index -1, MIXED aux 0, GEM aux (M, r, l) =
// (0, 1, 0), so that the gradients computed from aux are 0.
template <typename scalar_t, Stat kStat>
__device__ __forceinline__ void write_empty_row(const ForwardArgs<scalar_t>& a, int64_t r,
                                                int64_t n, int64_t c) {
  using acc_t = acc_type<scalar_t>;
  using St = Stats<acc_t, kStat>;
  const scalar_t zero = from_acc<scalar_t>(acc_t(0));
  if constexpr (St::kMax) a.indices[r] = -1;
  if constexpr (kStat == Stat::SumMax) {
    if (a.cat) {
      a.out[n * 2 * a.C + c] = zero;
      a.out[n * 2 * a.C + a.C + c] = zero;
      return;
    }
    a.aux[r] = acc_t(0);
  }
  a.out[r] = zero;
  if constexpr (St::kPow) {
    a.aux[r * a.aux_columns] = acc_t(0);
    a.aux[r * a.aux_columns + 1] = acc_t(1);
    if constexpr (St::kLog) a.aux[r * a.aux_columns + 2] = acc_t(0);
  }
}

// Writes row r = n * C + c from its complete statistics. A token row (its span read again here:
// nothing of it stays live through the element loop) is empty when its count is not positive or
// no element was taken. A max statistic left at kNoIndex took no element above -inf: the
// pooling scan's start index (0, resolved in write_row) is, for a token row, its first position
// that takes part, and when there is none the row is empty; a GeM maximum still 0 (y >= eps > 0)
// took nothing either.
template <typename scalar_t, Stat kStat, typename Positions>
__device__ __forceinline__ void finish_row(const ForwardArgs<scalar_t>& a, int64_t r, int64_t n,
                                           int64_t c, const Stats<acc_type<scalar_t>, kStat>& t,
                                           Exponent<acc_type<scalar_t>> e,
                                           const Positions& positions) {
  using St = Stats<acc_type<scalar_t>, kStat>;
  if constexpr (kIsTokens<Positions>) {
    const RowSpan span = row_span(positions, n, a.S);
    Stats<acc_type<scalar_t>, kStat> found = t;
    if (St::kMax && t.index == kNoIndex) found.index = first_taken(span);
    const bool empty = span.count <= 0 || (St::kMax && found.index < 0) ||
                       (St::kPow && t.v1 == acc_type<scalar_t>(0));
    if (empty) {
      write_empty_row<scalar_t, kStat>(a, r, n, c);
    } else {
      write_row<scalar_t, kStat>(a, r, n, c, found, e, span.count, span.origin);
    }
  } else {
    write_row<scalar_t, kStat>(a, r, n, c, t, e, a.S, 0);
  }
}

// Row r = n * C + c's piece `piece` is complete: finish the row, or leave the piece for the
// combine kernel. (n and c come from the caller, computed before the element loop: a 64-bit
// division is a call, and values live across a call in a long kernel get spilled.)
template <typename scalar_t, Stat kStat, typename Positions>
__device__ __forceinline__ void emit_piece(const ForwardArgs<scalar_t>& a, int64_t r, int64_t n,
                                           int64_t c, int64_t piece,
                                           const Stats<acc_type<scalar_t>, kStat>& t,
                                           Exponent<acc_type<scalar_t>> e,
                                           const Positions& positions) {
  if (a.split == 1) {
    finish_row<scalar_t, kStat, Positions>(a, r, n, c, t, e, positions);
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
