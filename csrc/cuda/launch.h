// The CUDA kernels' launch interface: plain C++ (no torch, no device code), included by the host
// unit (pool_cuda.cpp) and by the kernel units, which define these functions and instantiate them
// for each element type (float, double, __half, __nv_bfloat16) and statistic or gradient formula.
// Each launch function enqueues one kernel on `stream` and returns cudaGetLastError().
//
// Two layouts of the (N, C, S) view, one forward and one backward kernel template each:
//   NCS (rows of S contiguous elements): a group of G lanes (G = 1..32, a power of two chosen from
//     S) per work item; a work item is a row, or a fixed-length chunk of a row when there are too
//     few rows to fill the GPU (ncs_forward.cu, ncs_backward.cu).
//   NSC (C contiguous): each thread owns VEC adjacent channels (one 16-byte vector) and walks S;
//     a block is BX threads across channels by BY threads across S; S may be split over blocks
//     (nsc_forward.cu, nsc_backward.cu).
// A split reduction writes per-piece partial statistics to a buffer and a second small kernel
// combines them in a fixed order (combine.cu). How a reduction is split depends on the shape
// alone (host.h); no floating-point atomics anywhere, so every result is bitwise reproducible,
// at any address.
//
// Each kernel template (ncs_forward.cuh, ...) serves the pooling ops and token pooling: its
// `Positions` parameter says which positions of a row take part, every one (AllPositions: the
// units ncs_forward.cu, ...) or a span and an optional mask per row (TokenPositions: the units
// token_ncs_forward.cu, ...; rows.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include "pool_math.h"

namespace gapkernels {

constexpr int kThreads = 256;  // every kernel's block size (and launch bound)
constexpr int kUnroll = 4;     // loads in flight per thread in the forward kernels

// float for __half, __nv_bfloat16 and float; double for double.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Elements per 16-byte vector.
template <typename scalar_t>
constexpr int vec_size() {
  return 16 / static_cast<int>(sizeof(scalar_t));
}

// Which positions of each row take part. AllPositions: all of them (the pooling ops).
// TokenPositions: token pooling's normalized form (docs/DESIGN.md "Token pooling"): output row b
// has spans[4b .. 4b+3] = (begin, end, count, origin); positions [begin, end) of its sample (b;
// varlen: 0) take part where mask (N, S) is true, `count` of them; a max index is written as
// s - origin. Values are clamped on the device (rows.cuh): none was read on the host.
struct AllPositions {};
struct TokenPositions {
  const int64_t* spans;
  const bool* mask;  // nullptr: no mask
  int64_t rows;      // B
  bool varlen;       // x is the packed (1, C, total) batch (NSC); row b owns [origin, end)
};

// Which statistics a forward pass gathers.
enum class Stat : int { Sum, Max, SumMax, Pow, PowLog };

// acc_t values per piece in the split-reduction buffer: v0, v1 (and v2 for PowLog).
constexpr int partials_per_piece(Stat stat) {
  return stat == Stat::PowLog ? 3 : 2;
}

// Which formula a backward pass writes.
enum class Grad : int { Uniform, UniformPlusArgmax, Gem };

// NCS: work item = (row, piece) handled by 2^group_log2 lanes, enough lanes for each to take about
// kUnroll vectors (S = 49 float32: 4 lanes, 8 rows per warp).
struct NcsGeometry {
  int64_t split;  // pieces per row
  int64_t chunk;  // elements per piece (the last may be shorter)
  int64_t items;  // rows * split
  int64_t blocks;
  int group_log2;
};

// NSC: block = BX threads across channel vectors x BY threads across S.
struct NscGeometry {
  int64_t split;    // pieces of S
  int64_t s_chunk;  // S positions per piece (the last may be shorter)
  int64_t channel_blocks;
  int64_t blocks;  // channel_blocks * N * split
  int bx_log2;
  bool vectorized;  // 16-byte accesses (C % VEC == 0 and aligned pointers)
};

template <typename scalar_t>
struct ForwardArgs {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x;
  scalar_t* out;
  acc_t* aux;
  int64_t* indices;
  const acc_t* weight;    // nullptr: use `scalar`
  int64_t weight_stride;  // 0 (one weight) or 1 (per channel)
  acc_t scalar;
  acc_t eps;
  int64_t N;  // output rows (pooling: the samples; tokens: B)
  int64_t C;
  int64_t S;
  int64_t aux_columns;
  bool cat;  // SumMax: CAT layout of out, else MIXED
  // Split reductions: per (row, piece) statistics, [row][piece] order; nullptr when unsplit.
  acc_t* partial_values;  // partials_per_piece(kStat) per piece
  int64_t* partial_indices;
  int64_t split;

