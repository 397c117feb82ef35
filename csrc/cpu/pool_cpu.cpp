// CPU kernels of gapkernels::pool_forward and gapkernels::pool_backward: the checks, the
// mode/dtype dispatch and the registration, on the LibTorch stable ABI (stable_common.h). The
// contract (modes, outputs, max/NaN semantics, determinism) is docs/DESIGN.md; the kernels are
// the units declared in cpu/kernels.h, one per layout (NCS: channels outer; NSC: channels
// inner), pass and statistic.
//
// Forward reads x once and produces every statistic the mode needs; backward writes grad_x once.
// Reductions that must be split (few rows, long runs) are cut into pieces chosen from the shape
// only (cpu/layout.h), and the pieces' partial results are merged in a fixed order, so results do
// not depend on the number of threads.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "cpu/host.h"
#include "cpu/kernels.h"
#include "stable_common.h"

namespace gapkernels {
namespace cpu {
inline namespace CPU_CAPABILITY {
namespace {

template <Mode kMode, typename scalar_t>
void forward(const StableTensor& x, const PoolShape& shape,
             const std::optional<StableTensor>& weight, double scalar, double eps, bool with_log,
             bool with_index, const StableTensor& out, const StableTensor& aux,
             const StableTensor& indices) {
  using acc_t = acc_type<scalar_t>;
  const auto a = make_args<kMode, scalar_t>(shape, weight, scalar, eps, with_log, with_index);
  const ForwardOutputs<scalar_t> o{mutable_ptr<scalar_t>(out),
                                   aux.numel() ? mutable_ptr<acc_t>(aux) : nullptr, aux.size(2),
                                   a.with_index ? mutable_ptr<int64_t>(indices) : nullptr};
  const scalar_t* xp = const_ptr<scalar_t>(x);
  if constexpr (kMode == Mode::Gem) {
    shape.channels_last ? nsc_forward_gem(xp, a, o) : ncs_forward_gem(xp, a, o);
  } else {
    shape.channels_last ? nsc_forward_sum_max<kMode>(xp, a, o)
                        : ncs_forward_sum_max<kMode>(xp, a, o);
  }
}

template <Mode kMode, typename scalar_t>
void backward(const StableTensor& grad_out, const StableTensor& x, const StableTensor& aux,
              const StableTensor& indices, const PoolShape& shape,
              const std::optional<StableTensor>& weight, double scalar, double eps,
              const StableTensor& grad_x) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool kGem = kMode == Mode::Gem;
  const auto a = make_args<kMode, scalar_t>(shape, weight, scalar, eps, false);
  const GradInputs<scalar_t> g{const_ptr<scalar_t>(grad_out),
                               kGem ? const_ptr<acc_t>(aux) : nullptr, kGem ? aux.size(2) : 0,
                               mode_has_max(kMode) ? const_ptr<int64_t>(indices) : nullptr};
  const scalar_t* xp = const_ptr<scalar_t>(x);
  scalar_t* gx = mutable_ptr<scalar_t>(grad_x);
  if (shape.channels_last) {
    nsc_backward<kMode>(xp, gx, a, g);
  } else {
    ncs_backward<kMode>(xp, gx, a, g);
  }
}

std::tuple<StableTensor, StableTensor, StableTensor> pool_forward_cpu(
    const StableTensor& x, int64_t mode, const std::optional<StableTensor>& weight, double scalar,
    double eps, bool with_log, bool with_index) {
  constexpr const char* kOp = "gapkernels::pool_forward";
  const PoolShape shape = check_forward_inputs(x, mode, weight, kOp);
  const Mode m = static_cast<Mode>(mode);
  auto [out, aux, indices] = allocate_forward_outputs(x, shape, m, with_log, with_index);
  if (shape.N == 0 || shape.C == 0) return {out, aux, indices};
  dispatch_dtype(x.scalar_type(), kOp, [&](auto type) {
    using scalar_t = typename decltype(type)::type;
    dispatch_mode(m, [&](auto mode_constant) {
      forward<decltype(mode_constant)::value, scalar_t>(x, shape, weight, scalar, eps, with_log,
                                                        with_index, out, aux, indices);
    });
  });
  return {out, aux, indices};
}

StableTensor pool_backward_cpu(const StableTensor& grad_out, const StableTensor& x,
                               const StableTensor& aux, const StableTensor& indices, int64_t mode,
                               const std::optional<StableTensor>& weight, double scalar,
                               double eps) {
  const PoolShape shape = check_backward_inputs(grad_out, x, aux, indices, mode, weight);
  StableTensor grad_x = allocate_grad_input(x, shape);
  if (shape.N == 0 || shape.C == 0) return grad_x;
  advise_huge_pages(grad_x);
  const Mode m = static_cast<Mode>(mode);
  dispatch_dtype(x.scalar_type(), "gapkernels::pool_backward", [&](auto type) {
    using scalar_t = typename decltype(type)::type;
    dispatch_mode(m, [&](auto mode_constant) {
      backward<decltype(mode_constant)::value, scalar_t>(grad_out, x, aux, indices, shape, weight,
                                                         scalar, eps, grad_x);
    });
  });
  return grad_x;
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gapkernels

STABLE_TORCH_LIBRARY_IMPL(gapkernels, CPU, m) {
  m.impl("pool_forward", TORCH_BOX(&gapkernels::cpu::pool_forward_cpu));
  m.impl("pool_backward", TORCH_BOX(&gapkernels::cpu::pool_backward_cpu));
}
