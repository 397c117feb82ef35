// NCS forward: a group of 2^group_log2 lanes per work item (a row, or a fixed-length piece of a
// row when there are too few rows to fill the GPU). Lanes take 16-byte slots of the piece by
// index, so the address never changes the summation order (docs/DESIGN.md "Determinism").
// Token rows: the pieces are cut from the span's begin; masked-out elements of a loaded slot are
// left out. Instantiated by ncs_forward.cu (pooling) and token_ncs_forward.cu.
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

// Which lane adds which element depends on the element's index in the piece alone, never on the
// address: slot v (elements [v*VEC, v*VEC + VEC) of the piece) belongs to lane v % group, which
// adds its slots in increasing v, each in increasing element order; the last, partial slot (the
// piece's length % VEC elements) belongs to lane (length / VEC) % group, after its full slots. A
// misaligned piece loads the same slots with narrower accesses (load_slot), so the same values
// give the same bits at any address. kMasked: an element whose mask byte is false is left out,
// and the elements are read one at a time, in the same order (one inlined scan step: a mask test
// on every element of unrolled slots held so many registers that GeM's steps spilled).
template <bool kMasked, typename scalar_t, Stat kStat>
__device__ __forceinline__ void ncs_scan_piece(Stats<acc_type<scalar_t>, kStat>& t,
                                               const scalar_t* start, int64_t begin, int64_t length,
                                               const bool* mask, int lane, int group,
                                               acc_type<scalar_t> eps,
                                               Exponent<acc_type<scalar_t>> e) {
  constexpr int VEC = vec_size<scalar_t>();
  using VecT = Pack<scalar_t, VEC>;
  if constexpr (kMasked) {
#pragma unroll 1
    for (int64_t first = static_cast<int64_t>(lane) * VEC; first < length; first += group * VEC) {
      const int64_t last = first + VEC < length ? first + VEC : length;  // slot first / VEC
#pragma unroll 1
      for (int64_t i = first; i < last; ++i) {
        if (mask[begin + i]) t.add(to_acc(start[i]), begin + i, eps, e);
      }
    }
    return;
  }
  const int bytes = slot_access_bytes(start);
  const int64_t slots = length / VEC;
  const int64_t rest = length - slots * VEC;

  // Up to kUnroll slot loads in flight per lane, issued before any of them is used.
  for (int64_t v = lane; v < slots; v += kUnroll * group) {
    VecT loaded[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v + u * group < slots) {
        loaded[u] = load_slot<scalar_t, VEC>(start + (v + u * group) * VEC, bytes);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v + u * group < slots) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          t.add(to_acc(loaded[u].v[j]), begin + (v + u * group) * VEC + j, eps, e);
        }
      }
    }
  }
  if (rest > 0 && lane == static_cast<int>(slots & (group - 1))) {
    const int64_t tail = slots * VEC;
    for (int64_t i = 0; i < rest; ++i) t.add(to_acc(start[tail + i]), begin + tail + i, eps, e);
  }
}

// Token rows: at least 1 block per SM named, so that ptxas does not hold the kernel to 64 or 80
// registers and spill (it did, on sm_80 and sm_90, for GeM and max); the pooling kernels keep
// their bounds (0: none named).
template <typename scalar_t, Stat kStat, typename Positions>
__global__ void __launch_bounds__(kThreads, kIsTokens<Positions> ? 1 : 0)
    ncs_pool_forward_kernel(ForwardArgs<scalar_t> a, NcsGeometry g, Positions positions) {
  using acc_t = acc_type<scalar_t>;
  const int group = 1 << g.group_log2;
  const int lane = threadIdx.x & (group - 1);
  const int64_t item =
      static_cast<int64_t>(blockIdx.x) * (kThreads >> g.group_log2) + (threadIdx.x >> g.group_log2);

  Stats<acc_t, kStat> t;
  t.init();
  int64_t r = 0;
  int64_t n = 0;
  int64_t c = 0;
  int64_t piece = 0;
  Exponent<acc_t> e{acc_t(1), 1};
  const bool valid = item < g.items;
  if (valid) {
    r = divide_index(item, g.split);
    piece = item - r * g.split;
    n = divide_index(r, a.C);
    c = r - n * a.C;
    e = gem_exponent<scalar_t, kStat>(a, c);
    const RowSpan span = row_span(positions, n, a.S);
    int64_t begin, end;
    piece_range(span.begin, span.end, piece, g.chunk, &begin, &end);
    if constexpr (kIsTokens<Positions>) {
      end = end > begin ? end : begin;  // a piece past the row's end
      const scalar_t* start = a.x + (span.sample * a.C + c) * a.S + begin;
      if (span.mask != nullptr) {
        ncs_scan_piece<true>(t, start, begin, end - begin, span.mask, lane, group, a.eps, e);
      } else {
        ncs_scan_piece<false>(t, start, begin, end - begin, nullptr, lane, group, a.eps, e);
      }
    } else {
      const scalar_t* start = a.x + r * a.S + begin;
      ncs_scan_piece<false>(t, start, begin, end - begin, nullptr, lane, group, a.eps, e);
    }
  }
  t.group_reduce(group, e);
  if (valid && lane == 0)
    emit_piece<scalar_t, kStat, Positions>(a, r, n, c, piece, t, e, positions);
}

}  // namespace

template <typename scalar_t, Stat kStat, typename Positions>
cudaError_t launch_ncs_forward(const ForwardArgs<scalar_t>& args, const NcsGeometry& g,
                               const Positions& positions, cudaStream_t stream) {
  ncs_pool_forward_kernel<scalar_t, kStat, Positions>
      <<<g.blocks, kThreads, 0, stream>>>(args, g, positions);
  return cudaGetLastError();
}

#define GAPKERNELS_INSTANTIATE_NCS_FORWARD(scalar_t, stat, positions)       \
  template cudaError_t launch_ncs_forward<scalar_t, Stat::stat, positions>( \
      const ForwardArgs<scalar_t>&, const NcsGeometry&, const positions&, cudaStream_t);

}  // namespace gapkernels
