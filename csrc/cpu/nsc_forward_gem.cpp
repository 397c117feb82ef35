// NSC forward of GeM: vectorized over C, each channel relative to its running maximum (gem.h),
// with per-channel accumulators in a per-task buffer. The driver is nsc_forward.h's.
#include <torch/csrc/stable/ops.h>

#include <cstdint>
#include <type_traits>

#include "cpu/gem.h"
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

template <typename scalar_t>
struct NscGemRun {
  GK_CPU_KERNEL_TYPES(Mode::Gem, scalar_t);
  using Buffers = ChannelBuffers<acc_t>;

  // Each channel keeps its running maximum in b.max and its reference in b.ref, raised once per
  // kGemBlockRows rows (read into registers first) before their terms are added.
  template <bool kMasked, int kPow, bool kLog>
  static void reduce_channels(const scalar_t* xn, int64_t, int64_t s0, int64_t s1, int64_t c,
                              const Vec (&mask)[2], const Args& a, const Power& power, Buffers& b) {
    const int64_t C = a.C;
    const Vec eps(a.eps);
    const int n = power.integral;
    const bool per_lane = kPow == kPowExp && !a.uniform_p;
    const Vec p[2] = {per_lane ? Vec::loadu(a.weight + c) : power.vec[0],
                      per_lane ? Vec::loadu(a.weight + c + V) : power.vec[1]};
    const Vec headroom[2] = {gem_headroom(p[0]), gem_headroom(p[1])};
    Vec sum[2][1], log_sum[2][1];
    GemRef<acc_t> g[2];
    for (int k = 0; k < 2; ++k) {
      sum[k][0] = Vec::loadu(b.sum.data() + c + k * V);
      log_sum[k][0] = Vec::loadu(b.log_sum.data() + c + k * V);
      g[k].max = Vec::loadu(b.max.data() + c + k * V);
      g[k].ref = Vec::loadu(b.ref.data() + c + k * V);
      g[k].inv = Vec(acc_t(1)) / g[k].ref;
    }
    auto rows = [&](int64_t r, auto rows_c) {
      constexpr int kRows = decltype(rows_c)::value;
      Vec v[kRows][2];
      for (int i = 0; i < kRows; ++i) IO::load(xn + (r + i) * C + c, v[i][0], v[i][1]);
      for (int k = 0; k < 2; ++k) {
        // Masked lanes (channels of the previous chunk) read 0, which never raises max >= eps.
        Vec block_max = kMasked ? v[0][k] & mask[k] : v[0][k];
        for (int i = 1; i < kRows; ++i) {
          block_max = clamp_min(kMasked ? v[i][k] & mask[k] : v[i][k], block_max);
        }
        gem_grow<kPow, kLog, 1>(block_max, p[k], headroom[k], n, g[k], sum[k], log_sum[k]);
        for (int i = 0; i < kRows; ++i) {
          gem_term<kMasked, kPow, kLog>(v[i][k], mask[k], g[k].inv, p[k], n, eps, sum[k][0],
                                        log_sum[k][0]);
        }
      }
    };
    int64_t r = s0;
    for (; r + kGemBlockRows <= s1; r += kGemBlockRows) {
      rows(r, std::integral_constant<int, kGemBlockRows>());
    }
    for (; r < s1; ++r) rows(r, std::integral_constant<int, 1>());
    for (int k = 0; k < 2; ++k) {
      sum[k][0].store(b.sum.data() + c + k * V);
      log_sum[k][0].store(b.log_sum.data() + c + k * V);
      g[k].max.store(b.max.data() + c + k * V);
      g[k].ref.store(b.ref.data() + c + k * V);
    }
  }

  // Channel c's statistics of rows [s0, s1) of sample xn: the sums moved from the channel's
  // reference to its maximum.
  static inline Stats channel_stats(const Buffers& b, int64_t c, const scalar_t* xn, int64_t s0,
                                    int64_t s1, const Args& a) {
    Stats st{b.sum[c], b.log_sum[c], b.max[c], s0 + static_cast<int64_t>(b.index[c])};
    rescale_sums(a.with_log, b.ref[c], st.max, make_exponent(a.param(c)), st.sum, st.log_sum);
    gem_settle(st, xn + s0 * a.C + c, s1 - s0, a.C);
    return st;
  }
};

}  // namespace

template <typename scalar_t>
void nsc_forward_gem(const scalar_t* x, const ArgsOf<scalar_t>& a,
                     const ForwardOutputs<scalar_t>& o) {
  NscForward<Mode::Gem, scalar_t, NscGemRun<scalar_t>>::run(x, a, o);
}

#define GK_INSTANTIATE(T) \
  template void nsc_forward_gem<T>(const T*, const ArgsOf<T>&, const ForwardOutputs<T>&);
GK_CPU_FOR_DTYPES(GK_INSTANTIATE)

// Token pooling's row loop (cpu/token.h).
template <typename scalar_t>
void nsc_rows_gem(const scalar_t* xn, int64_t s0, int64_t s1, const ArgsOf<scalar_t>& a,
                  ChannelBuffers<acc_type<scalar_t>>& b, Partial<acc_type<scalar_t>>* st) {
  using Run = NscGemRun<scalar_t>;
  NscForward<Mode::Gem, scalar_t, Run>::reduce_rows(xn, s0, s1, a, a.power_of(0), b);
  for (int64_t c = 0; c < a.C; ++c) st[c] = Run::channel_stats(b, c, xn, s0, s1, a);
}

#define GK_INSTANTIATE_ROWS(T)                                                \
  template void nsc_rows_gem<T>(const T*, int64_t, int64_t, const ArgsOf<T>&, \
                                ChannelBuffers<acc_type<T>>&, Partial<acc_type<T>>*);
GK_CPU_FOR_DTYPES(GK_INSTANTIATE_ROWS)

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gapkernels
