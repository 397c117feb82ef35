// Shared by every device's kernels: the modes, the checks made before any kernel runs, and the
// allocation of results. The contract is in docs/DESIGN.md.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace gapkernels {

enum class Mode : int64_t { Avg = 0, Max = 1, Mixed = 2, Cat = 3, Gem = 4 };

// A validated 3-D view (N, C, S) of the input.
struct PoolShape {
  int64_t N;
  int64_t C;
  int64_t S;
  bool channels_last;  // NSC: strides (S*C, 1, C). False: NCS, contiguous.
};

inline bool mode_has_max(Mode mode) {
  return mode == Mode::Max || mode == Mode::Mixed || mode == Mode::Cat;
}

// Number of aux columns (K in docs/DESIGN.md).
inline int64_t aux_columns(Mode mode, bool with_log) {
  if (mode == Mode::Mixed) return 1;
  if (mode == Mode::Gem) return with_log ? 3 : 2;
  return 0;
}

// Checks x (3-D, float dtype, NCS or NSC strides), mode and weight; returns the view's shape.
PoolShape check_forward_inputs(const at::Tensor& x, int64_t mode,
                               const std::optional<at::Tensor>& weight, const char* op);

// Checks pool_backward's tensors against x and returns the view's shape.
PoolShape check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& x,
                                const at::Tensor& aux, const at::Tensor& indices, int64_t mode,
                                const std::optional<at::Tensor>& weight);

// (out, aux, indices), shaped as in docs/DESIGN.md.
std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_forward_outputs(const at::Tensor& x,
                                                                        const PoolShape& shape,
                                                                        Mode mode, bool with_log);

// grad_x: same shape, dtype and strides (NCS or NSC) as x.
at::Tensor allocate_grad_input(const at::Tensor& x, const PoolShape& shape);

}  // namespace gapkernels
