// The CUDA host side of gapkernels::pool_forward / pool_backward: checks, allocation, the launch
// geometry (from the shape alone), dtype and mode dispatch, streams and the registration. The only
// CUDA unit that includes torch headers; the kernels are in the .cu units behind cuda/launch.h.
// The contract is docs/DESIGN.md.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cuda/launch.h"
#include "pool_common.h"

namespace gapkernels {
namespace {

// NCS: rows fewer than this many (one warp each would leave the GPU idle) get split into chunks.
constexpr int64_t kNcsFillItems = 4096;
constexpr int64_t kNcsMinChunk = 2048;
constexpr int64_t kNcsChunkAlign = 64;
// NSC: fewer blocks than this get S split over blocks, each thread keeping at least
// kNscMinStepsPerThread steps over S.
constexpr int64_t kNscFillBlocks = 512;
constexpr int64_t kNscMinStepsPerThread = 16;

// torch's element types -> the CUDA ones the kernels are compiled for (same layout and bits).
template <typename scalar_t>
struct CudaScalar {
  using type = scalar_t;
};
template <>
struct CudaScalar<at::Half> {
  using type = __half;
};
template <>
struct CudaScalar<at::BFloat16> {
  using type = __nv_bfloat16;
};
static_assert(sizeof(at::Half) == sizeof(__half) && alignof(at::Half) == alignof(__half));
static_assert(sizeof(at::BFloat16) == sizeof(__nv_bfloat16) &&
              alignof(at::BFloat16) == alignof(__nv_bfloat16));

template <typename cuda_t, typename scalar_t>
cuda_t* cuda_pointer(scalar_t* p) {
  return reinterpret_cast<cuda_t*>(p);
}

int ceil_log2(int64_t v) {
  int log2 = 0;
  while ((int64_t{1} << log2) < v) ++log2;
  return log2;
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

int64_t checked_grid(int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "gapkernels: input too large (", blocks,
              " blocks)");
  return blocks;
}

NcsGeometry ncs_geometry(int64_t rows, int64_t S, int vec) {
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

bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

NscGeometry nsc_geometry(int64_t N, int64_t C, int64_t S, int vec) {
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

template <typename scalar_t, Stat kStat>
void launch_forward(ForwardArgs<scalar_t> args, const PoolShape& shape, const at::Tensor& x,
                    cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  constexpr int VEC = vec_size<scalar_t>();
  const int64_t rows = shape.N * shape.C;
  at::Tensor partial_values;
  at::Tensor partial_indices;
  auto make_partials = [&](int64_t split) {
    args.split = split;
    if (split > 1) {
      partial_values = at::empty({rows * split * partials_per_piece(kStat)},
                                 x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      partial_indices = at::empty({rows * split}, x.options().dtype(at::kLong));
      args.partial_values = partial_values.data_ptr<acc_t>();
      args.partial_indices = partial_indices.data_ptr<int64_t>();
    }
  };
  if (shape.channels_last) {
    NscGeometry g = nsc_geometry(shape.N, shape.C, shape.S, VEC);
    g.vectorized = shape.C % VEC == 0 && aligned16(args.x);
    make_partials(g.split);
    C10_CUDA_CHECK((launch_nsc_forward<scalar_t, kStat>(args, g, stream)));
  } else {
    const NcsGeometry g = ncs_geometry(rows, shape.S, VEC);
    make_partials(g.split);
    C10_CUDA_CHECK((launch_ncs_forward<scalar_t, kStat>(args, g, stream)));
  }
  if (args.split > 1) {
    const int group_log2 = std::min(ceil_log2(args.split), 5);
    const int64_t blocks = checked_grid(ceil_div(rows, kThreads >> group_log2));
    C10_CUDA_CHECK(
        (launch_combine_pieces<scalar_t, kStat>(args, rows, group_log2, blocks, stream)));
  }
}

template <typename scalar_t, Grad kGrad>
void launch_backward(BackwardArgs<scalar_t> args, const PoolShape& shape, cudaStream_t stream) {
  constexpr int VEC = vec_size<scalar_t>();
  if (shape.channels_last) {
    NscGeometry g = nsc_geometry(shape.N, shape.C, shape.S, VEC);
    g.vectorized = shape.C % VEC == 0 && aligned16(args.grad_x);
    args.x_vectorized = g.vectorized && aligned16(args.x);
    C10_CUDA_CHECK((launch_nsc_backward<scalar_t, kGrad>(args, g, stream)));
  } else {
    const NcsGeometry g = ncs_geometry(shape.N * shape.C, shape.S, VEC);
    args.x_vectorized =
        ((reinterpret_cast<uintptr_t>(args.x) ^ reinterpret_cast<uintptr_t>(args.grad_x)) & 15u) ==
        0;
    C10_CUDA_CHECK((launch_ncs_backward<scalar_t, kGrad>(args, g, stream)));
  }
}

template <typename acc_t>
void weight_arguments(const std::optional<at::Tensor>& weight, Mode mode, const acc_t** data,
                      int64_t* stride) {
  *data = nullptr;
  *stride = 0;
  if (weight.has_value() && (mode == Mode::Mixed || mode == Mode::Gem)) {
    *data = weight->data_ptr<acc_t>();
    *stride = weight->numel() == 1 ? 0 : 1;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_forward_cuda(
    const at::Tensor& x, int64_t mode_value, const std::optional<at::Tensor>& weight, double scalar,
    double eps, bool with_log) {
  const PoolShape shape = check_forward_inputs(x, mode_value, weight, "gapkernels::pool_forward");
  TORCH_CHECK(x.is_cuda(), "gapkernels::pool_forward: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const Mode mode = static_cast<Mode>(mode_value);
  auto [out, aux, indices] = allocate_forward_outputs(x, shape, mode, with_log);
  if (shape.N == 0 || shape.C == 0) return {out, aux, indices};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "pool_forward_cuda", [&] {
        using cuda_t = typename CudaScalar<scalar_t>::type;
        using acc_t = acc_type<cuda_t>;
        ForwardArgs<cuda_t> args{};
        args.x = cuda_pointer<const cuda_t>(x.const_data_ptr<scalar_t>());
        args.out = cuda_pointer<cuda_t>(out.mutable_data_ptr<scalar_t>());
        args.aux = aux.numel() > 0 ? aux.mutable_data_ptr<acc_t>() : nullptr;
        args.indices = indices.numel() > 0 ? indices.mutable_data_ptr<int64_t>() : nullptr;
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
            launch_forward<cuda_t, Stat::Sum>(args, shape, x, stream);
            break;
          case Mode::Max:
            launch_forward<cuda_t, Stat::Max>(args, shape, x, stream);
            break;
          case Mode::Mixed:
          case Mode::Cat:
            launch_forward<cuda_t, Stat::SumMax>(args, shape, x, stream);
            break;
          case Mode::Gem:
            if (with_log) {
              launch_forward<cuda_t, Stat::PowLog>(args, shape, x, stream);
            } else {
              launch_forward<cuda_t, Stat::Pow>(args, shape, x, stream);
            }
            break;
        }
      });
  return {out, aux, indices};
}

at::Tensor pool_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                              const at::Tensor& aux, const at::Tensor& indices, int64_t mode_value,
                              const std::optional<at::Tensor>& weight, double scalar, double eps) {
  const PoolShape shape = check_backward_inputs(grad_out, x, aux, indices, mode_value, weight);
  TORCH_CHECK(x.is_cuda(), "gapkernels::pool_backward: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const Mode mode = static_cast<Mode>(mode_value);
  at::Tensor grad_x = allocate_grad_input(x, shape);
  if (shape.N == 0 || shape.C == 0) return grad_x;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "pool_backward_cuda", [&] {
        using cuda_t = typename CudaScalar<scalar_t>::type;
        using acc_t = acc_type<cuda_t>;
        BackwardArgs<cuda_t> args{};
        args.grad_out = cuda_pointer<const cuda_t>(grad_out.const_data_ptr<scalar_t>());
        args.x = cuda_pointer<const cuda_t>(x.const_data_ptr<scalar_t>());
        args.aux = mode == Mode::Gem ? aux.const_data_ptr<acc_t>() : nullptr;
        args.indices = mode_has_max(mode) ? indices.const_data_ptr<int64_t>() : nullptr;
        weight_arguments<acc_t>(weight, mode, &args.weight, &args.weight_stride);
        args.scalar = static_cast<acc_t>(scalar);
        args.eps = static_cast<acc_t>(eps);
        args.grad_x = cuda_pointer<cuda_t>(grad_x.mutable_data_ptr<scalar_t>());
        args.N = shape.N;
        args.C = shape.C;
        args.S = shape.S;
        args.aux_columns = mode == Mode::Gem ? aux.size(2) : 0;
        args.mode = static_cast<int>(mode);
        switch (mode) {
          case Mode::Avg:
            launch_backward<cuda_t, Grad::Uniform>(args, shape, stream);
            break;
          case Mode::Max:
          case Mode::Mixed:
          case Mode::Cat:
            launch_backward<cuda_t, Grad::UniformPlusArgmax>(args, shape, stream);
            break;
          case Mode::Gem:
            launch_backward<cuda_t, Grad::Gem>(args, shape, stream);
            break;
        }
      });
  return grad_x;
}

}  // namespace
}  // namespace gapkernels

TORCH_LIBRARY_IMPL(gapkernels, CUDA, m) {
  m.impl("pool_forward", &gapkernels::pool_forward_cuda);
  m.impl("pool_backward", &gapkernels::pool_backward_cuda);
}
