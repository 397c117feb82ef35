// The CPU kernel units' entry points, one per (layout, pass, statistic), called by the
// registration file pool_cpu.cpp; each unit instantiates its own for every dtype (and mode):
//   ncs_forward.cpp, nsc_forward.cpp            forward, the sum and max modes (not GeM)
//   ncs_forward_gem.cpp, nsc_forward_gem.cpp    forward, GeM
//   ncs_backward.cpp, nsc_backward.cpp          backward, every mode
#pragma once

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include "cpu/stats.h"
#include "pool_math.h"

namespace gapkernels {
namespace cpu {
inline namespace CPU_CAPABILITY {

template <typename scalar_t>
using ArgsOf = KernelArgs<acc_type<scalar_t>>;

// kMode: Avg, Max, Mixed or Cat.
template <Mode kMode, typename scalar_t>
void ncs_forward_sum_max(const scalar_t* x, const ArgsOf<scalar_t>& a,
                         const ForwardOutputs<scalar_t>& o);
template <Mode kMode, typename scalar_t>
void nsc_forward_sum_max(const scalar_t* x, const ArgsOf<scalar_t>& a,
                         const ForwardOutputs<scalar_t>& o);

template <typename scalar_t>
void ncs_forward_gem(const scalar_t* x, const ArgsOf<scalar_t>& a,
                     const ForwardOutputs<scalar_t>& o);
template <typename scalar_t>
void nsc_forward_gem(const scalar_t* x, const ArgsOf<scalar_t>& a,
                     const ForwardOutputs<scalar_t>& o);

template <Mode kMode, typename scalar_t>
void ncs_backward(const scalar_t* x, scalar_t* grad_x, const ArgsOf<scalar_t>& a,
                  const GradInputs<scalar_t>& g);
template <Mode kMode, typename scalar_t>
void nsc_backward(const scalar_t* x, scalar_t* grad_x, const ArgsOf<scalar_t>& a,
                  const GradInputs<scalar_t>& g);

// Explicit instantiations, in the units: MACRO(scalar_t) for every dtype the ops take;
// MACRO(mode, scalar_t) for every mode but Gem, or every mode.
#define GK_CPU_FOR_DTYPES(MACRO) \
  MACRO(float)                   \
  MACRO(double)                  \
  MACRO(c10::Half)               \
  MACRO(c10::BFloat16)

#define GK_CPU_FOR_SUM_MAX_MODES(MACRO, scalar_t) \
  MACRO(::gapkernels::Mode::Avg, scalar_t)        \
  MACRO(::gapkernels::Mode::Max, scalar_t)        \
  MACRO(::gapkernels::Mode::Mixed, scalar_t)      \
  MACRO(::gapkernels::Mode::Cat, scalar_t)

#define GK_CPU_FOR_MODES(MACRO, scalar_t)   \
  GK_CPU_FOR_SUM_MAX_MODES(MACRO, scalar_t) \
  MACRO(::gapkernels::Mode::Gem, scalar_t)

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gapkernels
