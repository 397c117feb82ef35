// The CUDA host side shared by the pooling ops (pool_cuda.cpp) and token pooling
// (token_cuda.cpp): the launch geometry (from the shape alone), dtype and mode dispatch and the
// launches, on the LibTorch stable ABI (included only by those two units).
#pragma once

#include <torch/csrc/inductor/aoti_torch/c/shim.h>  // aoti_torch_get_current_cuda_stream
#include <torch/csrc/stable/macros.h>               // STD_CUDA_CHECK
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>

#include "cuda/launch.h"
#include "stable_common.h"

namespace gapkernels {

// NCS: rows fewer than this many (one warp each would leave the GPU idle) get split into chunks.
constexpr int64_t kNcsFillItems = 4096;
constexpr int64_t kNcsMinChunk = 2048;
constexpr int64_t kNcsChunkAlign = 64;
// NSC: fewer blocks than this get S split over blocks, each thread keeping at least
// kNscMinStepsPerThread steps over S.
constexpr int64_t kNscFillBlocks = 512;
constexpr int64_t kNscMinStepsPerThread = 16;

// torch's element types (the x dtype the checks accepted) -> the CUDA ones the kernels are
// compiled for; the data pointers are reinterpreted, which needs the same layout and bits.
static_assert(sizeof(torch::headeronly::Half) == sizeof(__half) &&
              alignof(torch::headeronly::Half) == alignof(__half));
static_assert(sizeof(torch::headeronly::BFloat16) == sizeof(__nv_bfloat16) &&
              alignof(torch::headeronly::BFloat16) == alignof(__nv_bfloat16));

// Calls f(TypeTag<cuda_t>{}) for x's dtype, one of the four check_forward accepts
// (stable_common.h's switch, with CUDA's half types).
template <typename F>
void dispatch_float_types(ScalarType dtype, const char* op, F&& f) {
  dispatch_dtype<__half, __nv_bfloat16>(dtype, op, "CUDA", std::forward<F>(f));
}

// The current CUDA stream of the device (x's, under the guard).
inline cudaStream_t current_stream(int32_t device_index) {
  void* stream = nullptr;
  shim_check(aoti_torch_get_current_cuda_stream(device_index, &stream),
             "aoti_torch_get_current_cuda_stream");
  return static_cast<cudaStream_t>(stream);
}

inline int ceil_log2(int64_t v) {
  int log2 = 0;
  while ((int64_t{1} << log2) < v) ++log2;
  return log2;
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

inline int64_t checked_grid(int64_t blocks) {
  if (blocks > std::numeric_limits<int>::max()) {
    fail("gapkernels: input too large (", blocks, " blocks)");
  }
  return blocks;
}

inline NcsGeometry ncs_geometry(int64_t rows, int64_t S, int vec) {
  NcsGeometry g{};
  g.split = 1;
  g.chunk = S;
  if (rows < kNcsFillItems) {
    const int64_t pieces = std::min(ceil_div(kNcsFillItems, rows), ceil_div(S, kNcsMinChunk));
    if (pieces > 1) {
      g.chunk = ceil_div(ceil_div(S, pieces), kNcsChunkAlign) * kNcsChunkAlign;
      g.split = ceil_div(S, g.chunk);
    }
  }
  g.items = rows * g.split;
  g.group_log2 = std::min(ceil_log2(ceil_div(ceil_div(g.chunk, vec), kUnroll)), 5);
  g.blocks = checked_grid(ceil_div(g.items, kThreads >> g.group_log2));
  return g;
}

inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

inline NscGeometry nsc_geometry(int64_t N, int64_t C, int64_t S, int vec) {
  NscGeometry g{};
  const int64_t channel_vectors = ceil_div(C, vec);
  g.bx_log2 = std::min(ceil_log2(channel_vectors), 5);
  const int64_t bx = int64_t{1} << g.bx_log2;
  const int64_t by = kThreads / bx;
  g.channel_blocks = ceil_div(channel_vectors, bx);
  const int64_t base_blocks = g.channel_blocks * N;
  g.split = 1;
  g.s_chunk = S;
  if (base_blocks < kNscFillBlocks) {
    const int64_t pieces =
        std::min(ceil_div(kNscFillBlocks, base_blocks), ceil_div(S, by * kNscMinStepsPerThread));
    if (pieces > 1) {
      g.s_chunk = ceil_div(S, pieces);
      g.split = ceil_div(S, g.s_chunk);
    }
  }
  g.blocks = checked_grid(base_blocks * g.split);
  return g;
}

// shape.N: the output rows (pooling: the samples; tokens: B).
template <typename scalar_t, Stat kStat, typename Positions>
void launch_forward(ForwardArgs<scalar_t> args, const PoolShape& shape, const StableTensor& x,
                    const Positions& positions, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  constexpr int VEC = vec_size<scalar_t>();
  const int64_t rows = shape.N * shape.C;
  std::optional<StableTensor> partial_values;
  std::optional<StableTensor> partial_indices;
  auto make_partials = [&](int64_t split) {
    args.split = split;
    if (split > 1) {
      const int64_t values = rows * split * partials_per_piece(kStat);
      const int64_t pieces = rows * split;
      partial_values = empty_contiguous_on(
          x, 1, &values,
          std::is_same_v<acc_t, double> ? aoti_torch_dtype_float64() : aoti_torch_dtype_float32());
      partial_indices = empty_contiguous_on(x, 1, &pieces, aoti_torch_dtype_int64());
      args.partial_values = mutable_ptr<acc_t>(*partial_values);
      args.partial_indices = mutable_ptr<int64_t>(*partial_indices);
    }
  };
  if (shape.channels_last) {
    NscGeometry g = nsc_geometry(shape.N, shape.C, shape.S, VEC);
    g.vectorized = shape.C % VEC == 0 && aligned16(args.x);
    make_partials(g.split);
    STD_CUDA_CHECK((launch_nsc_forward<scalar_t, kStat, Positions>(args, g, positions, stream)));
  } else {
    const NcsGeometry g = ncs_geometry(rows, shape.S, VEC);
    make_partials(g.split);
    STD_CUDA_CHECK((launch_ncs_forward<scalar_t, kStat, Positions>(args, g, positions, stream)));
  }
  if (args.split > 1) {
    const int group_log2 = std::min(ceil_log2(args.split), 5);
    const int64_t blocks = checked_grid(ceil_div(rows, kThreads >> group_log2));
    STD_CUDA_CHECK((launch_combine_pieces<scalar_t, kStat, Positions>(args, rows, group_log2,
                                                                      blocks, positions, stream)));
  }
}

// shape.N: the samples of x (a varlen batch: 1).
template <typename scalar_t, Grad kGrad, typename Positions>
void launch_backward(BackwardArgs<scalar_t> args, const PoolShape& shape,
                     const Positions& positions, cudaStream_t stream) {
  constexpr int VEC = vec_size<scalar_t>();
  if (shape.channels_last) {
    NscGeometry g = nsc_geometry(shape.N, shape.C, shape.S, VEC);
    g.vectorized = shape.C % VEC == 0 && aligned16(args.grad_x);
    args.x_vectorized = g.vectorized && aligned16(args.x);
    STD_CUDA_CHECK((launch_nsc_backward<scalar_t, kGrad, Positions>(args, g, positions, stream)));
  } else {
    const NcsGeometry g = ncs_geometry(shape.N * shape.C, shape.S, VEC);
    args.x_vectorized =
        ((reinterpret_cast<uintptr_t>(args.x) ^ reinterpret_cast<uintptr_t>(args.grad_x)) & 15u) ==
        0;
    STD_CUDA_CHECK((launch_ncs_backward<scalar_t, kGrad, Positions>(args, g, positions, stream)));
  }
}

template <typename acc_t>
void weight_arguments(const std::optional<StableTensor>& weight, Mode mode, const acc_t** data,
                      int64_t* stride) {
  *data = nullptr;
  *stride = 0;
  if (weight.has_value() && (mode == Mode::Mixed || mode == Mode::Gem)) {
    *data = const_ptr<acc_t>(*weight);
    *stride = weight->numel() == 1 ? 0 : 1;
  }
}

// Fills the arguments every forward launch shares (the caller sets N: the output rows) and runs
// mode's statistic over `positions` on the current stream.
template <typename Positions>
void run_forward(const StableTensor& x, const PoolShape& shape, Mode mode,
                 const std::optional<StableTensor>& weight, double scalar, double eps,
                 bool with_log, const StableTensor& out, const StableTensor& aux,
                 const StableTensor& indices, const Positions& positions, const char* op) {
  const cudaStream_t stream = current_stream(x.get_device_index());
  dispatch_float_types(x.scalar_type(), op, [&](auto tag) {
    using cuda_t = typename decltype(tag)::type;
    using acc_t = acc_type<cuda_t>;
    ForwardArgs<cuda_t> args{};
    args.x = const_ptr<cuda_t>(x);
    args.out = mutable_ptr<cuda_t>(out);
    args.aux = aux.numel() > 0 ? mutable_ptr<acc_t>(aux) : nullptr;
    args.indices = indices.numel() > 0 ? mutable_ptr<int64_t>(indices) : nullptr;
    weight_arguments<acc_t>(weight, mode, &args.weight, &args.weight_stride);
    args.scalar = static_cast<acc_t>(scalar);
    args.eps = static_cast<acc_t>(eps);
    args.N = shape.N;
    args.C = shape.C;
    args.S = shape.S;
    args.aux_columns = aux.size(2);
    args.cat = mode == Mode::Cat;
    args.split = 1;
    switch (mode) {
      case Mode::Avg:
        launch_forward<cuda_t, Stat::Sum>(args, shape, x, positions, stream);
        break;
      case Mode::Max:
        launch_forward<cuda_t, Stat::Max>(args, shape, x, positions, stream);
        break;
      case Mode::Mixed:
      case Mode::Cat:
        launch_forward<cuda_t, Stat::SumMax>(args, shape, x, positions, stream);
        break;
      case Mode::Gem:
        if (with_log) {
          launch_forward<cuda_t, Stat::PowLog>(args, shape, x, positions, stream);
        } else {
          launch_forward<cuda_t, Stat::Pow>(args, shape, x, positions, stream);
        }
        break;
    }
  });
}

// Fills the arguments every backward launch shares (shape.N: the samples of x) and writes grad_x
// on the current stream.
template <typename Positions>
void run_backward(const StableTensor& grad_out, const StableTensor& x, const PoolShape& shape,
                  const StableTensor& aux, const StableTensor& indices, Mode mode,
                  const std::optional<StableTensor>& weight, double scalar, double eps,
                  const StableTensor& grad_x, const Positions& positions, const char* op) {
  const cudaStream_t stream = current_stream(x.get_device_index());
  dispatch_float_types(x.scalar_type(), op, [&](auto tag) {
    using cuda_t = typename decltype(tag)::type;
    using acc_t = acc_type<cuda_t>;
    BackwardArgs<cuda_t> args{};
    args.grad_out = const_ptr<cuda_t>(grad_out);
    args.x = const_ptr<cuda_t>(x);
    args.aux = mode == Mode::Gem ? const_ptr<acc_t>(aux) : nullptr;
    args.indices = mode_has_max(mode) ? const_ptr<int64_t>(indices) : nullptr;
    weight_arguments<acc_t>(weight, mode, &args.weight, &args.weight_stride);
    args.scalar = static_cast<acc_t>(scalar);
    args.eps = static_cast<acc_t>(eps);
    args.grad_x = mutable_ptr<cuda_t>(grad_x);
    args.N = shape.N;
    args.C = shape.C;
    args.S = shape.S;
    args.aux_columns = mode == Mode::Gem ? aux.size(2) : 0;
    args.mode = static_cast<int>(mode);
    switch (mode) {
      case Mode::Avg:
        launch_backward<cuda_t, Grad::Uniform>(args, shape, positions, stream);
        break;
      case Mode::Max:
      case Mode::Mixed:
      case Mode::Cat:
        launch_backward<cuda_t, Grad::UniformPlusArgmax>(args, shape, positions, stream);
        break;
      case Mode::Gem:
        launch_backward<cuda_t, Grad::Gem>(args, shape, positions, stream);
        break;
    }
  });
}

}  // namespace gapkernels
