// The checks shared by every device (declared in checks.h): one copy, on TensorInfo, compiled
// into each CPU kernel library (gapkernels/_cpu_*.abi3.so) and into the CUDA library
// (gapkernels/_cuda.abi3.so), both on the LibTorch stable ABI. No torch headers beyond the
// header-only enums.
#include "checks.h"

#include <stdexcept>

namespace gapkernels {

void throw_error(const std::string& message) {
  throw std::runtime_error(message);
}

std::string shape_str(const int64_t* values, int64_t n) {
  std::string s = "[";
  for (int64_t i = 0; i < n; ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(values[i]);
  }
  return s + "]";
}

std::string device_str(DeviceType type, int32_t index) {
  std::string name;
  switch (type) {
    case DeviceType::CPU:
      name = "cpu";
      break;
    case DeviceType::CUDA:
      name = "cuda";
      break;
    case DeviceType::Meta:
      name = "meta";
      break;
    case DeviceType::MPS:
      name = "mps";
      break;
    case DeviceType::XPU:
      name = "xpu";
      break;
    default:
      name = "device type " + std::to_string(static_cast<int>(type));
  }
  return index >= 0 ? name + ":" + std::to_string(index) : name;
}

PoolShape check_forward(const TensorInfo& x, int64_t mode, const TensorInfo* weight,
                        const char* op) {
  if (!(mode >= 0 && mode <= static_cast<int64_t>(Mode::Gem))) {
    fail(op, ": mode must be 0 (avg), 1 (max), 2 (mixed), 3 (cat) or 4 (gem), got ", mode);
  }
  if (x.dim != 3) fail(op, ": x must be the 3-D (N, C, S) view, got ", x.dim, " dims");
  const ScalarType dt = x.dtype;
  if (!(dt == ScalarType::Float || dt == ScalarType::Half || dt == ScalarType::BFloat16 ||
        dt == ScalarType::Double)) {
    fail(op, ": x must be float16, bfloat16, float32 or float64, got ", dt);
  }
  PoolShape s{x.size(0), x.size(1), x.size(2), false};
  if (s.S <= 0) fail(op, ": the spatial size S must be > 0");
  if (!x.contiguous) {
    const bool nsc =
        x.stride(1) == 1 && x.stride(2) == s.C && (s.N == 1 || x.stride(0) == s.S * s.C);
    if (!nsc) {
      fail(op, ": x must have NCS (contiguous) or NSC (channels_last) strides, got ",
           shape_str(x.strides, x.dim));
    }
    s.channels_last = true;
  }
  const Mode m = static_cast<Mode>(mode);
  if (weight != nullptr && (m == Mode::Mixed || m == Mode::Gem)) {
    const TensorInfo& w = *weight;
    if (!(w.dim == 1 && (w.size(0) == 1 || w.size(0) == s.C))) {
      fail(op, ": weight must be 1-D with 1 or C=", s.C, " elements, got shape ",
           shape_str(w.sizes, w.dim));
    }
    if (w.dtype != acc_dtype(dt)) {
      fail(op, ": weight must be ", acc_dtype(dt), " for x of ", dt, ", got ", w.dtype);
    }
    if (!w.same_device(x)) fail(op, ": weight is on ", device_str(w), ", x on ", device_str(x));
    if (!w.contiguous) fail(op, ": weight must be contiguous");
  }
  return s;
}

PoolShape check_backward(const TensorInfo& grad_out, const TensorInfo& x, const TensorInfo& aux,
                         const TensorInfo& indices, int64_t mode, const TensorInfo* weight) {
  const char* op = "gapkernels::pool_backward";
  PoolShape s = check_forward(x, mode, weight, op);
  const Mode m = static_cast<Mode>(mode);
  const int64_t out_c = m == Mode::Cat ? 2 * s.C : s.C;
  if (!(grad_out.dim == 2 && grad_out.size(0) == s.N && grad_out.size(1) == out_c)) {
    fail(op, ": grad_out must be (", s.N, ", ", out_c, "), got ",
         shape_str(grad_out.sizes, grad_out.dim));
  }
  if (grad_out.dtype != x.dtype) {
    fail(op, ": grad_out must be ", x.dtype, ", got ", grad_out.dtype);
  }
  if (!grad_out.contiguous) fail(op, ": grad_out must be contiguous");
  if (!(grad_out.same_device(x) && aux.same_device(x) && indices.same_device(x))) {
    fail(op, ": every tensor must be on ", device_str(x));
  }
  if (mode_has_max(m)) {
    if (!(indices.dtype == ScalarType::Long && indices.dim == 2 && indices.size(0) == s.N &&
          indices.size(1) == s.C && indices.contiguous)) {
      fail(op,
           ": indices must be contiguous int64 (N, C), as pool_forward returns them with "
           "with_index=True");
    }
  }
  if (m == Mode::Gem) {
    if (!(aux.dim == 3 && aux.size(0) == s.N && aux.size(1) == s.C && aux.size(2) >= 2 &&
          aux.dtype == acc_dtype(x.dtype) && aux.contiguous)) {
      fail(op, ": aux must be the contiguous (N, C, K>=2) tensor pool_forward returned");
    }
  }
  return s;
}

PoolShape check_token_form(const TensorInfo& x, PoolShape shape, const TensorInfo& spans,
                           const TensorInfo* mask, bool varlen, const char* op) {
  if (!(spans.dim == 2 && spans.size(1) == 4 && spans.dtype == ScalarType::Long)) {
    fail(op, ": spans must be int64 (B, 4), got ", spans.dtype, " ",
         shape_str(spans.sizes, spans.dim));
  }
  if (!(spans.contiguous && spans.same_device(x))) {
    fail(op, ": spans must be contiguous on ", device_str(x));
  }
  if (varlen) {
    if (!(shape.N == 1 && mask == nullptr)) {
      fail(op, ": varlen takes x as (1, C, total) and no mask");
    }
    if (!(shape.channels_last || shape.C == 1 || shape.S == 1)) {
      fail(op, ": varlen takes the packed (total, C) batch as (1, C, total) with NSC strides");
    }
    shape.channels_last = true;
  } else if (spans.size(0) != shape.N) {
    fail(op, ": spans must have N=", shape.N, " rows, got ", spans.size(0));
  }
  if (mask != nullptr) {
    const TensorInfo& m = *mask;
    if (!(m.dtype == ScalarType::Bool && m.dim == 2 && m.size(0) == shape.N &&
          m.size(1) == shape.S && m.contiguous && m.same_device(x))) {
      fail(op, ": mask must be a contiguous bool (", shape.N, ", ", shape.S, ") tensor on ",
           device_str(x), ", got ", m.dtype, " ", shape_str(m.sizes, m.dim), " on ", device_str(m));
    }
  }
  return shape;
}

void check_token_backward(const TensorInfo& grad_out, const TensorInfo& x, int64_t rows,
                          int64_t channels, const TensorInfo& aux, const TensorInfo& indices,
                          Mode mode, const char* op) {
  const int64_t out_c = mode == Mode::Cat ? 2 * channels : channels;
  if (!(grad_out.dim == 2 && grad_out.size(0) == rows && grad_out.size(1) == out_c &&
        grad_out.dtype == x.dtype && grad_out.contiguous && grad_out.same_device(x))) {
    fail(op, ": grad_out must be contiguous ", x.dtype, " (", rows, ", ", out_c, "), got ",
         shape_str(grad_out.sizes, grad_out.dim));
  }
  if (mode_has_max(mode) &&
      !(indices.dim == 2 && indices.size(0) == rows && indices.size(1) == channels &&
        indices.dtype == ScalarType::Long && indices.contiguous && indices.same_device(x))) {
    fail(op, ": indices must be the int64 (B, C) tensor token_pool_forward returned");
  }
  if (mode == Mode::Gem &&
      !(aux.dim == 3 && aux.size(0) == rows && aux.size(1) == channels && aux.size(2) >= 2 &&
        aux.dtype == acc_dtype(x.dtype) && aux.contiguous && aux.same_device(x))) {
    fail(op, ": aux must be the (B, C, K>=2) tensor token_pool_forward returned");
  }
}

ForwardSizes forward_sizes(const PoolShape& s, Mode mode, bool with_log, bool with_index) {
  ForwardSizes r{};
  r.out[0] = s.N;
  r.out[1] = mode == Mode::Cat ? 2 * s.C : s.C;
  r.aux[0] = s.N;
  r.aux[1] = s.C;
  r.aux[2] = aux_columns(mode, with_log);
  if (mode_has_max(mode) && with_index) {
    r.indices[0] = s.N;
    r.indices[1] = s.C;
    r.indices_dim = 2;
  } else {
    r.indices[0] = 0;
    r.indices_dim = 1;
  }
  return r;
}

void grad_input_strides(const PoolShape& s, int64_t strides[3]) {
  if (s.channels_last) {
    strides[0] = s.S * s.C;
    strides[1] = 1;
    strides[2] = s.C;
  } else {  // contiguous, as torch computes it (a size-0 dim counts as 1)
    strides[2] = 1;
    strides[1] = s.S;
    strides[0] = s.S * (s.C > 0 ? s.C : 1);
  }
}

}  // namespace gapkernels
