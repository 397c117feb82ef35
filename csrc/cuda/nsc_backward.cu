// NSC backward: each thread owns VEC adjacent channels and writes them at every by-th position of
// its piece of S, one formula per element of grad_x.
#include <cstdint>

#include "cuda/backward.cuh"
#include "cuda/common.cuh"
#include "cuda/launch.h"
#include "cuda/layout.cuh"

namespace gapkernels {
namespace {

template <typename scalar_t, Grad kGrad>
__global__ void __launch_bounds__(kThreads)
    nsc_pool_backward_kernel(BackwardArgs<scalar_t> a, NscGeometry g) {
  using acc_t = acc_type<scalar_t>;
  constexpr int VEC = vec_size<scalar_t>();
  constexpr bool kReadsX = kGrad == Grad::Gem;
  const NscPlace place = nsc_place<VEC>(g, a.N, a.C, a.S);
  const int by = place.by, ty = place.ty;
  const int64_t n = place.n, c0 = place.c0;
  const int64_t channels_left = place.channels_left, s_begin = place.s_begin, s_end = place.s_end;
  if (channels_left <= 0) return;

  RowGradient<acc_t> rg[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    rg[j] = row_gradient<scalar_t, kGrad>(a, n, j < channels_left ? c0 + j : c0);
  }
  const int64_t base = n * a.S * a.C + c0;
#pragma unroll 2
  for (int64_t s = s_begin + ty; s < s_end; s += by) {
    const int64_t offset = base + s * a.C;
    Pack<scalar_t, VEC> x_loaded;
    if constexpr (kReadsX) {
      x_loaded = load_channels<scalar_t, VEC>(a.x + offset, a.x_vectorized, channels_left);
    }
    Pack<scalar_t, VEC> values;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t xv = kReadsX ? to_acc(x_loaded.v[j]) : acc_t(0);
      values.v[j] = from_acc<scalar_t>(grad_value<scalar_t, kGrad>(rg[j], s, xv, a.eps));
    }
    store_channels<scalar_t, VEC>(a.grad_x + offset, values, g.vectorized, channels_left);
  }
}

}  // namespace

template <typename scalar_t, Grad kGrad>
cudaError_t launch_nsc_backward(const BackwardArgs<scalar_t>& args, const NscGeometry& g,
                                cudaStream_t stream) {
  nsc_pool_backward_kernel<scalar_t, kGrad><<<g.blocks, kThreads, 0, stream>>>(args, g);
  return cudaGetLastError();
}

#define GAPKERNELS_INSTANTIATE(scalar_t, grad)                    \
  template cudaError_t launch_nsc_backward<scalar_t, Grad::grad>( \
      const BackwardArgs<scalar_t>&, const NscGeometry&, cudaStream_t);
GAPKERNELS_FOR_EACH_SCALAR_AND_GRAD(GAPKERNELS_INSTANTIATE)
#undef GAPKERNELS_INSTANTIATE

}  // namespace gapkernels
