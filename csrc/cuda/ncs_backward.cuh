// NCS backward: a group of lanes per (row, piece), one formula per element of grad_x; the
// elements before the first 16-byte boundary of grad_x (head) and after the last one (tail) are
// peeled off the 16-byte vector stores. Token rows: 0 where a position does not take part (x is
// read there only in a 16-byte slot of the body that holds a position that does). Instantiated
// by ncs_backward.cu (pooling) and token_ncs_backward.cu.
#pragma once

#include <cstdint>

#include "cuda/backward.cuh"
#include "cuda/common.cuh"
#include "cuda/launch.h"
#include "cuda/layout.cuh"
#include "cuda/rows.cuh"

namespace gapkernels {
namespace {

template <typename scalar_t, Grad kGrad, typename Positions>
__global__ void __launch_bounds__(kThreads)
    ncs_pool_backward_kernel(BackwardArgs<scalar_t> a, NcsGeometry g, Positions positions) {
  using acc_t = acc_type<scalar_t>;
  constexpr int VEC = vec_size<scalar_t>();
  using VecT = Pack<scalar_t, VEC>;
  constexpr bool kReadsX = kGrad == Grad::Gem;
  constexpr bool kTokens = kIsTokens<Positions>;
  const int group = 1 << g.group_log2;
  const int lane = threadIdx.x & (group - 1);
  const int64_t item =
      static_cast<int64_t>(blockIdx.x) * (kThreads >> g.group_log2) + (threadIdx.x >> g.group_log2);
  if (item >= g.items) return;
  const int64_t r = item / g.split;
  const int64_t piece = item - r * g.split;
  const int64_t n = r / a.C;
  const RowSpan span = row_span(positions, n, a.S);
  const RowGradient<acc_t> rg = row_gradient<scalar_t, kGrad, Positions>(a, n, r - n * a.C, span);
  int64_t begin, end;
  piece_range(0, a.S, piece, g.chunk, &begin, &end);  // the whole row: every element written
  scalar_t* gx = a.grad_x + r * a.S + begin;
  const scalar_t* xs = a.x + r * a.S + begin;
  const Peel pl = peel<VEC>(gx, end - begin);
  auto element = [&](int64_t i) {  // grad_x[begin + i] outside the vector body
    const int64_t s = begin + i;
    const bool read = kReadsX && (!kTokens || span.takes_part(s));
    const acc_t xv = read ? to_acc(xs[i]) : acc_t(0);
    gx[i] = from_acc<scalar_t>(position_grad<scalar_t, kGrad, kTokens>(rg, span, s, xv, a.eps));
  };

  for (int64_t i = lane; i < pl.head; i += group) element(i);
  VecT* body = reinterpret_cast<VecT*>(gx + pl.head);
  const scalar_t* x_body = xs + pl.head;
  const int64_t body_s = begin + pl.head;
#pragma unroll 2
  for (int64_t v = lane; v < pl.vectors; v += group) {
    VecT x_loaded;
    if constexpr (kReadsX) {
      // (a token row's slot wholly outside its span is not read: none of its positions takes part)
      const int64_t first = body_s + v * VEC;
      if (!kTokens || (first < span.end && first + VEC > span.begin)) {
        x_loaded = load_channels<scalar_t, VEC>(x_body + v * VEC, a.x_vectorized, VEC);
      }
    }
    VecT values;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t xv = kReadsX ? to_acc(x_loaded.v[j]) : acc_t(0);
      values.v[j] = from_acc<scalar_t>(
          position_grad<scalar_t, kGrad, kTokens>(rg, span, body_s + v * VEC + j, xv, a.eps));
    }
    body[v] = values;
  }
  const int64_t tail_start = pl.head + pl.vectors * VEC;
  for (int64_t i = lane; i < pl.tail; i += group) element(tail_start + i);
}

}  // namespace

template <typename scalar_t, Grad kGrad, typename Positions>
cudaError_t launch_ncs_backward(const BackwardArgs<scalar_t>& args, const NcsGeometry& g,
                                const Positions& positions, cudaStream_t stream) {
  ncs_pool_backward_kernel<scalar_t, kGrad, Positions>
      <<<g.blocks, kThreads, 0, stream>>>(args, g, positions);
  return cudaGetLastError();
}

#define GAPKERNELS_INSTANTIATE_NCS_BACKWARD(scalar_t, grad, positions)       \
  template cudaError_t launch_ncs_backward<scalar_t, Grad::grad, positions>( \
      const BackwardArgs<scalar_t>&, const NcsGeometry&, const positions&, cudaStream_t);

}  // namespace gapkernels
