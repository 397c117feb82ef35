// The accelerator, gapkernels._C (optional): the ops' autograd at the Autograd dispatch key, in
// C++ so that a call costs no Python, and the public functions' eager entry `_C.pool`. It uses
// torch's unstable C++ API, so gapkernels/_ext.py loads it only under the torch it was built
// against (gapkernels/_build_info.json); elsewhere the ops' autograd is registered from Python
// (gapkernels/ops.py, the same formulas) and the public functions call the ops themselves. The
// schemas are in csrc/schemas.cpp (gapkernels/_ops, stable ABI), the kernels in their own
// libraries (gapkernels/_cpu_*.so, _cuda.abi3.so; see setup.py).
#include <ATen/ATen.h>
#include <Python.h>
#include <torch/autograd.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <string>

#include "pool_math.h"

namespace {

// Set once at import by gapkernels.autograd: cpp_op_grads, the backward's Python route (every
// backward that is itself differentiated), and pool_tangent, the forward-mode formulas; one copy
// of those formulas, in plain torch.
PyObject* python_grads = nullptr;
PyObject* python_tangent = nullptr;

PyObject* set_python_callbacks(PyObject* /*module*/, PyObject* args) {
  PyObject* grads = nullptr;
  PyObject* tangent = nullptr;
  if (!PyArg_ParseTuple(args, "OO", &grads, &tangent)) {
    return nullptr;
  }
  if (!PyCallable_Check(grads) || !PyCallable_Check(tangent)) {
    PyErr_SetString(PyExc_TypeError, "_set_python_callbacks expects two callables");
    return nullptr;
  }
  Py_INCREF(grads);
  Py_XSETREF(python_grads, grads);
  Py_INCREF(tangent);
  Py_XSETREF(python_tangent, tangent);
  Py_RETURN_NONE;
}

}  // namespace

namespace gapkernels {
PyObject* pool_entry(PyObject* module, PyObject* const* args, Py_ssize_t nargs);
}  // namespace gapkernels

namespace {

PyMethodDef module_methods[] = {
    {"pool", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(gapkernels::pool_entry)),
     METH_FASTCALL, "The public functions' eager entry: see csrc/ops.cpp."},
    {"_set_python_callbacks", set_python_callbacks, METH_VARARGS,
     "Sets the Python functions the ops' C++ autograd calls for a differentiated backward and "
     "for forward mode."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
// `import gapkernels._C` loads this library, which registers the ops below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, module_methods};
  return PyModule_Create(&module_def);
}
}

namespace gapkernels {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

ForwardResult call_forward(const at::Tensor& x, int64_t mode,
                           const std::optional<at::Tensor>& weight, double scalar, double eps,
                           bool with_log, bool with_index) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("gapkernels::pool_forward", "")
          .typed<ForwardResult(const at::Tensor&, int64_t, const std::optional<at::Tensor>&, double,
                               double, bool, bool)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, mode, weight, scalar, eps, with_log, with_index);
}

at::Tensor call_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& aux,
                         const at::Tensor& indices, int64_t mode,
                         const std::optional<at::Tensor>& weight, double scalar, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("gapkernels::pool_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, int64_t,
                                               const std::optional<at::Tensor>&, double, double)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(grad_out, x, aux, indices, mode, weight, scalar, eps);
}

// Raises RuntimeError with the message as one C string, which TORCH_CHECK passes on as it is: any
// other message c10::str formats with an ostringstream, and on the first GPU machine an integer
// streamed into one crashed the process (tests/test_checks_source.py).
[[noreturn]] void raise_error(const std::string& message) {
  TORCH_CHECK(false, message.c_str());
}

bool requires_grad(const at::Tensor& x, const std::optional<at::Tensor>& weight) {
  return at::GradMode::is_enabled() &&
         (x.requires_grad() || (weight.has_value() && weight->requires_grad()));
}

