// NCS forward of the sum and max modes (avg, max, mixed, cat): each (n, c) row is a contiguous
// run, vectorized along it, or (short runs) one row per vector lane. The driver is
// ncs_forward.h's; the max rule is pool_math.h's scan_max, per lane (vec_scan_max).
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cstdint>
#include <limits>

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

template <Mode kMode, typename scalar_t>
struct NcsSumMaxRun {
  GK_CPU_KERNEL_TYPES(kMode, scalar_t);
  static_assert(!kGem, "GeM is ncs_forward_gem.cpp's");

  // Moves the running (max, index) of a run past x[b, e) (a multiple of W long), given the
  // block's lane maxima (NaN-blind) and whether its NaN probe (a sum of its elements) is NaN:
  // a block with a NaN hands over its last NaN; otherwise a block whose max beats the running
  // one hands over its first occurrence of it (without with_index, only the value). With the
  // run's tail, [e, tail_end) follows, read as the chunk at tail_end - W.
  static inline void resolve_block(const scalar_t* x, int64_t b, int64_t e, int64_t tail_end,
                                   const Vec& block_max, bool maybe_nan, bool with_index,
                                   acc_t& run_max, int64_t& run_index) {
    if (maybe_nan) {
      // A NaN probe without a NaN (inf - inf) finds none here and goes on as without.
      for (int64_t k = tail_end - 1; k >= b; --k) {
        if (is_nan(static_cast<acc_t>(x[k]))) {
          run_max = static_cast<acc_t>(x[k]);
          run_index = k;
          return;
        }
      }
    }
    if (is_nan(run_max)) return;
    const acc_t m = max_of_lanes(block_max);
    if (!(m > run_max)) return;
    run_max = m;
    if (!with_index) return;
    const Vec target(m);
    for (int64_t j = b; j < tail_end; j = j + W < e || j + W == tail_end ? j + W : tail_end - W) {
      Vec v[2];
      IO::load(x + j, v[0], v[1]);
      const uint32_t matches = equal_lanes(v[0], target) | (equal_lanes(v[1], target) << V);
      if (matches) {
        run_index = j + __builtin_ctz(matches);
        return;
      }
    }
  }

  // Statistics of the contiguous run x[0, len); indices relative to x.
  static Stats reduce_run(const scalar_t* x, int64_t len, const Power&, const Args& a) {
    Stats st = empty_partial<acc_t>();
    if (len < W) {
      for (int64_t i = 0; i < len; ++i) {
        Statistic<kMode, scalar_t>::scan_scalar(static_cast<acc_t>(x[i]), i, {}, a.eps, false,
                                                st.sum, st.log_sum, st.max, st.index);
      }
      return st;
    }
    const int64_t tail = len % W;
    const int64_t full_end = len - tail;
    // Accumulators are locals of this loop nest so that they stay in registers.
    const Vec zero(acc_t(0));
    const Vec neg_inf(-std::numeric_limits<acc_t>::infinity());
    Vec sum0 = zero, sum1 = zero;
    Vec v0, v1;
    // Max blocks fit in L1, where resolve_block finds the index again. Their NaN probe is the
    // sum of their elements: the block sums (avg, mixed, cat), or a sum of its own (max).
    for (int64_t i = 0; i < full_end;) {
      const int64_t max_block_end = std::min(full_end, i + kMaxBlockChunks * W);
      const int64_t max_block_begin = i;
      Vec max0 = neg_inf, max1 = neg_inf, probe = zero;
      while (i < max_block_end) {
        const int64_t sum_block_end = std::min(max_block_end, i + kSumBlockChunks * W);
        Vec bsum0 = zero, bsum1 = zero;
        for (; i < sum_block_end; i += W) {
          IO::load(x + i, v0, v1);
          bsum0 += v0;
          bsum1 += v1;
          if constexpr (kMax) {
            max0 = clamp_min(v0, max0);
            max1 = clamp_min(v1, max1);
          }
        }
        if constexpr (kSum) {
          sum0 += bsum0;
          sum1 += bsum1;
        }
        if constexpr (kMax) probe += bsum0 + bsum1;
      }
      const bool with_tail = tail && max_block_end == full_end;
      if (with_tail) {
        // The last chunk overlaps the previous one; the mask drops the lanes already counted.
        Vec mask[2];
        tail_mask(tail, mask);
        IO::load(x + len - W, v0, v1);
        const Vec new0 = v0 & mask[0], new1 = v1 & mask[1];
        if constexpr (kSum) {
          sum0 += new0;
          sum1 += new1;
        }
        if constexpr (kMax) {
          probe += new0 + new1;
          max0 = clamp_min(masked_for_max(v0, mask[0]), max0);
          max1 = clamp_min(masked_for_max(v1, mask[1]), max1);
        }
      }
      if constexpr (kMax) {
        const bool maybe_nan = any(probe.isnan());
        resolve_block(x, max_block_begin, max_block_end, with_tail ? len : max_block_end,
                      clamp_min(max0, max1), maybe_nan, a.with_index, st.max, st.index);
      }
    }
    if constexpr (kSum) st.sum = sum_of_lanes(sum0 + sum1);
    return st;
  }

