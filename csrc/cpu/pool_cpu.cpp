// CPU kernels of gapkernels::pool_forward and gapkernels::pool_backward: the checks, the
// mode/dtype dispatch and the registration. The contract (modes, outputs, max/NaN semantics,
// determinism) is docs/DESIGN.md; the kernels are the units declared in cpu/kernels.h, one per
// layout (NCS: channels outer; NSC: channels inner), pass and statistic.
//
// Forward reads x once and produces every statistic the mode needs; backward writes grad_x once.
// Reductions that must be split (few rows, long runs) are cut into pieces chosen from the shape
// only (cpu/layout.h), and the pieces' partial results are merged in a fixed order, so results do
// not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "cpu/host.h"
#include "cpu/kernels.h"
#include "pool_common.h"

namespace gapkernels {
namespace cpu {
inline namespace CPU_CAPABILITY {
namespace {

template <Mode kMode, typename scalar_t>
void forward(const at::Tensor& x, const PoolShape& shape, const std::optional<at::Tensor>& weight,
             double scalar, double eps, bool with_log, at::Tensor& out, at::Tensor& aux,
             at::Tensor& indices) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto a = make_args<kMode, scalar_t>(shape, weight, scalar, eps, with_log);
  const ForwardOutputs<scalar_t> o{out.data_ptr<scalar_t>(),
                                   aux.numel() ? aux.data_ptr<acc_t>() : nullptr, aux.size(2),
                                   mode_has_max(kMode) ? indices.data_ptr<int64_t>() : nullptr};
  const scalar_t* xp = x.data_ptr<scalar_t>();
  if constexpr (kMode == Mode::Gem) {
    shape.channels_last ? nsc_forward_gem(xp, a, o) : ncs_forward_gem(xp, a, o);
  } else {
    shape.channels_last ? nsc_forward_sum_max<kMode>(xp, a, o)
                        : ncs_forward_sum_max<kMode>(xp, a, o);
  }
}

template <Mode kMode, typename scalar_t>
void backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& aux,
              const at::Tensor& indices, const PoolShape& shape,
              const std::optional<at::Tensor>& weight, double scalar, double eps,
              at::Tensor& grad_x) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kGem = kMode == Mode::Gem;
  const auto a = make_args<kMode, scalar_t>(shape, weight, scalar, eps, false);
  const GradInputs<scalar_t> g{grad_out.data_ptr<scalar_t>(),
                               kGem ? aux.data_ptr<acc_t>() : nullptr, kGem ? aux.size(2) : 0,
                               mode_has_max(kMode) ? indices.data_ptr<int64_t>() : nullptr};
  if (shape.channels_last) {
    nsc_backward<kMode>(x.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), a, g);
  } else {
    ncs_backward<kMode>(x.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), a, g);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_forward_cpu(
    const at::Tensor& x, int64_t mode, const std::optional<at::Tensor>& weight, double scalar,
    double eps, bool with_log) {
  const PoolShape shape = check_forward_inputs(x, mode, weight, "gapkernels::pool_forward");
  const Mode m = static_cast<Mode>(mode);
  auto [out, aux, indices] = allocate_forward_outputs(x, shape, m, with_log);
  if (shape.N == 0 || shape.C == 0) return {out, aux, indices};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "pool_forward_cpu", [&] {
        dispatch_mode(m, [&](auto mode_constant) {
          forward<decltype(mode_constant)::value, scalar_t>(x, shape, weight, scalar, eps, with_log,
                                                            out, aux, indices);
        });
      });
  return {out, aux, indices};
}

at::Tensor pool_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& aux,
                             const at::Tensor& indices, int64_t mode,
                             const std::optional<at::Tensor>& weight, double scalar, double eps) {
  const PoolShape shape = check_backward_inputs(grad_out, x, aux, indices, mode, weight);
  at::Tensor grad_x = allocate_grad_input(x, shape);
  if (shape.N == 0 || shape.C == 0) return grad_x;
  advise_huge_pages(grad_x);
  const Mode m = static_cast<Mode>(mode);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "pool_backward_cpu", [&] {
        dispatch_mode(m, [&](auto mode_constant) {
          backward<decltype(mode_constant)::value, scalar_t>(grad_out, x, aux, indices, shape,
                                                             weight, scalar, eps, grad_x);
        });
      });
  return grad_x;
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gapkernels

TORCH_LIBRARY_IMPL(gapkernels, CPU, m) {
  m.impl("pool_forward", &gapkernels::cpu::pool_forward_cpu);
  m.impl("pool_backward", &gapkernels::cpu::pool_backward_cpu);
}