// (grad_x3, grad_weight) from Python (gapkernels.autograd.cpp_op_grads): differentiable.
std::pair<at::Tensor, at::Tensor> grads_from_python(const at::Tensor& grad_out,
                                                    const at::Tensor& x3, const at::Tensor& aux,
                                                    const at::Tensor& indices,
                                                    const at::Tensor& weight, int64_t mode,
                                                    double scalar, double eps, bool need_x,
                                                    bool need_w) {
  TORCH_CHECK(python_grads != nullptr,
              "gapkernels: the ops' backward needs gapkernels.autograd to be imported");
  pybind11::gil_scoped_acquire gil;
  pybind11::object result = pybind11::reinterpret_borrow<pybind11::object>(python_grads)(
      grad_out, x3, aux, indices, mode,
      weight.defined() ? pybind11::cast(weight) : pybind11::none(), scalar, eps, need_x, need_w);
  auto pair = result.cast<std::pair<std::optional<at::Tensor>, std::optional<at::Tensor>>>();
  return {pair.first.value_or(at::Tensor()), pair.second.value_or(at::Tensor())};
}

// The gradient to alpha (Mixed) or p (Gem), first order, from the statistics the forward saved in
// aux: the same formula as gapkernels.ops.weight_grad (the Triton ops' route), which the tests
// compare with the reference through both. (N, C) per-sample terms, summed over N, then to the
// weight's 1 or C elements.
at::Tensor weight_grad(int64_t mode, const at::Tensor& grad_out, const at::Tensor& aux,
                       const at::Tensor& weight) {
  const at::Tensor g = grad_out.to(aux.scalar_type());
  // sym_*: the backward also runs on symbolic shapes (AOTAutograd tracing with dynamic shapes).
  const bool one_weight = weight.sym_numel() == 1;
  at::Tensor per_sample;
  if (mode == static_cast<int64_t>(Mode::Mixed)) {
    per_sample = g * aux.select(-1, 0);  // aux = max - avg
  } else {
    TORCH_CHECK(aux.sym_size(-1) >= 3,
                "gapkernels: the gradient to GeM's p needs the forward to run with with_log=True");
    // aux = (M, r, l): the row maximum of y = clamp(x, eps), r = mean((y/M)**p) and
    // l = mean((y/M)**p * log(y/M)); out = M * r**(1/p) (M where M is inf), and
    // d out / d p = out * (l / (r p) - log(r) / p**2).
    const at::Tensor p = one_weight ? weight : weight.view({1, -1});
    const at::Tensor big_m = aux.select(-1, 0);
    const at::Tensor r = aux.select(-1, 1);
    const at::Tensor lg = aux.select(-1, 2);
    const at::Tensor out = at::where(big_m.isinf(), big_m, big_m * r.pow(p.reciprocal()));
    per_sample = g * out * (lg / (r * p) - r.log() / (p * p));
  }
  const at::Tensor grad = per_sample.sum(0);
  return one_weight ? grad.sum().reshape({1}) : grad;
}

bool has_tangent(const at::Tensor& t) {
  return t.defined() && t._fw_grad(/*level=*/0).defined();
}

at::Tensor primal(const at::Tensor& t) {
  return has_tangent(t) ? t._fw_primal(0) : t;
}

// How the autograd Function's input relates to the op's (N, C, S) input.
enum class Layout : int64_t {
  Op = 0,    // it is the op's input
  Nchw = 1,  // (N, C, *spatial): as_3d(x)
  Nhwc = 2,  // (N, *spatial, C): as_3d(x.movedim(-1, 1))
};

// The (N, C, S) view with NCS or NSC strides (a copy only for other strides), as
// gapkernels.functional._as_3d makes it.
at::Tensor as_3d(const at::Tensor& x, Layout layout) {
  if (layout == Layout::Op) {
    return x;
  }
  const at::Tensor x3 = (layout == Layout::Nhwc ? x.movedim(-1, 1) : x).flatten(2);
  if (x3.is_contiguous() || x3.transpose(1, 2).is_contiguous()) {
    return x3;
  }
  return x3.contiguous();
}

