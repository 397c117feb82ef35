// The NSC forward's driver, shared by its statistics (nsc_forward.cpp: sum and max;
// nsc_forward_gem.cpp: GeM): each task reduces rows [s0, s1) of one sample into per-channel
// buffers, kRowBlock rows at a time over chunks of W channels (a masked tail chunk overlapping
// the last full one), then finalizes the channels or keeps them as a piece to merge.
// `Run` reduces: Run::reduce_channels<kMasked, kPow, kLog>(xn, piece_start, s0, s1, c, mask, a,
// power, b) folds channels [c, c + W) of rows [s0, s1) into the buffers; Run::channel_stats(b, c,
// xn, s0, s1, a) reads a channel's statistics out of them.
#pragma once

#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/finish.h"
#include "cpu/layout.h"
#include "cpu/stats.h"
#include "cpu/vec.h"

namespace gapkernels {
namespace cpu {
inline namespace CPU_CAPABILITY {

// A task's per-channel statistics (indices as floats, relative to the piece's first row).
template <typename acc_t>
struct ChannelBuffers {
  // ref: GEM's references (see gem.h); empty for the other modes.
  std::vector<acc_t> sum, log_sum, max, index, ref;
  ChannelBuffers(int64_t C, bool with_ref)
      : sum(C), log_sum(C), max(C), index(C), ref(with_ref ? C : 0) {}
  // GEM's running maxima start at eps, the max modes' at -inf.
  void reset(acc_t max_start) {
    std::fill(sum.begin(), sum.end(), acc_t(0));
    std::fill(log_sum.begin(), log_sum.end(), acc_t(0));
    std::fill(max.begin(), max.end(), max_start);
    std::fill(index.begin(), index.end(), acc_t(0));
    std::fill(ref.begin(), ref.end(), max_start);
  }
};

template <Mode kMode, typename scalar_t, typename Run>
struct NscForward {
  GK_CPU_KERNEL_TYPES(kMode, scalar_t);
  using Outputs = ForwardOutputs<scalar_t>;
  using Buffers = ChannelBuffers<acc_t>;
  using Fin = Finish<kMode, scalar_t>;

  // Accumulates rows [s0, s1) of sample xn (S x C, C contiguous) into the channel buffers;
  // buffer indices are relative to s0.
  static void reduce_rows(const scalar_t* xn, int64_t s0, int64_t s1, const Args& a,
                          const Power& uniform, Buffers& b) {
    const int64_t C = a.C;
    b.reset(kGem ? a.eps : -std::numeric_limits<acc_t>::infinity());
    if (C < W) {
      for (int64_t s = s0; s < s1; ++s) {
        const scalar_t* row = xn + s * C;
        for (int64_t c = 0; c < C; ++c) {
          int64_t index = static_cast<int64_t>(b.index[c]);
          Statistic<kMode, scalar_t>::scan_scalar(static_cast<acc_t>(row[c]), s - s0,
                                                  make_exponent(a.param(c)), a.eps, a.with_log,
                                                  b.sum[c], b.log_sum[c], b.max[c], index);
          b.index[c] = static_cast<acc_t>(index);
        }
      }
      // GEM: the scalar steps keep the sums relative to the maximum itself.
      if constexpr (kGem) std::copy(b.max.begin(), b.max.end(), b.ref.begin());
      return;
    }
    const int64_t tail = C % W;
    const int64_t full_end = C - tail;
    Vec mask[2];
    tail_mask(tail, mask);
    // A block's rows lie kRowBlock apart in the loops below, too many streams for the hardware
    // prefetchers: the next block (contiguous, and past s1 the next piece or sample, which
    // follows in memory) is prefetched into L2 in address order, one slice per chunk of
    // channels, while this one is reduced.
    const int64_t block_bytes = kRowBlock * C * static_cast<int64_t>(sizeof(scalar_t));
    const auto slice =
        static_cast<uintptr_t>(ceil_div(ceil_div(block_bytes, ceil_div(C, W)), 64) * 64);
    Statistic<kMode, scalar_t>::with_power(
        uniform, !a.uniform_p, a.with_log, [&](auto pow_c, auto log_c) {
          constexpr int kPow = decltype(pow_c)::value;
          constexpr bool kLog = decltype(log_c)::value;
          for (int64_t s = s0; s < s1; s += kRowBlock) {
            const int64_t s_end = std::min(s1, s + kRowBlock);
            // Integer arithmetic: the addresses may lie past the end of x.
            uintptr_t next = reinterpret_cast<uintptr_t>(xn) +
                             static_cast<uintptr_t>(s_end * C) * sizeof(scalar_t);
            const uintptr_t next_end = next + static_cast<uintptr_t>(block_bytes);
            for (int64_t c = 0; c < full_end; c += W) {
              prefetch_l2(next, std::min(next + slice, next_end));
              next += slice;
              Run::template reduce_channels<false, kPow, kLog>(xn, s0, s, s_end, c, mask, a,
                                                               uniform, b);
            }
            if (tail) {
              prefetch_l2(next, std::min(next + slice, next_end));
              Run::template reduce_channels<true, kPow, kLog>(xn, s0, s, s_end, C - W, mask, a,
                                                              uniform, b);
            }
          }
        });
  }

  static void run(const scalar_t* x, const Args& a, const Outputs& o) {
    const int64_t N = a.N, C = a.C, S = a.S;
    const Pieces pieces = nsc_forward_pieces(N, C, S);
    const int64_t P = pieces.count;
    const Power uniform = kGem ? a.power_of(0) : Power{};
    std::vector<Stats> parts(P > 1 ? N * P * C : 0);
    torch::stable::parallel_for(0, N * P, 1, [&](int64_t begin, int64_t end) {
      Buffers b(C, kGem);
      Stats st[kBatch];
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / P;
        const int64_t s0 = (t - n * P) * pieces.length;
        const int64_t s1 = std::min(S, s0 + pieces.length);
        const scalar_t* xn = x + n * S * C;
        reduce_rows(xn, s0, s1, a, uniform, b);
        if (P == 1) {
          for (int64_t c0 = 0; c0 < C; c0 += kBatch) {
            const int64_t count = std::min(kBatch, C - c0);
            for (int64_t i = 0; i < count; ++i) {
              st[i] = Run::channel_stats(b, c0 + i, xn, s0, s1, a);
            }
            Fin::finalize(a, o, n * C + c0, count, st);
          }
        } else {
          // parts is ordered (n, c, piece) so that merging reads each row's pieces in a run.
          const int64_t k = t - n * P;
          for (int64_t c = 0; c < C; ++c) {
            parts[(n * C + c) * P + k] = Run::channel_stats(b, c, xn, s0, s1, a);
          }
        }
      }
    });
    if (P > 1) {
      torch::stable::parallel_for(0, N * C, kBatch, [&](int64_t begin, int64_t end) {
        Fin::merge_and_finalize(a, o, parts, P, begin, end);
      });
    }
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gapkernels
