// The statistics of the CPU kernels: what a row (or a piece of a row) keeps for each mode, the
// kernels' arguments, the scalar scan step and the merge of two pieces. The math is
// pool_math.h's (scan_max, merge_max, power, gem_rescale, gem_merge).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/vec.h"
#include "pool_math.h"

namespace gapkernels {
namespace cpu {
inline namespace CPU_CAPABILITY {

constexpr bool mode_has_sum(Mode mode) {
  return mode == Mode::Avg || mode == Mode::Mixed || mode == Mode::Cat;
}

// The statistics of one row (or one piece of a row). `sum` is the sum of x for avg/mixed/cat.
// GeM: `max` is M, the maximum of y = clamp(x, eps) (NaN when a NaN was seen), `sum` is the sum
// of (y/M)**p and `log_sum` the sum of (y/M)**p * log(y/M) (docs/DESIGN.md, "Modes").
template <typename acc_t>
struct Partial {
  acc_t sum;
  acc_t log_sum;
  acc_t max;
  int64_t index;
};

template <typename acc_t>
inline Partial<acc_t> empty_partial() {
  return {acc_t(0), acc_t(0), -std::numeric_limits<acc_t>::infinity(), 0};
}

// GeM's exponent (p forward, p - 1 backward) for the loops: its integral code (pool_math.h's
// integral_exponent), its value, and the value in vectors (per-lane exponents may differ).
template <typename acc_t>
struct ChunkPower {
  int integral;
  acc_t value;
  Vec<acc_t> vec[2];
  Exponent<acc_t> scalar() const { return {value, integral}; }
};

template <typename acc_t>
inline ChunkPower<acc_t> chunk_power(acc_t e) {
  return {integral_exponent(e), e, {Vec<acc_t>(e), Vec<acc_t>(e)}};
}

template <typename acc_t>
struct KernelArgs {
  int64_t N, C, S;
  const acc_t* weight;  // alpha (MIXED) or p (GEM); null: `scalar`
  int64_t weight_numel;
  acc_t scalar;
  acc_t eps;
  bool with_log;
  // The modes with a max: whether the max's index is wanted (ForwardOutputs::indices is null
  // without it, and the kernels may skip finding it).
  bool with_index;
  // GEM with one p for every channel (scalar, 1-element weight, or all weights equal).
  bool uniform_p;
  acc_t param(int64_t c) const { return weight ? weight[weight_numel == 1 ? 0 : c] : scalar; }
  // GeM's forward exponent p of channel c, and the backward's p - 1.
  ChunkPower<acc_t> power_of(int64_t c) const { return chunk_power(param(c)); }
  ChunkPower<acc_t> grad_power_of(int64_t c) const { return chunk_power(param(c) - acc_t(1)); }
};

template <typename scalar_t>
struct ForwardOutputs {
  scalar_t* out;
  acc_type<scalar_t>* aux;
  int64_t aux_columns;
  int64_t* indices;
};

template <typename scalar_t>
struct GradInputs {
  const scalar_t* grad_out;
  const acc_type<scalar_t>* aux;
  int64_t aux_columns;
  const int64_t* indices;
};

// The names every CPU kernel piece uses for its (mode, dtype).
#define GK_CPU_KERNEL_TYPES(kMode, scalar_t)                           \
  using acc_t = acc_type<scalar_t>;                                    \
  using Vec = ::gapkernels::cpu::Vec<acc_t>;                           \
  using IO = ::gapkernels::cpu::ChunkIO<scalar_t>;                     \
  using Stats = ::gapkernels::cpu::Partial<acc_t>;                     \
  using Args = ::gapkernels::cpu::KernelArgs<acc_t>;                   \
  using Power = ::gapkernels::cpu::ChunkPower<acc_t>;                  \
  static constexpr int64_t V = IO::kVec;                               \
  static constexpr int64_t W = IO::kWidth;                             \
  static constexpr bool kSum = ::gapkernels::cpu::mode_has_sum(kMode); \
  static constexpr bool kMax = ::gapkernels::mode_has_max(kMode);      \
  static constexpr bool kGem = kMode == ::gapkernels::Mode::Gem

// GeM: a piece's sums moved from the maximum m_from to m_to (pool_math.h's gem_rescale).
template <typename acc_t>
inline void rescale_sums(bool with_log, acc_t m_from, acc_t m_to, Exponent<acc_t> e, acc_t& sum,
                         acc_t& log_sum) {
  if (with_log) {
    gem_rescale<true>(sum, log_sum, m_from, m_to, e, DivideReciprocal{});
  } else {
    gem_rescale<false>(sum, log_sum, m_from, m_to, e, DivideReciprocal{});
  }
}

template <Mode kMode, typename scalar_t>
struct Statistic {
  GK_CPU_KERNEL_TYPES(kMode, scalar_t);

  // Calls f(pow, with_log) with GEM's way of raising to p (see dispatch_power) and with_log as
  // compile-time constants, so that the loops inside f carry no per-element switches.
  template <typename F>
  static void with_power(const Power& power, bool per_lane_p, bool with_log, F&& f) {
    if constexpr (!kGem) {
      f(std::integral_constant<int, 1>(), std::false_type());
    } else {
      auto pick = [&](auto log_c) {
        dispatch_power<1>(power.integral, per_lane_p, [&](auto pow_c) { f(pow_c, log_c); });
      };
      if (with_log) {
        pick(std::true_type());
      } else {
        pick(std::false_type());
      }
    }
  }

  // The scan's step for one element v at index i (after every element already seen). GEM: mx
  // is the running maximum M of y; it starts at eps, so it is never NaN (a NaN shows in sum;
  // gem_settle makes M NaN at the end of the piece). Not pool_math's gem_scan, whose +inf and
  // NaN handling differs: this step matches the vector loops of the same kernels.
  static inline void scan_scalar(acc_t v, int64_t i, Exponent<acc_t> e, acc_t eps, bool with_log,
                                 acc_t& sum, acc_t& log_sum, acc_t& mx, int64_t& index) {
    if constexpr (kSum) sum += v;
    if constexpr (kMax) scan_max(v, i, mx, index);
    if constexpr (kGem) {
      const acc_t y = is_nan(v) ? v : std::max(v, eps);
      if (y > mx) {
        rescale_sums(with_log, mx, y, e, sum, log_sum);
        mx = y;
      }
      const acc_t z = y / mx;
      const acc_t pw = power(z, e.p, e.integral);
      sum += pw;
      // z may underflow to 0; the clamp keeps 0 * log(z) at 0.
      if (with_log) log_sum += pw * std::max(std::log(z), std::numeric_limits<acc_t>::lowest());
    }
  }

  // Merges the pieces row[1 .. pieces) of one row (channel c) into row[0]'s statistics, in
  // order.
  static inline Stats merge_pieces(const Stats* row, int64_t pieces, int64_t c, const Args& a) {
    Stats st = row[0];
    if constexpr (kGem) {
      const Exponent<acc_t> e = make_exponent(a.param(c));
      for (int64_t k = 1; k < pieces; ++k) {
        const Stats& o = row[k];
        if (a.with_log) {
          gem_merge<true>(st.max, st.sum, st.log_sum, o.max, o.sum, o.log_sum, e,
                          DivideReciprocal{});
        } else {
          gem_merge<false>(st.max, st.sum, st.log_sum, o.max, o.sum, o.log_sum, e,
                           DivideReciprocal{});
        }
      }
    } else {
      for (int64_t k = 1; k < pieces; ++k) {
        st.sum += row[k].sum;
        if constexpr (kMax) merge_max(row[k].max, row[k].index, st.max, st.index);
      }
    }
    return st;
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gapkernels
