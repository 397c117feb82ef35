// The CUDA host side of gapkernels::token_pool_forward / token_pool_backward (schema in ops.cpp;
// docs/DESIGN.md "Token pooling"): the checks (checks.cpp, the CPU token kernels' messages),
// allocation, the launch of the pooling kernel templates with TokenPositions (cuda/host.h) and the
// registration, on the LibTorch stable ABI like pool_cuda.cpp. Nothing is read from the device
// on the host: the spans are clamped by the kernels (rows.cuh), and every element of grad_x is
// written by its row (padded: the sample; varlen: the row that owns the position), so no fill.
#include <cuda_runtime_api.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/macros.h>  // STD_CUDA_CHECK
#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "cuda/host.h"
#include "cuda/launch.h"
#include "stable_common.h"

namespace gapkernels {
namespace {

constexpr const char* kForwardOp = "gapkernels::token_pool_forward";
constexpr const char* kBackwardOp = "gapkernels::token_pool_backward";

// x's view checked as for pool_forward, then the spans and the mask: the view the kernels read
// (varlen: NSC). (Whether x is on a GPU is asked after every check, as pool_cuda.cpp does, so
// that all of them run, and give the CPU kernels' messages, on CPU tensors too.)
PoolShape check_token_inputs(const StableTensor& x, int64_t mode,
                             const std::optional<StableTensor>& weight, const StableTensor& spans,
                             const std::optional<StableTensor>& mask, bool varlen, const char* op) {
  const PoolShape shape = check_forward_inputs(x, mode, weight, op);
  const TensorInfo mask_info = mask.has_value() ? tensor_info(*mask) : TensorInfo{};
  return check_token_form(tensor_info(x), shape, tensor_info(spans),
                          mask.has_value() ? &mask_info : nullptr, varlen, op);
}

TokenPositions token_positions(const StableTensor& spans, const std::optional<StableTensor>& mask,
                               bool varlen) {
  TokenPositions p{};
  p.spans = static_cast<const int64_t*>(spans.const_data_ptr());
  p.mask = mask.has_value() ? static_cast<const bool*>(mask->const_data_ptr()) : nullptr;
  p.rows = spans.size(0);
  p.varlen = varlen;
  return p;
}

std::tuple<StableTensor, StableTensor, StableTensor> token_pool_forward_cuda(
    const StableTensor& x, const StableTensor& spans, const std::optional<StableTensor>& mask,
    bool varlen, int64_t mode_value, const std::optional<StableTensor>& weight, double scalar,
    double eps, bool with_log) {
  PoolShape rows = check_token_inputs(x, mode_value, weight, spans, mask, varlen, kForwardOp);
  if (!x.is_cuda()) fail(kForwardOp, ": x must be a CUDA tensor");
  const torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const Mode mode = static_cast<Mode>(mode_value);
  const TokenPositions positions = token_positions(spans, mask, varlen);
  rows.N = positions.rows;  // the forward's launch is over the output rows
  auto [out, aux, indices] = allocate_forward_outputs(x, rows, mode, with_log);
  if (rows.N == 0 || rows.C == 0) return {out, aux, indices};
  run_forward(x, rows, mode, weight, scalar, eps, with_log, out, aux, indices, positions,
              kForwardOp);
  return {out, aux, indices};
}

StableTensor token_pool_backward_cuda(const StableTensor& grad_out, const StableTensor& x,
                                      const StableTensor& spans,
                                      const std::optional<StableTensor>& mask, bool varlen,
                                      const StableTensor& aux, const StableTensor& indices,
                                      int64_t mode_value, const std::optional<StableTensor>& weight,
                                      double scalar, double eps) {
  const PoolShape shape =
      check_token_inputs(x, mode_value, weight, spans, mask, varlen, kBackwardOp);
  const Mode mode = static_cast<Mode>(mode_value);
  check_token_backward(tensor_info(grad_out), tensor_info(x), spans.size(0), shape.C,
                       tensor_info(aux), tensor_info(indices), mode, kBackwardOp);
  if (!x.is_cuda()) fail(kBackwardOp, ": x must be a CUDA tensor");
  const torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const TokenPositions positions = token_positions(spans, mask, varlen);
  StableTensor grad_x = allocate_grad_input(x, shape);
  if (grad_x.numel() == 0) return grad_x;
  if (positions.rows == 0) {  // a varlen batch of no sequence: nothing takes part
    STD_CUDA_CHECK(cudaMemsetAsync(grad_x.mutable_data_ptr(), 0,
                                   static_cast<size_t>(grad_x.numel()) * grad_x.element_size(),
                                   current_stream(x.get_device_index())));
    return grad_x;
  }
  // The launch is over the samples of x (padded: one per row; varlen: the one packed batch).
  run_backward(grad_out, x, shape, aux, indices, mode, weight, scalar, eps, grad_x, positions,
               kBackwardOp);
  return grad_x;
}

}  // namespace
}  // namespace gapkernels

// The schemas come from gapkernels._ops (csrc/schemas.cpp), which gapkernels/_ext.py loads first.
STABLE_TORCH_LIBRARY_IMPL(gapkernels, CUDA, m) {
  m.impl("token_pool_forward", TORCH_BOX(&gapkernels::token_pool_forward_cuda));
  m.impl("token_pool_backward", TORCH_BOX(&gapkernels::token_pool_backward_cuda));
}
