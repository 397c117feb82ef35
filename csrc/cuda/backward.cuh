// Shared by the backward kernels (NCS, NSC): each row's gradient constants and the formula of
// one element of grad_x (docs/DESIGN.md, the table of grad_x per mode; a token row: with its
// count for S, and only where a position takes part).
#pragma once

#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/launch.h"
#include "cuda/rows.cuh"
#include "pool_math.h"

namespace gapkernels {

template <typename acc_t>
struct RowGradient {
  acc_t A;
  acc_t B;
  acc_t m;  // GeM: M
  int64_t index;
  Exponent<acc_t> e;  // GeM: p - 1
};

// Row r = n * C + c's constants; a token row (span `span`) with its count for S (a count that is
// not positive, an empty row's, whose positions never take part, as 1).
template <typename scalar_t, Grad kGrad, typename Positions>
__device__ __forceinline__ RowGradient<acc_type<scalar_t>> row_gradient(
    const BackwardArgs<scalar_t>& a, int64_t n, int64_t c, const RowSpan& span) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool kTokens = kIsTokens<Positions>;
  const int64_t r = n * a.C + c;
  const acc_t count = static_cast<acc_t>(kTokens ? (span.count > 0 ? span.count : 1) : a.S);
  RowGradient<acc_t> rg{acc_t(0), acc_t(0), acc_t(0), -1, {acc_t(0), 0}};
  if constexpr (kGrad == Grad::Gem) {
    // GeM: A = g r^(1/p - 1) / S, B = 1/M. Reciprocals rather than divisions: no call (see
    // reciprocal()), so nothing is spilled around one.
    const acc_t g = to_acc(a.grad_out[r]);
    const acc_t p = a.weight != nullptr ? a.weight[c * a.weight_stride] : a.scalar;
    const acc_t big_m = a.aux[r * a.aux_columns];
    const acc_t mean_r = a.aux[r * a.aux_columns + 1];
    rg.A = gem_grad_scale(g, mean_r, p, count, FastReciprocal{});
    rg.B = reciprocal(big_m);  // as the forward's z = y * (1/M)
    rg.m = big_m;
    rg.e = make_exponent(p - acc_t(1));
    return rg;
  }
  const Mode mode = static_cast<Mode>(a.mode);
  if (mode == Mode::Cat) {
    rg.A = to_acc(a.grad_out[n * 2 * a.C + c]) / count;
    rg.B = to_acc(a.grad_out[n * 2 * a.C + a.C + c]);
  } else {
    const acc_t g = to_acc(a.grad_out[r]);
    if (mode == Mode::Avg) {
      rg.A = g / count;
    } else if (mode == Mode::Max) {
      rg.B = g;
    } else if (mode == Mode::Mixed) {
      const acc_t alpha = a.weight != nullptr ? a.weight[c * a.weight_stride] : a.scalar;
      rg.A = (acc_t(1) - alpha) * g / count;
      rg.B = alpha * g;
    }
  }
  // The stored index is relative to the row's origin (an empty row's -1 is never used: none of
  // its positions takes part).
  if constexpr (kGrad == Grad::UniformPlusArgmax) {
    rg.index = kTokens ? a.indices[r] + span.origin : a.indices[r];
  }
  return rg;
}

template <typename scalar_t, Grad kGrad>
__device__ __forceinline__ acc_type<scalar_t> grad_value(const RowGradient<acc_type<scalar_t>>& rg,
                                                         int64_t s, acc_type<scalar_t> xv,
                                                         acc_type<scalar_t> eps) {
  if constexpr (kGrad == Grad::Uniform) {
    return rg.A;
  } else if constexpr (kGrad == Grad::UniformPlusArgmax) {
    return s == rg.index ? rg.A + rg.B : rg.A;
  } else {
    return gem_grad(xv, eps, rg.A, rg.m, rg.B, rg.e);
  }
}

// grad_x at position s of a row of span `span`: grad_value where s takes part, else 0 (every
// position takes part in a pooling row).
template <typename scalar_t, Grad kGrad, bool kTokens>
__device__ __forceinline__ acc_type<scalar_t> position_grad(
    const RowGradient<acc_type<scalar_t>>& rg, const RowSpan& span, int64_t s,
    acc_type<scalar_t> xv, acc_type<scalar_t> eps) {
  if constexpr (kTokens) {
    if (!span.takes_part(s)) return acc_type<scalar_t>(0);
  }
  return grad_value<scalar_t, kGrad>(rg, s, xv, eps);
}

}  // namespace gapkernels
