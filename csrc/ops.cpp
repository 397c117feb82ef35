// The schema of every gapkernels op, defined once. The checks shared by all devices are in
// checks.cpp; the CPU kernels are in separate libraries (gapkernels/_cpu_*.so, see setup.py).
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

TORCH_LIBRARY(gapkernels, m) {
  m.def(
      "pool_forward(Tensor x, int mode, Tensor? weight, float scalar, float eps, bool with_log) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "pool_backward(Tensor grad_out, Tensor x, Tensor aux, Tensor indices, int mode, "
      "Tensor? weight, float scalar, float eps) -> Tensor");
}
