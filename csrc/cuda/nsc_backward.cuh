// NSC backward: each thread owns VEC adjacent channels and writes them at every by-th position of
// its piece of S, one formula per element of grad_x. Token rows: 0 where a position does not
// take part (x not read there); a varlen batch (one sample) finds the row that owns each
// position as it walks. Instantiated by nsc_backward.cu (pooling) and token_nsc_backward.cu.
#pragma once

#include <cstdint>

#include "cuda/backward.cuh"
#include "cuda/common.cuh"
#include "cuda/launch.h"
#include "cuda/layout.cuh"
#include "cuda/rows.cuh"

namespace gapkernels {
namespace {

// Row b's constants for channels c0 .. c0 + VEC - 1 (those past C: channel c0's).
template <typename scalar_t, Grad kGrad, typename Positions, int VEC>
__device__ __forceinline__ void channel_gradients(const BackwardArgs<scalar_t>& a, int64_t b,
                                                  int64_t c0, int64_t channels_left,
                                                  const RowSpan& span,
                                                  RowGradient<acc_type<scalar_t>>* rg) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    rg[j] = row_gradient<scalar_t, kGrad, Positions>(a, b, j < channels_left ? c0 + j : c0, span);
  }
}

template <typename scalar_t, Grad kGrad, typename Positions>
__global__ void __launch_bounds__(kThreads)
    nsc_pool_backward_kernel(BackwardArgs<scalar_t> a, NscGeometry g, Positions positions) {
  using acc_t = acc_type<scalar_t>;
  constexpr int VEC = vec_size<scalar_t>();
  constexpr bool kReadsX = kGrad == Grad::Gem;
  constexpr bool kTokens = kIsTokens<Positions>;
  const NscPlace place = nsc_place<VEC>(g, a.N, a.C);
  const int by = place.by, ty = place.ty;
  const int64_t n = place.n, c0 = place.c0;
  const int64_t channels_left = place.channels_left;
  int64_t s_begin, s_end;
  piece_range(0, a.S, place.piece, g.s_chunk, &s_begin, &s_end);  // the whole sample
  if (channels_left <= 0) return;

  // The row whose elements are written: the sample's own (pooling, padded token rows), or in a
  // varlen batch the one that owns the position (found at the first, then on leaving each row).
  int64_t b = n;
  if constexpr (kTokens) {
    if (positions.varlen) b = varlen_row_at(positions, s_begin + ty, a.S);
  }
  RowSpan span = row_span(positions, b, a.S);
  RowGradient<acc_t> rg[VEC];
  channel_gradients<scalar_t, kGrad, Positions, VEC>(a, b, c0, channels_left, span, rg);
  const int64_t base = n * a.S * a.C + c0;
#pragma unroll 2
  for (int64_t s = s_begin + ty; s < s_end; s += by) {
    if constexpr (kTokens) {
      if (positions.varlen && s >= span.own_end) {
        const int64_t next = varlen_next_row(positions, b, s, a.S);
        if (next != b) {
          b = next;
          span = row_span(positions, b, a.S);
          channel_gradients<scalar_t, kGrad, Positions, VEC>(a, b, c0, channels_left, span, rg);
        }
      }
    }
    const bool taken = !kTokens || span.takes_part(s);
    const int64_t offset = base + s * a.C;
    Pack<scalar_t, VEC> x_loaded;
    if constexpr (kReadsX) {
      if (taken)
        x_loaded = load_channels<scalar_t, VEC>(a.x + offset, a.x_vectorized, channels_left);
    }
    Pack<scalar_t, VEC> values;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t xv = kReadsX && taken ? to_acc(x_loaded.v[j]) : acc_t(0);
      values.v[j] =
          from_acc<scalar_t>(taken ? grad_value<scalar_t, kGrad>(rg[j], s, xv, a.eps) : acc_t(0));
    }
    store_channels<scalar_t, VEC>(a.grad_x + offset, values, g.vectorized, channels_left);
  }
}

}  // namespace

template <typename scalar_t, Grad kGrad, typename Positions>
cudaError_t launch_nsc_backward(const BackwardArgs<scalar_t>& args, const NscGeometry& g,
                                const Positions& positions, cudaStream_t stream) {
  nsc_pool_backward_kernel<scalar_t, kGrad, Positions>
      <<<g.blocks, kThreads, 0, stream>>>(args, g, positions);
  return cudaGetLastError();
}

#define GAPKERNELS_INSTANTIATE_NSC_BACKWARD(scalar_t, grad, positions)       \
  template cudaError_t launch_nsc_backward<scalar_t, Grad::grad, positions>( \
      const BackwardArgs<scalar_t>&, const NscGeometry&, const positions&, cudaStream_t);

}  // namespace gapkernels
