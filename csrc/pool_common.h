// Shared by every device's host side: the checks made before any kernel runs and the allocation
// of results (the modes and the math are in pool_math.h). The contract is in docs/DESIGN.md.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "pool_math.h"

namespace gapkernels {

// A validated 3-D view (N, C, S) of the input.
struct PoolShape {
  int64_t N;
  int64_t C;
  int64_t S;
  bool channels_last;  // NSC: strides (S*C, 1, C). False: NCS, contiguous.
};

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