// grad_x3 (N, C, S) back to the shape of the Function's input x (sizes: x's), through the views
// that gapkernels.functional._as_3d takes, in reverse: a kernel's grad_x (NCS or NSC, like x3)
// then has x's strides, also in the dims of size 1.
at::Tensor from_3d(const at::Tensor& grad_x3, Layout layout, at::IntArrayRef sizes) {
  if (layout == Layout::Op || !grad_x3.defined()) {
    return grad_x3;
  }
  std::vector<int64_t> ncs(sizes.begin(), sizes.end());  // (N, C, *spatial)
  if (layout == Layout::Nhwc) {
    ncs.insert(ncs.begin() + 1, ncs.back());
    ncs.pop_back();
  }
  at::Tensor grad;
  if (grad_x3.is_contiguous()) {
    grad = grad_x3.view(ncs);
  } else if (grad_x3.transpose(1, 2).is_contiguous()) {
    std::vector<int64_t> nsc(ncs.begin(), ncs.end());  // (N, *spatial, C)
    nsc.push_back(nsc[1]);
    nsc.erase(nsc.begin() + 1);
    grad = grad_x3.transpose(1, 2).view(nsc).movedim(-1, 1);
  } else {
    grad = grad_x3.reshape(ncs);
  }
  return layout == Layout::Nhwc ? grad.movedim(1, -1) : grad;
}

