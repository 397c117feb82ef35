// The checks made before any kernel runs, one copy for every device: they read a plain TensorInfo
// (stable_common.h fills it from a torch::stable::Tensor, for the CPU and CUDA libraries) and throw
// std::runtime_error, which Python sees as RuntimeError. Only torch's header-only dtype and device
// enums are used, so this compiles with and without TORCH_TARGET_VERSION. The contract is in
// docs/DESIGN.md.
#pragma once

#include <torch/headeronly/core/DeviceType.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "pool_math.h"

namespace gapkernels {

using torch::headeronly::DeviceType;
using torch::headeronly::ScalarType;

// What the checks read of a tensor. The arrays belong to the tensor; the info must not outlive it.
struct TensorInfo {
  const int64_t* sizes;
  const int64_t* strides;
  int64_t dim;
  ScalarType dtype;
  DeviceType device_type;
  int32_t device_index;  // -1: none (a CPU tensor)
  bool contiguous;       // the tensor's is_contiguous()

  int64_t size(int64_t d) const { return sizes[d]; }
  int64_t stride(int64_t d) const { return strides[d]; }
  bool same_device(const TensorInfo& o) const {
    return device_type == o.device_type && device_index == o.device_index;
  }
};

// A validated 3-D view (N, C, S) of the input.
struct PoolShape {
  int64_t N;
  int64_t C;
  int64_t S;
  bool channels_last;  // NSC: strides (S*C, 1, C). False: NCS, contiguous.
};

// The accumulation dtype of the aux and weight tensors: double for double, else float.
inline ScalarType acc_dtype(ScalarType t) {
  return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

// "[3, 5]", as torch prints sizes and strides.
std::string shape_str(const int64_t* values, int64_t n);
// "cpu", "cuda:0", as torch prints a device.
std::string device_str(DeviceType type, int32_t index);
inline std::string device_str(const TensorInfo& t) {
  return device_str(t.device_type, t.device_index);
}

// Throws std::runtime_error with the message (checks.cpp; Python sees a RuntimeError).
[[noreturn]] void throw_error(const std::string& message);

// The parts of a message, appended as text, with no stream: on the first GPU machine an integer
// inserted into a std::ostream crashed the process where the check should have raised
// (tests/test_checks_source.py). An integer as std::to_string writes it, a dtype by its name
// ("Float", as torch prints it); any other type (a char, a float, a device) does not compile.
namespace message_parts {
inline void append(std::string& message, const char* part) {
  message += part;
}
inline void append(std::string& message, const std::string& part) {
  message += part;
}
inline void append(std::string& message, ScalarType part) {
  message += torch::headeronly::toString(part);
}
template <typename T>
constexpr bool kInteger =
    std::is_integral_v<T> && !std::is_same_v<T, bool> && !std::is_same_v<T, char> &&
    !std::is_same_v<T, signed char> && !std::is_same_v<T, unsigned char>;
template <typename T, std::enable_if_t<kInteger<T>, int> = 0>
void append(std::string& message, T part) {
  message += std::to_string(part);
}
}  // namespace message_parts

// Throws std::runtime_error with the parts appended together (only called on failure).
template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::string message;
  (message_parts::append(message, parts), ...);
  throw_error(message);
}

// Checks x (3-D, float dtype, NCS or NSC strides), mode and weight (nullptr: none); returns the
// view's shape. `op` starts every message.
PoolShape check_forward(const TensorInfo& x, int64_t mode, const TensorInfo* weight,
                        const char* op);

// Checks pool_backward's tensors against x and returns the view's shape.
PoolShape check_backward(const TensorInfo& grad_out, const TensorInfo& x, const TensorInfo& aux,
                         const TensorInfo& indices, int64_t mode, const TensorInfo* weight);

// Token pooling's normalized form (docs/DESIGN.md "Token pooling") against x's view `shape`
// (from check_forward): spans int64 (B, 4), contiguous, on x's device, B = N unless varlen; the
// optional mask (nullptr: none) bool (N, S), contiguous, on x's device; varlen: x is the packed
// batch as (1, C, total) with NSC strides and no mask. Returns the shape the kernels read (varlen:
// NSC). The CPU (csrc/cpu/token_cpu.cpp) and CUDA token kernels both check with it.
PoolShape check_token_form(const TensorInfo& x, PoolShape shape, const TensorInfo& spans,
                           const TensorInfo* mask, bool varlen, const char* op);

// token_pool_backward's grad_out (B, C or 2C), indices (B, C) and aux (B, C, K >= 2) as
// token_pool_forward returned them, for x of C channels.
void check_token_backward(const TensorInfo& grad_out, const TensorInfo& x, int64_t rows,
                          int64_t channels, const TensorInfo& aux, const TensorInfo& indices,
                          Mode mode, const char* op);

// The sizes of pool_forward's results (docs/DESIGN.md): out (N, C or 2C), aux (N, C, K) of
// acc_dtype, indices (N, C) int64 for the modes with a max when with_index, else (0,).
struct ForwardSizes {
  int64_t out[2];
  int64_t aux[3];
  int64_t indices[2];
  int64_t indices_dim;
};
ForwardSizes forward_sizes(const PoolShape& s, Mode mode, bool with_log, bool with_index = true);

// grad_x's strides: x's layout (NCS contiguous, or NSC).
void grad_input_strides(const PoolShape& s, int64_t strides[3]);

}  // namespace gapkernels
