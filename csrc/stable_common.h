// The LibTorch stable ABI side of the shared host code (the CUDA library gapkernels/_cuda.*.so,
// built with TORCH_TARGET_VERSION; later the CPU libraries too): fills the TensorInfo the checks
// in checks.h read from a torch::stable::Tensor, and allocates through the C shim's
// aoti_torch_empty_strided (a direct call; torch::stable::empty looks aten::empty up in the
// dispatcher by name on every call). No ATen or c10 headers: the target macro forbids them.
#pragma once

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/shim_utils.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "checks.h"

namespace gapkernels {

using StableTensor = torch::stable::Tensor;

// The tensor's sizes and strides stay owned by the tensor (the shim hands out borrowed arrays).
inline TensorInfo tensor_info(const StableTensor& t) {
  const torch::stable::Device device = t.device();
  return TensorInfo{t.sizes().data(), t.strides().data(), t.dim(),          t.scalar_type(),
                    device.type(),    device.index(),     t.is_contiguous()};
}

inline PoolShape check_forward_inputs(const StableTensor& x, int64_t mode,
                                      const std::optional<StableTensor>& weight, const char* op) {
  if (weight.has_value()) {
    const TensorInfo w = tensor_info(*weight);
    return check_forward(tensor_info(x), mode, &w, op);
  }
  return check_forward(tensor_info(x), mode, nullptr, op);
}

inline PoolShape check_backward_inputs(const StableTensor& grad_out, const StableTensor& x,
                                       const StableTensor& aux, const StableTensor& indices,
                                       int64_t mode, const std::optional<StableTensor>& weight) {
  const TensorInfo w = weight.has_value() ? tensor_info(*weight) : TensorInfo{};
  return check_backward(tensor_info(grad_out), tensor_info(x), tensor_info(aux),
                        tensor_info(indices), mode, weight.has_value() ? &w : nullptr);
}

// The shim's dtype code of a tensor, and of the dtypes the results use.
inline int32_t shim_dtype(const StableTensor& t) {
  int32_t dtype = 0;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_dtype(t.get(), &dtype));
  return dtype;
}
inline int32_t shim_acc_dtype(ScalarType x_dtype) {
  return acc_dtype(x_dtype) == ScalarType::Double ? aoti_torch_dtype_float64()
                                                  : aoti_torch_dtype_float32();
}

// An uninitialized tensor of `dtype` (a shim dtype code) on `like`'s device.
inline StableTensor empty_on(const StableTensor& like, int64_t ndim, const int64_t* sizes,
                             const int64_t* strides, int32_t dtype) {
  int32_t device_type = 0;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_type(like.get(), &device_type));
  AtenTensorHandle handle = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(ndim, sizes, strides, dtype, device_type,
                                                  like.get_device_index(), &handle));
  return StableTensor(handle);
}

// Contiguous: strides as torch computes them (a size-0 dim counts as 1).
inline StableTensor empty_contiguous_on(const StableTensor& like, int64_t ndim,
                                        const int64_t* sizes, int32_t dtype) {
  int64_t strides[8];
  int64_t step = 1;
  for (int64_t d = ndim - 1; d >= 0; --d) {
    strides[d] = step;
    step *= sizes[d] > 0 ? sizes[d] : 1;
  }
  return empty_on(like, ndim, sizes, strides, dtype);
}

// (out, aux, indices), shaped as in docs/DESIGN.md.
inline std::tuple<StableTensor, StableTensor, StableTensor> allocate_forward_outputs(
    const StableTensor& x, const PoolShape& shape, Mode mode, bool with_log) {
  const ForwardSizes z = forward_sizes(shape, mode, with_log);
  return {empty_contiguous_on(x, 2, z.out, shim_dtype(x)),
          empty_contiguous_on(x, 3, z.aux, shim_acc_dtype(x.scalar_type())),
          empty_contiguous_on(x, z.indices_dim, z.indices, aoti_torch_dtype_int64())};
}

// grad_x: same shape, dtype and strides (NCS or NSC) as x.
inline StableTensor allocate_grad_input(const StableTensor& x, const PoolShape& shape) {
  const int64_t sizes[3] = {shape.N, shape.C, shape.S};
  int64_t strides[3];
  grad_input_strides(shape, strides);
  return empty_on(x, 3, sizes, strides, shim_dtype(x));
}

}  // namespace gapkernels
