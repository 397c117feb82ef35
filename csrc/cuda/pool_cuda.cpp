// The CUDA host side of gapkernels::pool_forward / pool_backward: checks, allocation and the
// launch (cuda/host.h: geometry, dtype and mode dispatch, stream) and the registration. Built on
// the LibTorch stable ABI (torch::stable::Tensor, STABLE_TORCH_LIBRARY_IMPL; compiled with
// TORCH_TARGET_VERSION = 2.11 and USE_CUDA) into its own library, gapkernels/_cuda.*.so, which
// needs only libtorch_cuda, libtorch_cpu and libc10 of torch's libraries. With token_cuda.cpp,
// the only CUDA units that include torch headers; the kernels are in the .cu units behind
// cuda/launch.h. The contract is docs/DESIGN.md.
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "cuda/host.h"
#include "cuda/launch.h"
#include "stable_common.h"

namespace gapkernels {
namespace {

std::tuple<StableTensor, StableTensor, StableTensor> pool_forward_cuda(
    const StableTensor& x, int64_t mode_value, const std::optional<StableTensor>& weight,
    double scalar, double eps, bool with_log, bool with_index) {
  const char* op = "gapkernels::pool_forward";
  const PoolShape shape = check_forward_inputs(x, mode_value, weight, op);
  if (!x.is_cuda()) fail(op, ": x must be a CUDA tensor");
  const torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const Mode mode = static_cast<Mode>(mode_value);
  // The CUDA kernels find the max's index in any case (not yet tuned without it): without
  // with_index it goes to a scratch tensor, and the (0,) one is returned.
  auto [out, aux, indices] = allocate_forward_outputs(x, shape, mode, with_log);
  if (shape.N == 0 || shape.C == 0) return {out, aux, with_index ? indices : empty_indices(x)};
  run_forward(x, shape, mode, weight, scalar, eps, with_log, out, aux, indices, AllPositions{}, op);
  return {out, aux, with_index ? indices : empty_indices(x)};
}

StableTensor pool_backward_cuda(const StableTensor& grad_out, const StableTensor& x,
                                const StableTensor& aux, const StableTensor& indices,
                                int64_t mode_value, const std::optional<StableTensor>& weight,
                                double scalar, double eps) {
  const char* op = "gapkernels::pool_backward";
  const PoolShape shape = check_backward_inputs(grad_out, x, aux, indices, mode_value, weight);
  if (!x.is_cuda()) fail(op, ": x must be a CUDA tensor");
  const torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const Mode mode = static_cast<Mode>(mode_value);
  StableTensor grad_x = allocate_grad_input(x, shape);
  if (shape.N == 0 || shape.C == 0) return grad_x;
  run_backward(grad_out, x, shape, aux, indices, mode, weight, scalar, eps, grad_x, AllPositions{},
               op);
  return grad_x;
}

}  // namespace
}  // namespace gapkernels

// The schemas come from gapkernels._ops (csrc/schemas.cpp), which gapkernels/_ext.py loads first.
STABLE_TORCH_LIBRARY_IMPL(gapkernels, CUDA, m) {
  m.impl("pool_forward", TORCH_BOX(&gapkernels::pool_forward_cuda));
  m.impl("pool_backward", TORCH_BOX(&gapkernels::pool_backward_cuda));
}