  // Statistics of the kBatch rows x[0, kBatch * S), row r0 first, S >= 8, one row per lane. The
  // max is tracked with a NaN-blind maximum; a row whose sum turns out NaN (a NaN, or inf and
  // -inf) is reduced again by reduce_run, which applies the exact rule. Row by row instead
  // (short_rows16, or short_rows8 with AVX2 and for AVX-512's rows shorter than kMinRows16Run;
  // the rows' vectors reduced together), with the same NaN rule:
  // AVG, and the modes with a max without with_index; with AVX-512 also those with the index in
  // float16/bfloat16 from kMinRowsMaxRun on, found again in the rows (first_equal_rows16).
  static void reduce_lanes(const scalar_t* x, int64_t r0, const Args& a, Stats* st) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    // (kLanes: float accumulators only.)
#if defined(CPU_CAPABILITY_AVX512)
    constexpr bool kHalf = sizeof(scalar_t) == 2;  // float16, bfloat16
    const bool find_index = kMax && a.with_index;
    if (!find_index || (kHalf && a.S >= kMinRowsMaxRun)) {
#else
    constexpr bool find_index = false;
    if (!kMax || !a.with_index) {
#endif
      const int64_t S = a.S;
      GK_ALIGNED float sums[kBatch], maxima[kBatch];
      int64_t indices[kBatch];
#if defined(CPU_CAPABILITY_AVX512)
      // (Below kMinRows16Run there is no index to find: find_index needs kMinRowsMaxRun.)
      const bool rows16 = S >= kMinRows16Run;
      if (rows16) short_rows16<kMax>(x, S, sums, maxima);
#else
      constexpr bool rows16 = false;
#endif
      if (!rows16) {
        for (int64_t g = 0; g < kBatch; g += 8) {
          short_rows8<kMax>(x + g * S, S, sums + g, maxima + g);
        }
      }
#if defined(CPU_CAPABILITY_AVX512)
      if (find_index) {
        // A NaN row's max is NaN-blind here; it is reduced again below.
        for (int64_t i = 0; i < kBatch; ++i) maxima[i] = is_nan(sums[i]) ? 0.0f : maxima[i];
        first_equal_rows16(x, S, maxima, indices);
      }
#endif
      for (int64_t i = 0; i < kBatch; ++i) {
        st[i] = empty_partial<acc_t>();
        if constexpr (kSum) st[i].sum = sums[i];
        if constexpr (kMax) {
          const scalar_t* row = x + i * S;
          if (is_nan(sums[i])) {
            st[i] = reduce_run(row, S, Power{}, a);
          } else if (find_index) {
            // The value at the first occurrence: of -0 and 0, the one the scan keeps.
            st[i].index = indices[i];
            st[i].max = static_cast<acc_t>(row[indices[i]]);
          } else {
            st[i].max = maxima[i];
          }
        }
      }
      return;
    }
#endif
    constexpr int K = kLaneVecs;
    const int64_t S = a.S;
    const LanePrefetch pf = lane_prefetch<scalar_t>(S);
    GK_ALIGNED acc_t sums[kBatch], maxima[kBatch], indices[kBatch];
    const Vec zero(acc_t(0));
    Vec sum[K], ix[K], mx[K];
    for (int k = 0; k < K; ++k) {
      sum[k] = zero;
      ix[k] = zero;
      mx[k] = Vec(-std::numeric_limits<acc_t>::infinity());
    }
    // The vectors of the batch advance together: independent dependency chains. Max only: the
    // sum is the NaN probe.
    auto step = [&](const Vec& v, const Vec& cur, int k) {
      sum[k] += v;
      ix[k] = where_greater(v, mx[k], cur, ix[k]);
      mx[k] = clamp_min(v, mx[k]);
    };
    int64_t s0 = 0;
    for (; s0 + 8 <= S; s0 += 8) {
      prefetch_batch(x, pf, s0, s0 + 8);
      for (int k = 0; k < K; ++k) {
        Vec t[8];
        load_tile(x + k * V * S + s0, S, t);
        for (int j = 0; j < 8; ++j) step(t[j], Vec(static_cast<acc_t>(s0 + j)), k);
      }
    }
    if (s0 < S) {
      // The last tile overlaps the previous one; its first columns were already counted.
      const int64_t base = S - 8;
      prefetch_batch(x, pf, s0, S);
      for (int k = 0; k < K; ++k) {
        Vec t[8];
        load_tile(x + k * V * S + base, S, t);
        for (int64_t j = s0 - base; j < 8; ++j) step(t[j], Vec(static_cast<acc_t>(base + j)), k);
      }
    }
    for (int k = 0; k < K; ++k) {
      sum[k].store(sums + k * V);
      mx[k].store(maxima + k * V);
      ix[k].store(indices + k * V);
    }
    for (int64_t i = 0; i < kBatch; ++i) {
      if (is_nan(sums[i])) {
        st[i] = reduce_run(x + i * S, S, Power{}, a);
      } else {
        st[i] = {kSum ? sums[i] : acc_t(0), acc_t(0), maxima[i], static_cast<int64_t>(indices[i])};
      }
    }
  }
};

}  // namespace

