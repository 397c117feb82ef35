// NCS forward of GeM: each (n, c) row is a contiguous run, reduced relative to its running
// maximum in vectors (gem.h), or (short runs) one row per vector lane. The driver is
// ncs_forward.h's.
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/gem.h"
#include "cpu/kernels.h"
#include "cpu/layout.h"
#include "cpu/ncs_forward.h"
#include "cpu/stats.h"
#include "cpu/token.h"
#include "cpu/vec.h"

namespace gapkernels {
namespace cpu {
inline namespace CPU_CAPABILITY {
namespace {

template <typename scalar_t>
struct NcsGemRun {
  GK_CPU_KERNEL_TYPES(Mode::Gem, scalar_t);
  using Stat = Statistic<Mode::Gem, scalar_t>;

  // GEM's statistics of the contiguous run x[0, len).
  static Stats reduce_run(const scalar_t* x, int64_t len, const Power& power, const Args& a) {
    Stats st{acc_t(0), acc_t(0), a.eps, 0};
    if (len < W) {
      for (int64_t i = 0; i < len; ++i) {
        Stat::scan_scalar(static_cast<acc_t>(x[i]), i, power.scalar(), a.eps, a.with_log, st.sum,
                          st.log_sum, st.max, st.index);
      }
      gem_settle(st, x, len, 1);
      return st;
    }
    const int64_t tail = len % W;
    const int64_t full_end = len - tail;
    Stat::with_power(power, false, a.with_log, [&](auto pow_c, auto log_c) {
      constexpr int kPow = decltype(pow_c)::value;
      constexpr bool kLog = decltype(log_c)::value;
      const Vec eps(a.eps);
      const Vec zero(acc_t(0));
      const Vec p = power.vec[0];
      const int n = power.integral;
      const Vec headroom = gem_headroom(p);
      // Both halves of a chunk share the lanes' references. bsum: the sums of the current block
      // of kSumBlockChunks chunks; a move folds them into sum first.
      GemRef<acc_t> g = gem_start(eps);
      Vec sum[2] = {zero, zero}, log_sum[2] = {zero, zero};
      Vec bsum[2] = {zero, zero}, blog[2] = {zero, zero};
      auto fold = [&] {
        for (int k = 0; k < 2; ++k) {
          sum[k] += bsum[k];
          log_sum[k] += blog[k];
          bsum[k] = zero;
          blog[k] = zero;
        }
      };
      auto grow = [&](const Vec& block_max) {
        gem_grow<kPow, kLog, 2>(block_max, p, headroom, n, g, sum, log_sum, fold);
      };
      auto block = [&](const scalar_t* xb, auto chunks_c) {
        constexpr int kChunks = decltype(chunks_c)::value;
        Vec v[2 * kChunks];
        for (int j = 0; j < kChunks; ++j) IO::load(xb + j * W, v[2 * j], v[2 * j + 1]);
        Vec block_max = v[0];
        for (int j = 1; j < 2 * kChunks; ++j) block_max = clamp_min(v[j], block_max);
        grow(block_max);
        for (int j = 0; j < 2 * kChunks; ++j) {
          gem_term<false, kPow, kLog>(v[j], zero, g.inv, p, n, eps, bsum[j & 1], blog[j & 1]);
        }
      };
      for (int64_t i = 0; i < full_end;) {
        const int64_t sum_block_end = std::min(full_end, i + kSumBlockChunks * W);
        for (; i + kGemBlockChunks * W <= sum_block_end; i += kGemBlockChunks * W) {
          block(x + i, std::integral_constant<int, kGemBlockChunks>());
        }
        for (; i < sum_block_end; i += W) block(x + i, std::integral_constant<int, 1>());
        fold();
      }
      if (tail) {
        // The last chunk overlaps the previous one; the mask drops the lanes already counted
        // (0 never raises m >= eps).
        Vec mask[2], v[2];
        tail_mask(tail, mask);
        IO::load(x + len - W, v[0], v[1]);
        grow(clamp_min(v[0] & mask[0], v[1] & mask[1]));
        for (int k = 0; k < 2; ++k) {
          gem_term<true, kPow, kLog>(v[k], mask[k], g.inv, p, n, eps, sum[k], log_sum[k]);
        }
      }
      // The lanes' sums, moved to the row's maximum, added up.
      const acc_t big_m = max_of_lanes(g.max);
      Vec total[1] = {sum[0] + sum[1]}, log_total[1] = {log_sum[0] + log_sum[1]};
      gem_to_max<kPow, kLog, 1>(g, Vec(big_m), p, n, total, log_total);
      st.max = big_m;
      st.sum = sum_of_lanes(total[0]);
      if constexpr (kLog) st.log_sum = sum_of_lanes(log_total[0]);
    });
    gem_settle(st, x, len, 1);
    return st;
  }

  // Statistics of the kBatch rows x[0, kBatch * S), row r0 first, S >= 8, one row per lane:
  // each lane keeps its running maximum, raised once per tile of 8 columns before the tile's
  // terms are added. A row whose sum is NaN is reduced again by reduce_run, which settles it.
  static void reduce_lanes(const scalar_t* x, int64_t r0, const Args& a, Stats* st) {
    const int64_t S = a.S;
    const LanePrefetch pf = lane_prefetch<scalar_t>(S);
    const int64_t c0 = r0 % a.C;
    const Power power = a.power_of(c0);
    const bool per_lane_p = !a.uniform_p;
    constexpr int K = kLaneVecs;
    Vec p[K];
    for (int k = 0; k < K; ++k) p[k] = power.vec[0];
    if (per_lane_p) {
      GK_ALIGNED acc_t pl[kBatch];
      for (int64_t i = 0, c = c0; i < kBatch; ++i) {
        pl[i] = a.param(c);
        if (++c == a.C) c = 0;
      }
      for (int k = 0; k < K; ++k) p[k] = Vec::loadu(pl + k * V);
    }
    GK_ALIGNED acc_t sums[kBatch], log_sums[kBatch], maxima[kBatch];
    Stat::with_power(power, per_lane_p, a.with_log, [&](auto pow_c, auto log_c) {
      constexpr int kPow = decltype(pow_c)::value;
      constexpr bool kLog = decltype(log_c)::value;
      const Vec eps(a.eps);
      const Vec zero(acc_t(0));
      const int n = power.integral;
      Vec headroom[K], sum[K][1], log_sum[K][1];
      GemRef<acc_t> g[K];
      for (int k = 0; k < K; ++k) {
        headroom[k] = gem_headroom(p[k]);
        sum[k][0] = zero;
        log_sum[k][0] = zero;
        g[k] = gem_start(eps);
      }
      // Columns [j0, 8) of the tile at column `base`, for every vector of the batch. (t is the
      // lambda's own: the tile then stays in registers.)
      auto tile = [&](int64_t base, int64_t j0) {
        prefetch_batch(x, pf, base + j0, base + 8);
        for (int k = 0; k < K; ++k) {
          Vec t[8];
          load_tile(x + k * V * S + base, S, t);
          Vec block_max = t[j0];
          for (int64_t j = j0 + 1; j < 8; ++j) block_max = clamp_min(t[j], block_max);
          gem_grow<kPow, kLog, 1>(block_max, p[k], headroom[k], n, g[k], sum[k], log_sum[k]);
          for (int64_t j = j0; j < 8; ++j) {
            gem_term<false, kPow, kLog>(t[j], zero, g[k].inv, p[k], n, eps, sum[k][0],
                                        log_sum[k][0]);
          }
        }
      };
      int64_t s0 = 0;
      for (; s0 + 8 <= S; s0 += 8) tile(s0, 0);
      // The last tile overlaps the previous one; its first columns were already counted.
      if (s0 < S) tile(S - 8, s0 - (S - 8));
      for (int k = 0; k < K; ++k) {
        gem_to_max<kPow, kLog, 1>(g[k], g[k].max, p[k], n, sum[k], log_sum[k]);
        sum[k][0].store(sums + k * V);
        log_sum[k][0].store(log_sums + k * V);
        g[k].max.store(maxima + k * V);
      }
    });
    for (int64_t i = 0, c = c0; i < kBatch; ++i) {
      if (is_nan(sums[i])) {
        st[i] = reduce_run(x + i * S, S, a.power_of(c), a);
      } else {
        st[i] = {sums[i], log_sums[i], maxima[i], 0};
      }
      if (++c == a.C) c = 0;
    }
  }
};

}  // namespace

template <typename scalar_t>
void ncs_forward_gem(const scalar_t* x, const ArgsOf<scalar_t>& a,
                     const ForwardOutputs<scalar_t>& o) {
  NcsForward<Mode::Gem, scalar_t, NcsGemRun<scalar_t>>::run(x, a, o);
}

#define GK_INSTANTIATE(T) \
  template void ncs_forward_gem<T>(const T*, const ArgsOf<T>&, const ForwardOutputs<T>&);
GK_CPU_FOR_DTYPES(GK_INSTANTIATE)

// Token pooling's run loop (cpu/token.h).
template <typename scalar_t>
Partial<acc_type<scalar_t>> ncs_run_gem(const scalar_t* x, int64_t len, int64_t c,
                                        const ArgsOf<scalar_t>& a) {
  return NcsGemRun<scalar_t>::reduce_run(x, len, a.power_of(c), a);
}

#define GK_INSTANTIATE_RUN(T) \
  template Partial<acc_type<T>> ncs_run_gem<T>(const T*, int64_t, int64_t, const ArgsOf<T>&);
GK_CPU_FOR_DTYPES(GK_INSTANTIATE_RUN)

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gapkernels
