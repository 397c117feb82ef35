// NSC forward of the sum and max modes (avg, max, mixed, cat): vectorized over C, with
// per-channel accumulators in a per-task buffer. The driver is nsc_forward.h's; the max rule is
// pool_math.h's scan_max, per lane (vec_scan_max).
#include <torch/csrc/stable/ops.h>

#include <cstdint>
#include <type_traits>

#include "cpu/kernels.h"
#include "cpu/layout.h"
#include "cpu/nsc_forward.h"
#include "cpu/stats.h"
#include "cpu/token.h"
#include "cpu/vec.h"

namespace gapkernels {
namespace cpu {
inline namespace CPU_CAPABILITY {
namespace {

template <Mode kMode, typename scalar_t>
struct NscSumMaxRun {
  GK_CPU_KERNEL_TYPES(kMode, scalar_t);
  static_assert(!kGem, "GeM is nsc_forward_gem.cpp's");
  using Buffers = ChannelBuffers<acc_t>;

  // Folds channels [c, c + W) of rows [s0, s1) into the channel buffers: the sums (avg), or the
  // max modes' reduce_channels_max.
  template <bool kMasked, int kPow, bool kLog>
  static void reduce_channels(const scalar_t* xn, int64_t piece_start, int64_t s0, int64_t s1,
                              int64_t c, const Vec (&mask)[2], const Args& a, const Power&,
                              Buffers& b) {
    if constexpr (kMax) {
      reduce_channels_max<kMasked>(xn, piece_start, s0, s1, c, mask, a.C, a.with_index, b);
    } else {
      const int64_t C = a.C;
      Vec sum[2];
      for (int k = 0; k < 2; ++k) sum[k] = Vec::loadu(b.sum.data() + c + k * V);
      Vec v[2];
      for (int64_t r = s0; r < s1; ++r) {
        IO::load(xn + r * C + c, v[0], v[1]);
        for (int k = 0; k < 2; ++k) sum[k] += kMasked ? (v[k] & mask[k]) : v[k];
      }
      for (int k = 0; k < 2; ++k) sum[k].store(b.sum.data() + c + k * V);
    }
  }

  // The max modes' version. Without NaNs the scan step is a strict compare, a max keeping the
  // old value on ties and an index blend; a NaN probe (a sum, which any NaN turns into NaN; a
  // false alarm only costs time) or a NaN running max tells when the block (now in L1) must be
  // scanned again with the exact rule, from the state before it. Without with_index the blend is
  // left out (the indices stay as they were).
  template <bool kMasked>
  static void reduce_channels_max(const scalar_t* xn, int64_t piece_start, int64_t s0, int64_t s1,
                                  int64_t c, const Vec (&mask)[2], int64_t C, bool with_index,
                                  Buffers& b) {
    Vec probe[2], mx[2], ix[2];
    for (int k = 0; k < 2; ++k) {
      probe[k] = kSum ? Vec::loadu(b.sum.data() + c + k * V) : Vec(acc_t(0));
      mx[k] = Vec::loadu(b.max.data() + c + k * V);
      ix[k] = Vec::loadu(b.index.data() + c + k * V);
    }
    const Vec mx0[2] = {mx[0], mx[1]}, ix0[2] = {ix[0], ix[1]};
    Vec v[2];
    auto scan = [&](auto index_constant) {
      constexpr bool kIndex = decltype(index_constant)::value;
      for (int64_t r = s0; r < s1; ++r) {
        IO::load(xn + r * C + c, v[0], v[1]);
        const Vec cur(static_cast<acc_t>(r - piece_start));
        for (int k = 0; k < 2; ++k) {
          probe[k] += kMasked ? (v[k] & mask[k]) : v[k];
          const Vec value = kMasked ? masked_for_max(v[k], mask[k]) : v[k];
          if constexpr (kIndex) ix[k] = where_greater(value, mx[k], cur, ix[k]);
          mx[k] = clamp_min(mx[k], value);
        }
      }
    };
    if (with_index) {
      scan(std::true_type{});
    } else {
      scan(std::false_type{});
    }
    if constexpr (kSum) {
      for (int k = 0; k < 2; ++k) probe[k].store(b.sum.data() + c + k * V);
    }
    const Vec nan = probe[0].isnan() | probe[1].isnan() | mx0[0].isnan() | mx0[1].isnan();
    if (any(nan)) {
      for (int k = 0; k < 2; ++k) {
        mx[k] = mx0[k];
        ix[k] = ix0[k];
      }
      for (int64_t r = s0; r < s1; ++r) {
        IO::load(xn + r * C + c, v[0], v[1]);
        const Vec cur(static_cast<acc_t>(r - piece_start));
        for (int k = 0; k < 2; ++k) vec_scan_max<kMasked>(v[k], cur, mask[k], mx[k], ix[k]);
      }
    }
    for (int k = 0; k < 2; ++k) {
      mx[k].store(b.max.data() + c + k * V);
      ix[k].store(b.index.data() + c + k * V);
    }
  }

  // Channel c's statistics of rows [s0, s1).
  static inline Stats channel_stats(const Buffers& b, int64_t c, const scalar_t*, int64_t s0,
                                    int64_t, const Args&) {
    return {b.sum[c], b.log_sum[c], b.max[c], s0 + static_cast<int64_t>(b.index[c])};
  }
};

}  // namespace

template <Mode kMode, typename scalar_t>
void nsc_forward_sum_max(const scalar_t* x, const ArgsOf<scalar_t>& a,
                         const ForwardOutputs<scalar_t>& o) {
  NscForward<kMode, scalar_t, NscSumMaxRun<kMode, scalar_t>>::run(x, a, o);
}

#define GK_INSTANTIATE(mode, T) \
  template void nsc_forward_sum_max<mode, T>(const T*, const ArgsOf<T>&, const ForwardOutputs<T>&);
#define GK_INSTANTIATE_MODES(T) GK_CPU_FOR_SUM_MAX_MODES(GK_INSTANTIATE, T)
GK_CPU_FOR_DTYPES(GK_INSTANTIATE_MODES)

// Token pooling's row loop (cpu/token.h).
template <Mode kMode, typename scalar_t>
void nsc_rows_sum_max(const scalar_t* xn, int64_t s0, int64_t s1, const ArgsOf<scalar_t>& a,
                      ChannelBuffers<acc_type<scalar_t>>& b, Partial<acc_type<scalar_t>>* st) {
  using Run = NscSumMaxRun<kMode, scalar_t>;
  NscForward<kMode, scalar_t, Run>::reduce_rows(xn, s0, s1, a, {}, b);
  for (int64_t c = 0; c < a.C; ++c) st[c] = Run::channel_stats(b, c, xn, s0, s1, a);
}

#define GK_INSTANTIATE_ROWS(mode, T)                                                    \
  template void nsc_rows_sum_max<mode, T>(const T*, int64_t, int64_t, const ArgsOf<T>&, \
                                          ChannelBuffers<acc_type<T>>&, Partial<acc_type<T>>*);
#define GK_INSTANTIATE_ROWS_MODES(T) GK_CPU_FOR_SUM_MAX_MODES(GK_INSTANTIATE_ROWS, T)
GK_CPU_FOR_DTYPES(GK_INSTANTIATE_ROWS_MODES)

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gapkernels
