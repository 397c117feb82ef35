// NSC backward: grad_x written once, vectorized over C (a chunk overlapping the last full one at
// the end of a row), in blocks of rows with the per-channel coefficients cached per sample. The
// math is backward.h's.
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/backward.h"
#include "cpu/kernels.h"
#include "cpu/layout.h"
#include "cpu/stats.h"
#include "cpu/vec.h"

namespace gapkernels {
namespace cpu {
inline namespace CPU_CAPABILITY {
namespace {

template <Mode kMode, typename scalar_t>
struct NscBackward {
  GK_CPU_KERNEL_TYPES(kMode, scalar_t);
  using Math = GradMath<kMode, scalar_t>;
  using Grad = GradInputs<scalar_t>;

  static void run(const scalar_t* x, scalar_t* gx, const Args& a, const Grad& g) {
    const int64_t N = a.N, C = a.C, S = a.S;
    const Pieces blocks = nsc_backward_blocks(C, S);
    const int64_t rows = blocks.length;
    // GeM's exponent p - 1, when the same for every channel.
    const Power uniform = kGem ? a.grad_power_of(0) : Power{};
    torch::stable::parallel_for(0, N * blocks.count, 1, [&](int64_t begin, int64_t end) {
      // e: each channel's p - 1.
      std::vector<acc_t> A(C + kBatch), B(C + kBatch), e(kGem ? C : 0);
      std::vector<int64_t> index(C + kBatch);
      int64_t coefficients_of = -1;
      // The constant modes: the sample's converted rows of A (plain) and A + B (hit).
      std::vector<scalar_t> plain(kGem ? 0 : C), hit(kMax ? C : 0);
      std::vector<char> stage;
      int64_t converted_of = -1;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / blocks.count;
        const int64_t s0 = (t - n * blocks.count) * rows;
        const int64_t s1 = std::min(S, s0 + rows);
        if (coefficients_of != n) {
          for (int64_t c0 = 0; c0 < C; c0 += kBatch) {
            Math::row_coefficients(a, g, n * C + c0, std::min(kBatch, C - c0), A.data() + c0,
                                   B.data() + c0, index.data() + c0);
          }
          coefficients_of = n;
          if constexpr (kGem) {
            for (int64_t c = 0; c < C; ++c) e[c] = a.param(c) - acc_t(1);
          }
        }
        const scalar_t* xn = x + n * S * C;
        scalar_t* gn = gx + n * S * C;
        if (C < W) {
          for (int64_t s = s0; s < s1; ++s) {
            for (int64_t c = 0; c < C; ++c) {
              gn[s * C + c] = static_cast<scalar_t>(
                  Math::grad_scalar(A[c], kMax || kGem ? B[c] : acc_t(0), kMax ? index[c] : -1, s,
                                    kGem ? static_cast<acc_t>(xn[s * C + c]) : acc_t(0),
                                    make_exponent(kGem ? e[c] : acc_t(0)), a.eps));
            }
          }
          continue;
        }
        const int64_t full_end = C - C % W;
        if constexpr (!kGem) {
          // Each row is the sample's row of converted A, but at the channels whose index it is
          // (max modes), which get A + B: a copy, then those elements.
          if (converted_of != n) {
            auto convert = [&](int64_t c) {
              const Vec Av[2] = {Vec::loadu(A.data() + c), Vec::loadu(A.data() + c + V)};
              const Vec Bv[2] = {Vec::loadu(B.data() + c), Vec::loadu(B.data() + c + V)};
              GK_ALIGNED scalar_t hit_chunk[W];
              Math::constant_chunks(Av, Bv, plain.data() + c, hit_chunk);
              if constexpr (kMax) std::memcpy(hit.data() + c, hit_chunk, sizeof(hit_chunk));
            };
            for (int64_t c = 0; c < full_end; c += W) convert(c);
            if (full_end < C) convert(C - W);
            converted_of = n;
          }
          copy_to_rows(plain.data(), C, gn + s0 * C, C, s1 - s0, stage);
          if constexpr (kMax) {
            for (int64_t c = 0; c < C; ++c) {
              if (index[c] >= s0 && index[c] < s1) gn[index[c] * C + c] = hit[c];
            }
          }
        } else {
          const Vec eps(a.eps);
          auto chunk = [&](int64_t s, int64_t c) {
            const Vec Av[2] = {Vec::loadu(A.data() + c), Vec::loadu(A.data() + c + V)};
            const Vec Bv[2] = {Vec::loadu(B.data() + c), Vec::loadu(B.data() + c + V)};
            Vec out[2];
            const scalar_t* xc = xn + s * C + c;
            if (!a.uniform_p) {
              const Power per_channel{
                  -1, acc_t(0), {Vec::loadu(e.data() + c), Vec::loadu(e.data() + c + V)}};
              Math::template grad_chunk<kPowExp>(Av, Bv, xc, per_channel, eps, out);
            } else if (uniform.integral >= 0) {
              Math::template grad_chunk<kPowRuntimeInt>(Av, Bv, xc, uniform, eps, out);
            } else {
              Math::template grad_chunk<kPowExp>(Av, Bv, xc, uniform, eps, out);
            }
            IO::store(gn + s * C + c, out[0], out[1]);
          };
          for (int64_t s = s0; s < s1; ++s) {
            for (int64_t c = 0; c < full_end; c += W) chunk(s, c);
            // The last chunk overlaps the previous one; those lanes get the same values again.
            if (full_end < C) chunk(s, C - W);
          }
        }
      }
    });
  }
};

}  // namespace

template <Mode kMode, typename scalar_t>
void nsc_backward(const scalar_t* x, scalar_t* grad_x, const ArgsOf<scalar_t>& a,
                  const GradInputs<scalar_t>& g) {
  NscBackward<kMode, scalar_t>::run(x, grad_x, a, g);
}

#define GK_INSTANTIATE(mode, T) \
  template void nsc_backward<mode, T>(const T*, T*, const ArgsOf<T>&, const GradInputs<T>&);
#define GK_INSTANTIATE_MODES(T) GK_CPU_FOR_MODES(GK_INSTANTIATE, T)
GK_CPU_FOR_DTYPES(GK_INSTANTIATE_MODES)

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gapkernels
