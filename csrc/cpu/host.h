// The host side shared by the CPU ops' registration units (pool_cpu.cpp, token_cpu.cpp), on the
// LibTorch stable ABI: the tensors' data, the kernels' arguments from the op's, the runtime dtype
// and mode as template parameters, and the huge-page advice for grad_x.
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "checks.h"
#include "cpu/kernels.h"
#include "stable_common.h"

namespace gapkernels {
namespace cpu {
inline namespace CPU_CAPABILITY {

// grad_x is a fresh allocation that the kernel touches first; with 4 KiB pages the page faults
// cost more than writing it. Transparent huge pages (the same thing torch's THP_MEM_ALLOC_ENABLE
// asks for) cut them 512-fold. Only the 2 MiB-aligned interior of large buffers is advised.
inline void advise_huge_pages(const StableTensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  const uintptr_t bytes = static_cast<uintptr_t>(t.numel()) * t.element_size();
  if (bytes < 4 * kHugePage) return;
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.mutable_data_ptr());
  const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (start + bytes) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

template <Mode kMode, typename scalar_t>
ArgsOf<scalar_t> make_args(const PoolShape& shape, const std::optional<StableTensor>& weight,
                           double scalar, double eps, bool with_log, bool with_index = true) {
  using acc_t = acc_type<scalar_t>;
  ArgsOf<scalar_t> a{};
  a.N = shape.N;
  a.C = shape.C;
  a.S = shape.S;
  const bool uses_weight = kMode == Mode::Mixed || kMode == Mode::Gem;
  a.weight = uses_weight && weight.has_value() ? const_ptr<acc_t>(*weight) : nullptr;
  a.weight_numel = a.weight ? weight->numel() : 0;
  a.scalar = static_cast<acc_t>(scalar);
  a.eps = static_cast<acc_t>(eps);
  a.with_log = kMode == Mode::Gem && with_log;
  a.with_index = mode_has_max(kMode) && with_index;
  a.uniform_p = true;
  if (a.weight && a.weight_numel > 1) {
    a.uniform_p =
        std::all_of(a.weight, a.weight + a.weight_numel, [&](acc_t p) { return p == a.weight[0]; });
  }
  return a;
}

// Calls f(TypeTag<scalar_t>{}) for x's dtype, one of the four check_forward accepts.
template <typename F>
inline void dispatch_dtype(ScalarType dtype, const char* op, F&& f) {
  ::gapkernels::dispatch_dtype<Half, BFloat16>(dtype, op, "CPU", std::forward<F>(f));
}

// Turns the runtime mode into a template parameter.
template <typename F>
inline void dispatch_mode(Mode mode, F&& f) {
  switch (mode) {
    case Mode::Avg:
      return f(std::integral_constant<Mode, Mode::Avg>());
    case Mode::Max:
      return f(std::integral_constant<Mode, Mode::Max>());
    case Mode::Mixed:
      return f(std::integral_constant<Mode, Mode::Mixed>());
    case Mode::Cat:
      return f(std::integral_constant<Mode, Mode::Cat>());
    case Mode::Gem:
      return f(std::integral_constant<Mode, Mode::Gem>());
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gapkernels
