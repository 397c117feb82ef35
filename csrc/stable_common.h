// The LibTorch stable ABI side of the shared host code (the kernel libraries, built with
// TORCH_TARGET_VERSION: CUDA gapkernels/_cuda.abi3.so, CPU gapkernels/_cpu_<variant>.abi3.so):
// fills the TensorInfo the checks in checks.h read from a torch::stable::Tensor, and allocates
// through the C shim's aoti_torch_empty_strided (a direct call; torch::stable::empty looks
// aten::empty up in the dispatcher by name on every call). No ATen or c10 headers: the target macro
// forbids them.
#pragma once

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/tensor.h>

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

// A tensor's data as T (the checks have made sure of its dtype).
template <typename T>
const T* const_ptr(const StableTensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mutable_ptr(const StableTensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

// A C++ type as a value, for the dtype switch below.
template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<scalar_t>{}) for `dtype`, one of the four check_forward accepts, with scalar_t
// the element type as the library's kernels name it: float, double, and Half and BFloat16 (CPU:
// c10::Half and c10::BFloat16; CUDA: __half and __nv_bfloat16). `device` names the library in
// the error a fifth dtype would meet.
template <typename Half, typename BFloat16, typename F>
void dispatch_dtype(ScalarType dtype, const char* op, const char* device, F&& f) {
  switch (dtype) {
    case ScalarType::Float:
      return f(TypeTag<float>{});
    case ScalarType::Double:
      return f(TypeTag<double>{});
    case ScalarType::Half:
      return f(TypeTag<Half>{});
    case ScalarType::BFloat16:
      return f(TypeTag<BFloat16>{});
    default:
      fail(op, ": no ", device, " kernel for ", dtype);
  }
}

// A shim call's error code, raised through checks.h's fail(). Not TORCH_ERROR_CODE_CHECK: it
// streams the line number into a std::stringstream, the failure class tests/test_checks_source.py
// keeps out of our code (torch's stable headers still use it inside their own calls).
inline void shim_check(AOTITorchError code, const char* call) {
  if (code != AOTI_TORCH_SUCCESS) fail("gapkernels: the torch shim call ", call, " failed");
}

// The shim's dtype code of a tensor, and of the dtypes the results use.
inline int32_t shim_dtype(const StableTensor& t) {
  int32_t dtype = 0;
  shim_check(aoti_torch_get_dtype(t.get(), &dtype), "aoti_torch_get_dtype");
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
  shim_check(aoti_torch_get_device_type(like.get(), &device_type), "aoti_torch_get_device_type");
  AtenTensorHandle handle = nullptr;
  shim_check(aoti_torch_empty_strided(ndim, sizes, strides, dtype, device_type,
                                      like.get_device_index(), &handle),
             "aoti_torch_empty_strided");
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
    const StableTensor& x, const PoolShape& shape, Mode mode, bool with_log,
    bool with_index = true) {
  const ForwardSizes z = forward_sizes(shape, mode, with_log, with_index);
  return {empty_contiguous_on(x, 2, z.out, shim_dtype(x)),
          empty_contiguous_on(x, 3, z.aux, shim_acc_dtype(x.scalar_type())),
          empty_contiguous_on(x, z.indices_dim, z.indices, aoti_torch_dtype_int64())};
}

// pool_forward's indices without with_index: (0,) int64 on x's device.
inline StableTensor empty_indices(const StableTensor& x) {
  const int64_t size[1] = {0};
  return empty_contiguous_on(x, 1, size, aoti_torch_dtype_int64());
}

// grad_x: same shape, dtype and strides (NCS or NSC) as x.
inline StableTensor allocate_grad_input(const StableTensor& x, const PoolShape& shape) {
  const int64_t sizes[3] = {shape.N, shape.C, shape.S};
  int64_t strides[3];
  grad_input_strides(shape, strides);
  return empty_on(x, 3, sizes, strides, shim_dtype(x));
}

}  // namespace gapkernels