template <Mode kMode, typename scalar_t>
void ncs_forward_sum_max(const scalar_t* x, const ArgsOf<scalar_t>& a,
                         const ForwardOutputs<scalar_t>& o) {
  NcsForward<kMode, scalar_t, NcsSumMaxRun<kMode, scalar_t>>::run(x, a, o);
}

#define GK_INSTANTIATE(mode, T) \
  template void ncs_forward_sum_max<mode, T>(const T*, const ArgsOf<T>&, const ForwardOutputs<T>&);
#define GK_INSTANTIATE_MODES(T) GK_CPU_FOR_SUM_MAX_MODES(GK_INSTANTIATE, T)
GK_CPU_FOR_DTYPES(GK_INSTANTIATE_MODES)

// Token pooling's run loop (cpu/token.h).
template <Mode kMode, typename scalar_t>
Partial<acc_type<scalar_t>> ncs_run_sum_max(const scalar_t* x, int64_t len, int64_t,
                                            const ArgsOf<scalar_t>& a) {
  return NcsSumMaxRun<kMode, scalar_t>::reduce_run(x, len, {}, a);
}

#define GK_INSTANTIATE_RUN(mode, T)                                                  \
  template Partial<acc_type<T>> ncs_run_sum_max<mode, T>(const T*, int64_t, int64_t, \
                                                         const ArgsOf<T>&);
#define GK_INSTANTIATE_RUN_MODES(T) GK_CPU_FOR_SUM_MAX_MODES(GK_INSTANTIATE_RUN, T)
GK_CPU_FOR_DTYPES(GK_INSTANTIATE_RUN_MODES)

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gapkernels
