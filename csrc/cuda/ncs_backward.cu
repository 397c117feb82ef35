// NCS backward: a group of lanes per (row, piece), one formula per element of grad_x; the
// elements before the first 16-byte boundary of grad_x (head) and after the last one (tail) are
// peeled off the 16-byte vector stores.
#include <cstdint>

#include "cuda/backward.cuh"
#include "cuda/common.cuh"
#include "cuda/launch.h"
#include "cuda/layout.cuh"

namespace gapkernels {
namespace {

template <typename scalar_t, Grad kGrad>
__global__ void __launch_bounds__(kThreads)
    ncs_pool_backward_kernel(BackwardArgs<scalar_t> a, NcsGeometry g) {
  using acc_t = acc_type<scalar_t>;
  constexpr int VEC = vec_size<scalar_t>();
  using VecT = Pack<scalar_t, VEC>;
  constexpr bool kReadsX = kGrad == Grad::Gem;
  const int group = 1 << g.group_log2;
  const int lane = threadIdx.x & (group - 1);
  const int64_t item =
      static_cast<int64_t>(blockIdx.x) * (kThreads >> g.group_log2) + (threadIdx.x >> g.group_log2);
  if (item >= g.items) return;
  const int64_t r = item / g.split;
  const int64_t piece = item - r * g.split;
  const int64_t n = r / a.C;
  const RowGradient<acc_t> rg = row_gradient<scalar_t, kGrad>(a, n, r - n * a.C);
  const int64_t begin = piece * g.chunk;
  const int64_t end = begin + g.chunk < a.S ? begin + g.chunk : a.S;
  scalar_t* gx = a.grad_x + r * a.S + begin;
  const scalar_t* xs = a.x + r * a.S + begin;
  const Peel pl = peel<VEC>(gx, end - begin);

  for (int64_t i = lane; i < pl.head; i += group) {
    const acc_t xv = kReadsX ? to_acc(xs[i]) : acc_t(0);
    gx[i] = from_acc<scalar_t>(grad_value<scalar_t, kGrad>(rg, begin + i, xv, a.eps));
  }
  VecT* body = reinterpret_cast<VecT*>(gx + pl.head);
  const scalar_t* x_body = xs + pl.head;
  const int64_t body_s = begin + pl.head;
#pragma unroll 2
  for (int64_t v = lane; v < pl.vectors; v += group) {
    VecT x_loaded;
    if constexpr (kReadsX) {
      x_loaded = load_channels<scalar_t, VEC>(x_body + v * VEC, a.x_vectorized, VEC);
    }
    VecT values;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t xv = kReadsX ? to_acc(x_loaded.v[j]) : acc_t(0);
      values.v[j] =
          from_acc<scalar_t>(grad_value<scalar_t, kGrad>(rg, body_s + v * VEC + j, xv, a.eps));
    }
    body[v] = values;
  }
  const int64_t tail_start = pl.head + pl.vectors * VEC;
  for (int64_t i = lane; i < pl.tail; i += group) {
    const acc_t xv = kReadsX ? to_acc(xs[tail_start + i]) : acc_t(0);
    gx[tail_start + i] =
        from_acc<scalar_t>(grad_value<scalar_t, kGrad>(rg, begin + tail_start + i, xv, a.eps));
  }
}

}  // namespace

template <typename scalar_t, Grad kGrad>
cudaError_t launch_ncs_backward(const BackwardArgs<scalar_t>& args, const NcsGeometry& g,
                                cudaStream_t stream) {
  ncs_pool_backward_kernel<scalar_t, kGrad><<<g.blocks, kThreads, 0, stream>>>(args, g);
  return cudaGetLastError();
}

#define GAPKERNELS_INSTANTIATE(scalar_t, grad)                    \
  template cudaError_t launch_ncs_backward<scalar_t, Grad::grad>( \
      const BackwardArgs<scalar_t>&, const NcsGeometry&, cudaStream_t);
GAPKERNELS_FOR_EACH_SCALAR_AND_GRAD(GAPKERNELS_INSTANTIATE)
#undef GAPKERNELS_INSTANTIATE

}  // namespace gapkernels