// pool_forward's derivative. First order (grad mode off in backward), all in C++: the backend's
// fused backward kernel, and weight_grad above for alpha / p. A backward that is itself
// differentiated (create_graph=True) runs the Python formulas (gapkernels/autograd.py), which
// are differentiable to any order.
class PoolForwardFunction : public torch::autograd::Function<PoolForwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, int64_t layout,
                               int64_t mode, const std::optional<at::Tensor>& weight, double scalar,
                               double eps, bool with_log, bool with_index) {
    const auto x3 = as_3d(x, static_cast<Layout>(layout));
    auto [out, aux, indices] = call_forward(x3, mode, weight, scalar, eps, with_log, with_index);
    // x3 for the fused kernel; x for the Python route, which takes the view again where autograd
    // sees it (a differentiated backward then reaches x through it).
    ctx->save_for_backward({x3, aux, indices, weight.value_or(at::Tensor()), x});
    ctx->saved_data["layout"] = layout;
    ctx->saved_data["sizes"] = x.sizes();
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["scalar"] = scalar;
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({aux, indices});
    // No zero gradients made for aux and indices (non-differentiable, never read): two
    // allocations and fills per backward, a third of a small one.
    ctx->set_materialize_grads(false);
    return {out, aux, indices};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) {  // nothing reached out (materialize_grads is off)
      return variable_list(8);
    }
    const auto saved = ctx->get_saved_variables();
    const auto layout = static_cast<Layout>(ctx->saved_data["layout"].toInt());
    const int64_t mode = ctx->saved_data["mode"].toInt();
    const double scalar = ctx->saved_data["scalar"].toDouble();
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool has_weight = saved[3].defined();
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_w = has_weight && ctx->needs_input_grad(1) &&
                        (mode == static_cast<int64_t>(gapkernels::Mode::Mixed) ||
                         mode == static_cast<int64_t>(gapkernels::Mode::Gem));
    at::Tensor grad_x, grad_w;
    if (at::GradMode::is_enabled()) {
      std::tie(grad_x, grad_w) =
          grads_from_python(grads[0], as_3d(saved[4], layout), saved[1], saved[2], saved[3], mode,
                            scalar, eps, need_x, need_w);
    } else {
      if (need_x) {
        const std::optional<at::Tensor> weight =
            has_weight ? std::optional<at::Tensor>(saved[3]) : std::nullopt;
        grad_x = call_backward(grads[0].contiguous(), saved[0], saved[1], saved[2], mode, weight,
                               scalar, eps);
      }
      if (need_w) {
        grad_w = weight_grad(mode, grads[0], saved[1], saved[3]);
      }
    }
    grad_x = from_3d(grad_x, layout, ctx->saved_data["sizes"].toIntVector());
    return {grad_x,       at::Tensor(), at::Tensor(), grad_w,
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// with_index: whether the caller wants the max's indices; they are found in any case when the
// call is differentiated (the backward reads them, and a differentiated backward too).
ForwardResult forward_with_autograd(const at::Tensor& x, Layout layout, int64_t mode,
                                    const std::optional<at::Tensor>& weight, double scalar,
                                    double eps, bool with_log, bool with_index) {
  if (!requires_grad(x, weight)) {
    return call_forward(as_3d(x, layout), mode, weight, scalar, eps, with_log, with_index);
  }
  auto outs = PoolForwardFunction::apply(x, static_cast<int64_t>(layout), mode, weight, scalar, eps,
                                         with_log, /*with_index=*/true);
  return {outs[0], outs[1], outs[2]};
}

// Forward mode (torch.autograd.forward_ad, torch.func.jvp / jacfwd on the op itself): the tangent
// of out from gapkernels.autograd.pool_tangent (the same formulas as the public functions'
// forward mode), set on out as generated ATen ops set theirs. aux and indices have none.
void set_tangent(const at::Tensor& out, const at::Tensor& aux, const at::Tensor& indices,
                 const at::Tensor& x, int64_t mode, const std::optional<at::Tensor>& weight,
                 double scalar, double eps) {
  TORCH_CHECK(python_tangent != nullptr,
              "gapkernels::pool_forward: forward mode needs gapkernels.autograd to be imported");
  const at::Tensor w = weight.has_value() ? *weight : at::Tensor();
  const at::Tensor t_x = x._fw_grad(0);
  const bool weighted =
      mode == static_cast<int64_t>(Mode::Mixed) || mode == static_cast<int64_t>(Mode::Gem);
  const at::Tensor t_w = weighted && w.defined() ? w._fw_grad(0) : at::Tensor();
  at::Tensor tangent;
  {
    pybind11::gil_scoped_acquire gil;
    auto cast = [](const at::Tensor& t) {
      return t.defined() ? pybind11::cast(t) : pybind11::none();
    };
    pybind11::object result = pybind11::reinterpret_borrow<pybind11::object>(python_tangent)(
        primal(x), aux, indices, mode, cast(primal(w)), scalar, eps, cast(t_x), cast(t_w));
    if (!result.is_none()) {
      tangent = result.cast<at::Tensor>();
    }
  }
  if (tangent.defined()) {
    out._set_fw_grad(tangent, /*level=*/0, /*is_inplace_op=*/false);
  }
}

ForwardResult pool_forward_autograd(const at::Tensor& x, int64_t mode,
                                    const std::optional<at::Tensor>& weight, double scalar,
                                    double eps, bool with_log, bool with_index) {
  // Forward mode reads the indices too.
  const bool tangents = has_tangent(x) || (weight.has_value() && has_tangent(*weight));
  auto result = forward_with_autograd(x, Layout::Op, mode, weight, scalar, eps, with_log,
                                      with_index || tangents);
  if (tangents) {
    set_tangent(std::get<0>(result), std::get<1>(result), std::get<2>(result), x, mode, weight,
                scalar, eps);
  }
  return result;
}

// pool_backward has no derivative of its own: the forward's backward is what is differentiable.
class PoolBackwardFunction : public torch::autograd::Function<PoolBackwardFunction> {
 public:
  static at::Tensor forward(AutogradContext* /*ctx*/, const at::Tensor& grad_out,
                            const at::Tensor& x, const at::Tensor& aux, const at::Tensor& indices,
                            int64_t mode, const std::optional<at::Tensor>& weight, double scalar,
                            double eps) {
    return call_backward(grad_out, x, aux, indices, mode, weight, scalar, eps);
  }

  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grads*/) {
    TORCH_CHECK(false,
                "gapkernels::pool_backward: differentiating the backward op itself is not "
                "supported; differentiate through the forward (gapkernels' functions or "
                "pool_forward), whose backward is differentiable to any order");
  }
};

