// The schema of every gapkernels op, defined once, and the checks shared by all devices.
#include <Python.h>
#include <torch/library.h>

#include "pool_common.h"

extern "C" {
// `import gapkernels._C` loads this library, which registers the ops below; the module is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace gapkernels {

namespace {

at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

PoolShape check_forward_inputs(const at::Tensor& x, int64_t mode,
                               const std::optional<at::Tensor>& weight, const char* op) {
  TORCH_CHECK(mode >= 0 && mode <= static_cast<int64_t>(Mode::Gem), op,
              ": mode must be 0 (avg), 1 (max), 2 (mixed), 3 (cat) or 4 (gem), got ", mode);
  TORCH_CHECK(x.dim() == 3, op, ": x must be the 3-D (N, C, S) view, got ", x.dim(), " dims");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op,
              ": x must be float16, bfloat16, float32 or float64, got ", dt);
  PoolShape s{x.size(0), x.size(1), x.size(2), false};
  TORCH_CHECK(s.S > 0, op, ": the spatial size S must be > 0");
  if (!x.is_contiguous()) {
    const bool nsc =
        x.stride(1) == 1 && x.stride(2) == s.C && (s.N == 1 || x.stride(0) == s.S * s.C);
    TORCH_CHECK(nsc, op, ": x must have NCS (contiguous) or NSC (channels_last) strides, got ",
                x.strides());
    s.channels_last = true;
  }
  const Mode m = static_cast<Mode>(mode);
  if (weight.has_value() && (m == Mode::Mixed || m == Mode::Gem)) {
    const auto& w = *weight;
    TORCH_CHECK(w.dim() == 1 && (w.numel() == 1 || w.numel() == s.C), op,
                ": weight must be 1-D with 1 or C=", s.C, " elements, got shape ", w.sizes());
    TORCH_CHECK(w.scalar_type() == acc_dtype(dt), op, ": weight must be ", acc_dtype(dt),
                " for x of ", dt, ", got ", w.scalar_type());
    TORCH_CHECK(w.device() == x.device(), op, ": weight is on ", w.device(), ", x on ", x.device());
    TORCH_CHECK(w.is_contiguous(), op, ": weight must be contiguous");
  }
  return s;
}

PoolShape check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& x,
                                const at::Tensor& aux, const at::Tensor& indices, int64_t mode,
                                const std::optional<at::Tensor>& weight) {
  const char* op = "gapkernels::pool_backward";
  PoolShape s = check_forward_inputs(x, mode, weight, op);
  const Mode m = static_cast<Mode>(mode);
  const int64_t out_c = m == Mode::Cat ? 2 * s.C : s.C;
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == s.N && grad_out.size(1) == out_c, op,
              ": grad_out must be (", s.N, ", ", out_c, "), got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out must be ", x.scalar_type(),
              ", got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.is_contiguous(), op, ": grad_out must be contiguous");
  TORCH_CHECK(grad_out.device() == x.device() && aux.device() == x.device() &&
                  indices.device() == x.device(),
              op, ": every tensor must be on ", x.device());
  if (mode_has_max(m)) {
    TORCH_CHECK(indices.scalar_type() == at::kLong && indices.dim() == 2 &&
                    indices.size(0) == s.N && indices.size(1) == s.C && indices.is_contiguous(),
                op, ": indices must be contiguous int64 (N, C)");
  }
  if (m == Mode::Gem) {
    TORCH_CHECK(aux.dim() == 3 && aux.size(0) == s.N && aux.size(1) == s.C && aux.size(2) >= 2 &&
                    aux.scalar_type() == acc_dtype(x.scalar_type()) && aux.is_contiguous(),
                op, ": aux must be the contiguous (N, C, K>=2) tensor pool_forward returned");
  }
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_forward_outputs(const at::Tensor& x,
                                                                        const PoolShape& s,
                                                                        Mode mode, bool with_log) {
  const int64_t out_c = mode == Mode::Cat ? 2 * s.C : s.C;
  auto out = at::empty({s.N, out_c}, x.options());
  auto aux = at::empty({s.N, s.C, aux_columns(mode, with_log)},
                       x.options().dtype(acc_dtype(x.scalar_type())));
  auto indices = mode_has_max(mode) ? at::empty({s.N, s.C}, x.options().dtype(at::kLong))
                                    : at::empty({0}, x.options().dtype(at::kLong));
  return {out, aux, indices};
}

at::Tensor allocate_grad_input(const at::Tensor& x, const PoolShape& s) {
  if (s.channels_last) {
    return at::empty_strided({s.N, s.C, s.S}, {s.S * s.C, 1, s.C}, x.options());
  }
  return at::empty({s.N, s.C, s.S}, x.options());
}

}  // namespace gapkernels

TORCH_LIBRARY(gapkernels, m) {
  m.def(
      "pool_forward(Tensor x, int mode, Tensor? weight, float scalar, float eps, bool with_log) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "pool_backward(Tensor grad_out, Tensor x, Tensor aux, Tensor indices, int mode, "
      "Tensor? weight, float scalar, float eps) -> Tensor");
  // Token pooling (docs/DESIGN.md, "Token pooling"; fake kernels and autograd:
  // gapkernels/token_ops.py, the same schema as the Triton pair's).
  m.def(
      "token_pool_forward(Tensor x, Tensor spans, Tensor? mask, bool varlen, int mode, "
      "Tensor? weight, float scalar, float eps, bool with_log) -> (Tensor, Tensor, Tensor)");
  m.def(
      "token_pool_backward(Tensor grad_out, Tensor x, Tensor spans, Tensor? mask, bool varlen, "
      "Tensor aux, Tensor indices, int mode, Tensor? weight, float scalar, float eps) -> Tensor");
}
