// CPU kernels of gapkernels::token_pool_forward and gapkernels::token_pool_backward (schema in
// ops.cpp; docs/DESIGN.md, "Token pooling"): the checks (checks.cpp's, shared with the CUDA token
// kernels), the mode/dtype dispatch and the registration, on the LibTorch stable ABI
// (stable_common.h). The kernels are token_forward.cpp and token_backward.cpp (cpu/token.h).
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/host.h"
#include "cpu/kernels.h"
#include "cpu/token.h"
#include "stable_common.h"

namespace gapkernels {
namespace cpu {
inline namespace CPU_CAPABILITY {
namespace {

constexpr const char* kForwardOp = "gapkernels::token_pool_forward";
constexpr const char* kBackwardOp = "gapkernels::token_pool_backward";

// The spans and mask checked against the (N, C, S) view (checks.cpp); the spans copied with begin
// and end clamped into [0, S] (a value never read on the host, as inside torch.compile, cannot
// make a kernel read out of bounds). varlen views are read as NSC (with N = 1 the same memory
// when C or S is 1, the only cases the layout check may call NCS).
struct TokenForm {
  PoolShape shape;
  std::vector<int64_t> spans;
  TokenArgs args;
};

TokenForm token_form(const StableTensor& x, PoolShape shape, const StableTensor& spans,
                     const std::optional<StableTensor>& mask, bool varlen, const char* op) {
  const bool has_mask = mask.has_value() && mask->defined();
  const TensorInfo mask_info = has_mask ? tensor_info(*mask) : TensorInfo{};
  const TensorInfo si = tensor_info(spans);
  shape = check_token_form(tensor_info(x), shape, si, has_mask ? &mask_info : nullptr, varlen, op);
  TokenForm f{shape, {}, {}};
  const int64_t B = si.size(0);
  const int64_t* sp = const_ptr<int64_t>(spans);
  f.spans.resize(4 * B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t begin = std::clamp<int64_t>(sp[4 * b], 0, shape.S);
    f.spans[4 * b] = begin;
    f.spans[4 * b + 1] = std::clamp<int64_t>(sp[4 * b + 1], begin, shape.S);
    f.spans[4 * b + 2] = sp[4 * b + 2];
    f.spans[4 * b + 3] = std::clamp<int64_t>(sp[4 * b + 3], 0, shape.S);
  }
  f.args = {B, f.spans.data(), has_mask ? const_ptr<bool>(*mask) : nullptr, varlen};
  return f;
}

std::tuple<StableTensor, StableTensor, StableTensor> token_pool_forward_cpu(
    const StableTensor& x, const StableTensor& spans, const std::optional<StableTensor>& mask,
    bool varlen, int64_t mode, const std::optional<StableTensor>& weight, double scalar, double eps,
    bool with_log) {
  const TokenForm f = token_form(x, check_forward_inputs(x, mode, weight, kForwardOp), spans, mask,
                                 varlen, kForwardOp);
  const Mode m = static_cast<Mode>(mode);
  PoolShape rows = f.shape;
  rows.N = f.args.B;
  auto [out, aux, indices] = allocate_forward_outputs(x, rows, m, with_log);
  if (f.args.B == 0 || f.shape.C == 0) return {out, aux, indices};
  dispatch_dtype(x.scalar_type(), kForwardOp, [&](auto type) {
    using scalar_t = typename decltype(type)::type;
    using acc_t = acc_type<scalar_t>;
    dispatch_mode(m, [&](auto mode_constant) {
      constexpr Mode kMode = decltype(mode_constant)::value;
      const auto a = make_args<kMode, scalar_t>(f.shape, weight, scalar, eps, with_log);
      const ForwardOutputs<scalar_t> o{
          mutable_ptr<scalar_t>(out), aux.numel() ? mutable_ptr<acc_t>(aux) : nullptr, aux.size(2),
          mode_has_max(kMode) ? mutable_ptr<int64_t>(indices) : nullptr};
      token_forward<kMode>(const_ptr<scalar_t>(x), f.shape.channels_last, f.args, a, o);
    });
  });
  return {out, aux, indices};
}

// Whether the rows of a varlen batch own every token of it ([origin, end) back to back from 0
// to total), so that the kernel writes every element of grad_x.
bool covers(const TokenArgs& t, int64_t total) {
  int64_t next = 0;
  for (int64_t b = 0; b < t.B; ++b) {
    if (t.origin(b) != next) return false;
    next = t.end(b);
  }
  return next == total;
}

StableTensor token_pool_backward_cpu(const StableTensor& grad_out, const StableTensor& x,
                                     const StableTensor& spans,
                                     const std::optional<StableTensor>& mask, bool varlen,
                                     const StableTensor& aux, const StableTensor& indices,
                                     int64_t mode, const std::optional<StableTensor>& weight,
                                     double scalar, double eps) {
  const TokenForm f = token_form(x, check_forward_inputs(x, mode, weight, kBackwardOp), spans, mask,
                                 varlen, kBackwardOp);
  const Mode m = static_cast<Mode>(mode);
  const int64_t B = f.args.B, C = f.shape.C;
  check_token_backward(tensor_info(grad_out), tensor_info(x), B, C, tensor_info(aux),
                       tensor_info(indices), m, kBackwardOp);
  StableTensor grad_x = allocate_grad_input(x, f.shape);
  if (grad_x.numel() == 0) return grad_x;
  if (B == 0 || (varlen && !covers(f.args, f.shape.S))) torch::stable::zero_(grad_x);
  if (B == 0) return grad_x;
  advise_huge_pages(grad_x);
  dispatch_dtype(x.scalar_type(), kBackwardOp, [&](auto type) {
    using scalar_t = typename decltype(type)::type;
    using acc_t = acc_type<scalar_t>;
    dispatch_mode(m, [&](auto mode_constant) {
      constexpr Mode kMode = decltype(mode_constant)::value;
      constexpr bool kGem = kMode == Mode::Gem;
      const auto a = make_args<kMode, scalar_t>(f.shape, weight, scalar, eps, false);
      const GradInputs<scalar_t> g{const_ptr<scalar_t>(grad_out),
                                   kGem ? const_ptr<acc_t>(aux) : nullptr, kGem ? aux.size(2) : 0,
                                   mode_has_max(kMode) ? const_ptr<int64_t>(indices) : nullptr};
      token_backward<kMode>(const_ptr<scalar_t>(x), mutable_ptr<scalar_t>(grad_x),
                            f.shape.channels_last, f.args, a, g);
    });
  });
  return grad_x;
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gapkernels

STABLE_TORCH_LIBRARY_IMPL(gapkernels, CPU, m) {
  m.impl("token_pool_forward", TORCH_BOX(&gapkernels::cpu::token_pool_forward_cpu));
  m.impl("token_pool_backward", TORCH_BOX(&gapkernels::cpu::token_pool_backward_cpu));
}