  GK_HOST_DEVICE GK_INLINE acc_t channel_weight(int64_t c) const {
    return weight != nullptr ? weight[c * weight_stride] : scalar;
  }
};

// Per row: grad_x = A + (s == index ? B : 0) (Uniform: B unused), or for GeM
// grad_x = x >= eps ? A * (x * B)^(p-1) : 0 with A = g r^(1/p - 1) / S and B = 1/M.
template <typename scalar_t>
struct BackwardArgs {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* grad_out;
  const scalar_t* x;
  const acc_t* aux;
  const int64_t* indices;
  const acc_t* weight;
  int64_t weight_stride;
  acc_t scalar;
  acc_t eps;
  scalar_t* grad_x;
  int64_t N;  // samples of x (tokens, padded: B; varlen: 1)
  int64_t C;
  int64_t S;
  int64_t aux_columns;
  int mode;
  bool x_vectorized;  // x's 16-byte alignment matches grad_x's (NSC: also C % VEC == 0)
};

// ncs_forward.cuh: g.blocks blocks; with g.split > 1 it writes the partials, else the results.
template <typename scalar_t, Stat kStat, typename Positions>
cudaError_t launch_ncs_forward(const ForwardArgs<scalar_t>& args, const NcsGeometry& g,
                               const Positions& positions, cudaStream_t stream);

// nsc_forward.cuh: as launch_ncs_forward (args.N: the output rows).
template <typename scalar_t, Stat kStat, typename Positions>
cudaError_t launch_nsc_forward(const ForwardArgs<scalar_t>& args, const NscGeometry& g,
                               const Positions& positions, cudaStream_t stream);

// combine.cuh: the results of `rows` rows from their args.split partials, 2^group_log2 lanes per
// row, in `blocks` blocks.
template <typename scalar_t, Stat kStat, typename Positions>
cudaError_t launch_combine_pieces(const ForwardArgs<scalar_t>& args, int64_t rows, int group_log2,
                                  int64_t blocks, const Positions& positions, cudaStream_t stream);

// ncs_backward.cuh, nsc_backward.cuh: grad_x, every element written once (args.N: the samples
// of x; a varlen batch's rows are found by position).
template <typename scalar_t, Grad kGrad, typename Positions>
cudaError_t launch_ncs_backward(const BackwardArgs<scalar_t>& args, const NcsGeometry& g,
                                const Positions& positions, cudaStream_t stream);

template <typename scalar_t, Grad kGrad, typename Positions>
cudaError_t launch_nsc_backward(const BackwardArgs<scalar_t>& args, const NscGeometry& g,
                                const Positions& positions, cudaStream_t stream);

// X(scalar_t, stat, positions) / X(scalar_t, grad, positions) for every element type and
// statistic / gradient formula: the kernel units' explicit instantiations.
#define GAPKERNELS_FOR_EACH_STAT(X, scalar_t, positions) \
  X(scalar_t, Sum, positions)                            \
  X(scalar_t, Max, positions)                            \
  X(scalar_t, SumMax, positions) X(scalar_t, Pow, positions) X(scalar_t, PowLog, positions)
#define GAPKERNELS_FOR_EACH_GRAD(X, scalar_t, positions) \
  X(scalar_t, Uniform, positions)                        \
  X(scalar_t, UniformPlusArgmax, positions) X(scalar_t, Gem, positions)
#define GAPKERNELS_FOR_EACH_SCALAR_AND_STAT(X, positions) \
  GAPKERNELS_FOR_EACH_STAT(X, float, positions)           \
  GAPKERNELS_FOR_EACH_STAT(X, double, positions)          \
  GAPKERNELS_FOR_EACH_STAT(X, __half, positions)          \
  GAPKERNELS_FOR_EACH_STAT(X, __nv_bfloat16, positions)
#define GAPKERNELS_FOR_EACH_SCALAR_AND_GRAD(X, positions) \
  GAPKERNELS_FOR_EACH_GRAD(X, float, positions)           \
  GAPKERNELS_FOR_EACH_GRAD(X, double, positions)          \
  GAPKERNELS_FOR_EACH_GRAD(X, __half, positions)          \
  GAPKERNELS_FOR_EACH_GRAD(X, __nv_bfloat16, positions)

}  // namespace gapkernels
