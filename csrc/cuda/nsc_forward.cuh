// NSC forward: each thread owns VEC adjacent channels (one 16-byte vector) and walks every by-th
// position of its piece of S; the BY threads of a channel vector then merge in a fixed tree.
// Token rows: the pieces are cut from the span's begin, and a masked-out position is not read.
// Instantiated by nsc_forward.cu (pooling) and token_nsc_forward.cu.
#pragma once

#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/forward.cuh"
#include "cuda/launch.h"
#include "cuda/layout.cuh"
#include "cuda/rows.cuh"
#include "cuda/stats.cuh"
#include "pool_math.h"

namespace gapkernels {
namespace {

template <typename scalar_t, Stat kStat, typename Positions>
__global__ void __launch_bounds__(kThreads)
    nsc_pool_forward_kernel(ForwardArgs<scalar_t> a, NscGeometry g, Positions positions) {
  using acc_t = acc_type<scalar_t>;
  using St = Stats<acc_t, kStat>;
  constexpr int VEC = vec_size<scalar_t>();
  __shared__ acc_t shared_v0[VEC * kThreads];
  __shared__ acc_t shared_v1[VEC * kThreads];
  // GeM keeps no index but (PowLog) a third sum.
  __shared__ acc_t shared_v2[St::kLog ? VEC * kThreads : 1];
  __shared__ int64_t shared_index[St::kPow ? 1 : VEC * kThreads];

  const NscPlace place = nsc_place<VEC>(g, a.N, a.C);
  const int tid = place.tid, bx = place.bx, by = place.by, ty = place.ty;
  const int64_t n = place.n, piece = place.piece, c0 = place.c0;
  const int64_t channels_left = place.channels_left;
  const RowSpan span = row_span(positions, n, a.S);
  int64_t s_begin, s_end;
  piece_range(span.begin, span.end, piece, g.s_chunk, &s_begin, &s_end);

  St t[VEC];
  Exponent<acc_t> e[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    t[j].init();
    e[j] = gem_exponent<scalar_t, kStat>(a, c0 + j < a.C ? c0 + j : 0);
  }
  if (channels_left > 0) {
    const scalar_t* base = a.x + span.sample * a.S * a.C + c0;
    int64_t s = s_begin + ty;
    // kUnroll rows' loads in flight; a masked row (token pooling) takes the loop below, one
    // position at a time, its masked-out positions not read.
    for (; span.mask == nullptr && s + (kUnroll - 1) * by < s_end; s += kUnroll * by) {
      Pack<scalar_t, VEC> loaded[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        loaded[u] =
            load_channels<scalar_t, VEC>(base + (s + u * by) * a.C, g.vectorized, channels_left);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          t[j].add(to_acc(loaded[u].v[j]), s + u * by, a.eps, e[j]);
        }
      }
    }
    for (; s < s_end; s += by) {
      if (span.masked_out(s)) continue;
      const auto loaded = load_channels<scalar_t, VEC>(base + s * a.C, g.vectorized, channels_left);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        t[j].add(to_acc(loaded.v[j]), s, a.eps, e[j]);
      }
    }
  }

  // Fixed tree over the BY threads of each channel vector: ty < stride absorbs ty + stride.
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    shared_v0[j * kThreads + tid] = t[j].v0;
    shared_v1[j * kThreads + tid] = t[j].v1;
    if constexpr (St::kLog) shared_v2[j * kThreads + tid] = t[j].v2;
    if constexpr (!St::kPow) shared_index[j * kThreads + tid] = t[j].index;
  }
  __syncthreads();
  for (int stride = by >> 1; stride > 0; stride >>= 1) {
    if (ty < stride) {
      const int other = tid + stride * bx;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t o2 = St::kLog ? shared_v2[j * kThreads + other] : acc_t(0);
        const int64_t oindex = St::kPow ? kNoIndex : shared_index[j * kThreads + other];
        t[j].merge(shared_v0[j * kThreads + other], shared_v1[j * kThreads + other], o2, oindex,
                   e[j]);
        shared_v0[j * kThreads + tid] = t[j].v0;
        shared_v1[j * kThreads + tid] = t[j].v1;
        if constexpr (St::kLog) shared_v2[j * kThreads + tid] = t[j].v2;
        if constexpr (!St::kPow) shared_index[j * kThreads + tid] = t[j].index;
      }
    }
    __syncthreads();
  }
  if (ty == 0) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (j < channels_left) {
        emit_piece<scalar_t, kStat, Positions>(a, n * a.C + c0 + j, n, c0 + j, piece, t[j], e[j],
                                               positions);
      }
    }
  }
}

}  // namespace

template <typename scalar_t, Stat kStat, typename Positions>
cudaError_t launch_nsc_forward(const ForwardArgs<scalar_t>& args, const NscGeometry& g,
                               const Positions& positions, cudaStream_t stream) {
  nsc_pool_forward_kernel<scalar_t, kStat, Positions>
      <<<g.blocks, kThreads, 0, stream>>>(args, g, positions);
  return cudaGetLastError();
}

#define GAPKERNELS_INSTANTIATE_NSC_FORWARD(scalar_t, stat, positions)       \
  template cudaError_t launch_nsc_forward<scalar_t, Stat::stat, positions>( \
      const ForwardArgs<scalar_t>&, const NscGeometry&, const positions&, cudaStream_t);

}  // namespace gapkernels
