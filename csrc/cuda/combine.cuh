// Combine of split reductions: 2^group_log2 lanes per row read the row's pieces in order, merge
// them and write the row's results. Instantiated by combine.cu (pooling) and token_combine.cu.
#pragma once

#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/forward.cuh"
#include "cuda/launch.h"
#include "cuda/rows.cuh"
#include "cuda/stats.cuh"
#include "pool_math.h"

namespace gapkernels {
namespace {

template <typename scalar_t, Stat kStat, typename Positions>
__global__ void __launch_bounds__(kThreads)
    combine_pieces_kernel(ForwardArgs<scalar_t> a, int64_t rows, int group_log2,
                          Positions positions) {
  using acc_t = acc_type<scalar_t>;
  const int group = 1 << group_log2;
  const int lane = threadIdx.x & (group - 1);
  const int64_t r =
      static_cast<int64_t>(blockIdx.x) * (kThreads >> group_log2) + (threadIdx.x >> group_log2);
  const bool valid = r < rows;
  using St = Stats<acc_t, kStat>;
  St t;
  t.init();
  const int64_t n = valid ? divide_index(r, a.C) : 0;
  const int64_t c = valid ? r - n * a.C : 0;
  const Exponent<acc_t> e = gem_exponent<scalar_t, kStat>(a, c);
  if (valid) {
    for (int64_t piece = lane; piece < a.split; piece += group) {
      const int64_t slot = r * a.split + piece;
      const acc_t* values = a.partial_values + St::kPartials * slot;
      t.merge(values[0], values[1], St::kLog ? values[St::kPartials - 1] : acc_t(0),
              a.partial_indices[slot], e);
    }
  }
  t.group_reduce(group, e);
  if (valid && lane == 0) {
    finish_row<scalar_t, kStat, Positions>(a, r, n, c, t, e, positions);
  }
}

}  // namespace

template <typename scalar_t, Stat kStat, typename Positions>
cudaError_t launch_combine_pieces(const ForwardArgs<scalar_t>& args, int64_t rows, int group_log2,
                                  int64_t blocks, const Positions& positions, cudaStream_t stream) {
  combine_pieces_kernel<scalar_t, kStat, Positions>
      <<<blocks, kThreads, 0, stream>>>(args, rows, group_log2, positions);
  return cudaGetLastError();
}

#define GAPKERNELS_INSTANTIATE_COMBINE(scalar_t, stat, positions)              \
  template cudaError_t launch_combine_pieces<scalar_t, Stat::stat, positions>( \
      const ForwardArgs<scalar_t>&, int64_t, int, int64_t, const positions&, cudaStream_t);

}  // namespace gapkernels
