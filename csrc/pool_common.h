// The ATen side of the shared host code (the CPU kernel libraries, ATen-based): fills the
// TensorInfo the checks in checks.h read from an at::Tensor, and allocates results with ATen.
// The CUDA library's counterpart, on the LibTorch stable ABI, is stable_common.h. The modes and
// the math are in pool_math.h; the contract is in docs/DESIGN.md.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "pool_math.h"

namespace gapkernels {

inline TensorInfo tensor_info(const at::Tensor& t) {
  return TensorInfo{t.sizes().data(),  t.strides().data(), t.dim(),          t.scalar_type(),
                    t.device().type(), t.device().index(), t.is_contiguous()};
}

// Checks x (3-D, float dtype, NCS or NSC strides), mode and weight; returns the view's shape.
inline PoolShape check_forward_inputs(const at::Tensor& x, int64_t mode,
                                      const std::optional<at::Tensor>& weight, const char* op) {
  if (weight.has_value()) {
    const TensorInfo w = tensor_info(*weight);
    return check_forward(tensor_info(x), mode, &w, op);
  }
  return check_forward(tensor_info(x), mode, nullptr, op);
}

// Checks pool_backward's tensors against x and returns the view's shape.
inline PoolShape check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& x,
                                       const at::Tensor& aux, const at::Tensor& indices,
                                       int64_t mode, const std::optional<at::Tensor>& weight) {
  const TensorInfo w = weight.has_value() ? tensor_info(*weight) : TensorInfo{};
  return check_backward(tensor_info(grad_out), tensor_info(x), tensor_info(aux),
                        tensor_info(indices), mode, weight.has_value() ? &w : nullptr);
}

// (out, aux, indices), shaped as in docs/DESIGN.md.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_forward_outputs(
    const at::Tensor& x, const PoolShape& shape, Mode mode, bool with_log) {
  const ForwardSizes z = forward_sizes(shape, mode, with_log);
  return {at::empty(z.out, x.options()),
          at::empty(z.aux, x.options().dtype(acc_dtype(x.scalar_type()))),
          at::empty(at::IntArrayRef(z.indices, z.indices_dim), x.options().dtype(at::kLong))};
}

// grad_x: same shape, dtype and strides (NCS or NSC) as x.
inline at::Tensor allocate_grad_input(const at::Tensor& x, const PoolShape& shape) {
  if (shape.channels_last) {
    int64_t strides[3];
    grad_input_strides(shape, strides);
    return at::empty_strided({shape.N, shape.C, shape.S}, strides, x.options());
  }
  return at::empty({shape.N, shape.C, shape.S}, x.options());
}

}  // namespace gapkernels
