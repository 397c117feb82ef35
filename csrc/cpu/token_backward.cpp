// Token pooling's backward on the CPU (cpu/token.h): grad_x written once, the pooling backward's
// values (backward.h, with the row's count for S) at the positions that take part, 0 elsewhere.
//   NCS: each (row, channel) in parallel; the runs of positions that take part with the NCS
//        backward's run loop, zeros between them.
//   NSC: each (row, block of its rows) in parallel, vectorized over C; then the max's element of
//        each channel is set (A + B) where it lies in the block.
// Rows own: padded, the whole sample; varlen, the sequence [origin, end) (the host zeroes grad_x
// first when the rows do not cover it).
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/backward.h"
#include "cpu/kernels.h"
#include "cpu/layout.h"
#include "cpu/stats.h"
#include "cpu/token.h"
#include "cpu/vec.h"

namespace gapkernels {
namespace cpu {
inline namespace CPU_CAPABILITY {
namespace {

template <typename scalar_t>
inline void zero(scalar_t* p, int64_t count) {
  if (count > 0) std::memset(static_cast<void*>(p), 0, count * sizeof(scalar_t));
}

template <Mode kMode, typename scalar_t>
struct TokenBackward {
  GK_CPU_KERNEL_TYPES(kMode, scalar_t);
  using Math = GradMath<kMode, scalar_t>;
  using Grad = GradInputs<scalar_t>;

  // Coefficients of channels [c0, c0 + count) of row b (count <= kBatch; A, B hold kBatch).
  static void coefficients(const Args& a, const Grad& g, int64_t b, int64_t row_count, int64_t c0,
                           int64_t count, acc_t* A, acc_t* B, int64_t* index) {
    Args ab = a;
    ab.S = std::max<int64_t>(row_count, 1);
    Math::row_coefficients(ab, g, b * a.C + c0, count, A, B, index);
  }

  static void ncs(const scalar_t* x, scalar_t* gx, const TokenArgs& t, const Args& a,
                  const Grad& g) {
    const int64_t C = a.C, S = a.S;
    torch::stable::parallel_for(0, t.B * C, kBatch, [&](int64_t begin, int64_t end) {
      GK_ALIGNED acc_t A[kBatch], B[kBatch];
      int64_t index[kBatch];
      Runs runs;
      int64_t runs_of = -1;
      for (int64_t r0 = begin; r0 < end;) {
        const int64_t b = r0 / C;
        const int64_t c0 = r0 - b * C;
        const int64_t count = std::min({kBatch, end - r0, C - c0});
        if (runs_of != b) {
          collect_runs(t.mask ? t.mask + b * S : nullptr, t.begin(b), t.end(b), kTokenRunPiece,
                       runs);
          runs_of = b;
        }
        const bool empty = t.count(b) <= 0 || runs.empty();
        if (!empty) coefficients(a, g, b, t.count(b), c0, count, A, B, index);
        for (int64_t i = 0; i < count; ++i) {
          const int64_t r = b * C + c0 + i;
          scalar_t* gr = gx + r * S;
          const int64_t at_index = kMax && !empty ? t.origin(b) + index[i] : -1;
          int64_t done = 0;  // grad_x[0, done) is written
          if (!empty) {
            for (const auto& [s0, s1] : runs) {
              zero(gr + done, s0 - done);
              ncs_grad_run<kMode>(gr, x + r * S, s0, s1, A[i], kMax || kGem ? B[i] : acc_t(0),
                                  at_index, c0 + i, a);
              done = s1;
            }
          }
          zero(gr + done, S - done);
        }
        r0 += count;
      }
    });
  }

  // Row s of the sample (C channels) from the channels' coefficients; without the max's term.
  static void nsc_row(const scalar_t* xs, scalar_t* gs, const Args& a, const acc_t* A,
                      const acc_t* B, const acc_t* e, const Power& uniform) {
    const int64_t C = a.C;
    if (C < W) {
      for (int64_t c = 0; c < C; ++c) {
        gs[c] = static_cast<scalar_t>(Math::grad_scalar(
            A[c], kGem ? B[c] : acc_t(0), -1, 0, kGem ? static_cast<acc_t>(xs[c]) : acc_t(0),
            make_exponent(kGem ? e[c] : acc_t(0)), a.eps));
      }
      return;
    }
    const Vec eps(a.eps);
    auto chunk = [&](int64_t c) {
      const Vec Av[2] = {Vec::loadu(A + c), Vec::loadu(A + c + V)};
      Vec out[2];
      if constexpr (kGem) {
        const Vec Bv[2] = {Vec::loadu(B + c), Vec::loadu(B + c + V)};
        if (!a.uniform_p) {
          const Power per_channel{-1, acc_t(0), {Vec::loadu(e + c), Vec::loadu(e + c + V)}};
          Math::template grad_chunk<kPowExp>(Av, Bv, xs + c, per_channel, eps, out);
        } else if (uniform.integral >= 0) {
          Math::template grad_chunk<kPowRuntimeInt>(Av, Bv, xs + c, uniform, eps, out);
        } else {
          Math::template grad_chunk<kPowExp>(Av, Bv, xs + c, uniform, eps, out);
        }
      } else {
        out[0] = Av[0];
        out[1] = Av[1];
      }
      IO::store(gs + c, out[0], out[1]);
    };
    const int64_t full_end = C - C % W;
    for (int64_t c = 0; c < full_end; c += W) chunk(c);
    // The last chunk overlaps the previous one; those lanes get the same values again.
    if (full_end < C) chunk(C - W);
  }

  static void nsc(const scalar_t* x, scalar_t* gx, const TokenArgs& t, const Args& a,
                  const Grad& g) {
    const int64_t C = a.C, S = a.S;
    const int64_t rows = std::max<int64_t>(ceil_div(kBackwardRowsElements, C), 1);
    // Each output row's own rows [own0, own1) of its sample, cut into blocks.
    auto own = [&](int64_t b, int64_t& own0, int64_t& own1) {
      own0 = t.varlen ? std::clamp<int64_t>(t.origin(b), 0, S) : 0;
      own1 = t.varlen ? std::clamp<int64_t>(t.end(b), own0, S) : S;
    };
    std::vector<int64_t> first(t.B + 1, 0);
    for (int64_t b = 0; b < t.B; ++b) {
      int64_t own0, own1;
      own(b, own0, own1);
      first[b + 1] = first[b] + std::max<int64_t>(1, ceil_div(own1 - own0, rows));
    }
    const Power uniform = kGem ? a.grad_power_of(0) : Power{};
    torch::stable::parallel_for(0, first[t.B], 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> A(C + kBatch), B(C + kBatch), e(kGem ? C : 0);
      std::vector<int64_t> index(C + kBatch);
      if constexpr (kGem) {
        for (int64_t c = 0; c < C; ++c) e[c] = a.param(c) - acc_t(1);
      }
      int64_t b = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
      int64_t coefficients_of = -1;
      for (int64_t task = begin; task < end; ++task) {
        while (first[b + 1] <= task) ++b;
        int64_t own0, own1;
        own(b, own0, own1);
        const int64_t s0 = own0 + (task - first[b]) * rows;
        const int64_t s1 = std::min(own1, s0 + rows);
        const int64_t n = t.sample(b);
        const scalar_t* xn = x + n * S * C;
        scalar_t* gn = gx + n * S * C;
        const int64_t lo = std::max(t.begin(b), s0), hi = std::min(t.end(b), s1);
        if (t.count(b) <= 0 || hi <= lo) {
          zero(gn + s0 * C, (s1 - s0) * C);
          continue;
        }
        if (coefficients_of != b) {
          for (int64_t c0 = 0; c0 < C; c0 += kBatch) {
            coefficients(a, g, b, t.count(b), c0, std::min(kBatch, C - c0), A.data() + c0,
                         B.data() + c0, index.data() + c0);
          }
          coefficients_of = b;
        }
        const bool* mask = t.mask ? t.mask + n * S : nullptr;
        zero(gn + s0 * C, (lo - s0) * C);
        for (int64_t s = lo; s < hi; ++s) {
          if (mask && !mask[s]) {
            zero(gn + s * C, C);
          } else {
            nsc_row(xn + s * C, gn + s * C, a, A.data(), B.data(), e.data(), uniform);
          }
        }
        zero(gn + hi * C, (s1 - hi) * C);
        if constexpr (kMax) {
          for (int64_t c = 0; c < C; ++c) {
            const int64_t s = t.origin(b) + index[c];
            if (index[c] >= 0 && s >= lo && s < hi)
              gn[s * C + c] = static_cast<scalar_t>(A[c] + B[c]);
          }
        }
      }
    });
  }
};

}  // namespace

template <Mode kMode, typename scalar_t>
void token_backward(const scalar_t* x, scalar_t* grad_x, bool channels_last, const TokenArgs& t,
                    const ArgsOf<scalar_t>& a, const GradInputs<scalar_t>& g) {
  if (channels_last) {
    TokenBackward<kMode, scalar_t>::nsc(x, grad_x, t, a, g);
  } else {
    TokenBackward<kMode, scalar_t>::ncs(x, grad_x, t, a, g);
  }
}

#define GK_INSTANTIATE(mode, T)                                                                 \
  template void token_backward<mode, T>(const T*, T*, bool, const TokenArgs&, const ArgsOf<T>&, \
                                        const GradInputs<T>&);
#define GK_INSTANTIATE_MODES(T) GK_CPU_FOR_MODES(GK_INSTANTIATE, T)
GK_CPU_FOR_DTYPES(GK_INSTANTIATE_MODES)

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gapkernels