at::Tensor pool_backward_autograd(const at::Tensor& grad_out, const at::Tensor& x,
                                  const at::Tensor& aux, const at::Tensor& indices, int64_t mode,
                                  const std::optional<at::Tensor>& weight, double scalar,
                                  double eps) {
  TORCH_CHECK(!(has_tangent(grad_out) || has_tangent(x) || has_tangent(aux) ||
                (weight.has_value() && has_tangent(*weight))),
              "gapkernels::pool_backward: forward-mode AD of the backward op itself is not "
              "supported; differentiate through the forward (gapkernels' functions or "
              "pool_forward), whose backward is differentiable to any order");
  const bool any_grad = at::GradMode::is_enabled() &&
                        (grad_out.requires_grad() || x.requires_grad() || aux.requires_grad() ||
                         (weight.has_value() && weight->requires_grad()));
  if (!any_grad) {
    return call_backward(grad_out, x, aux, indices, mode, weight, scalar, eps);
  }
  return PoolBackwardFunction::apply(grad_out, x, aux, indices, mode, weight, scalar, eps);
}

}  // namespace

// _C.pool(x, nhwc, mode, weight, scalar, eps, with_log, with_index) -> (out, aux, indices):
// pool_forward of the (N, C, S) view of x (rank >= 3; channels at dim 1, or last with nhwc), the
// view taken here and recorded by no autograd node. The public functions' eager path, for a plain
// tensor x that they have checked and whose backend is the C++ one; it costs a fraction of a
// torch.ops call.
PyObject* pool_entry(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 8) raise_error("_C.pool takes 8 arguments, got " + std::to_string(nargs));
  TORCH_CHECK_TYPE(THPVariable_Check(args[0]), "_C.pool: x must be a tensor");
  TORCH_CHECK_TYPE(args[3] == Py_None || THPVariable_Check(args[3]),
                   "_C.pool: weight must be a tensor or None");
  const at::Tensor& x = THPVariable_Unpack(args[0]);
  const Layout layout = PyObject_IsTrue(args[1]) ? Layout::Nhwc : Layout::Nchw;
  const int64_t mode = PyLong_AsLongLong(args[2]);
  std::optional<at::Tensor> weight;
  if (args[3] != Py_None) {
    weight = THPVariable_Unpack(args[3]);
  }
  const double scalar = PyFloat_AsDouble(args[4]);
  const double eps = PyFloat_AsDouble(args[5]);
  const bool with_log = PyObject_IsTrue(args[6]);
  const bool with_index = PyObject_IsTrue(args[7]);
  if (PyErr_Occurred()) {
    return nullptr;
  }
  if (x.dim() < 3) raise_error("_C.pool: x must have rank >= 3, got " + std::to_string(x.dim()));
  ForwardResult result;
  {
    pybind11::gil_scoped_release no_gil;
    result = forward_with_autograd(x, layout, mode, weight, scalar, eps, with_log, with_index);
  }
  PyObject* tuple = PyTuple_New(3);
  if (tuple == nullptr) {
    return nullptr;
  }
  PyTuple_SET_ITEM(tuple, 0, THPVariable_Wrap(std::move(std::get<0>(result))));
  PyTuple_SET_ITEM(tuple, 1, THPVariable_Wrap(std::move(std::get<1>(result))));
  PyTuple_SET_ITEM(tuple, 2, THPVariable_Wrap(std::move(std::get<2>(result))));
  return tuple;
  END_HANDLE_TH_ERRORS
}

}  // namespace gapkernels

TORCH_LIBRARY_IMPL(gapkernels, Autograd, m) {
  m.impl("pool_forward", &gapkernels::pool_forward_autograd);
  m.impl("pool_backward", &gapkernels::pool_backward_autograd);
}
