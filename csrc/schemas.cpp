// The schema of every gapkernels op, defined once: gapkernels/_ops.abi3.so, on the LibTorch
// stable ABI (TORCH_TARGET_VERSION, setup.py), so that one build defines the ops under every torch
// from the target on. No kernel and no Python API: gapkernels/_ext.py loads this library first,
// then the kernel libraries (_cpu_<variant>, _cuda) and, where the running torch is the one it was
// built against, the optional accelerator gapkernels._C (csrc/ops.cpp: the C++ autograd and the
// eager entry). gapkernels/ops.py and token_ops.py hold the same schema text (for the Triton ops);
// tests/test_definitions.py compares them with what is registered here.
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(gapkernels, m) {
  m.def(
      "pool_forward(Tensor x, int mode, Tensor? weight, float scalar, float eps, bool with_log, "
      "bool with_index=True) -> (Tensor, Tensor, Tensor)");
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
