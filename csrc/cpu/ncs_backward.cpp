// NCS backward: each (n, c) row of grad_x written once, vectorized along the row (a chunk
// overlapping the last full one at the end); long rows in pieces. The math is backward.h's.
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

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

template <Mode kMode, typename scalar_t>
struct NcsBackward {
  GK_CPU_KERNEL_TYPES(kMode, scalar_t);
  using Math = GradMath<kMode, scalar_t>;
  using Grad = GradInputs<scalar_t>;

  // Writes grad_x[start, end) of one row; e: GeM's exponent p - 1.
  static void grad_run(scalar_t* gx, const scalar_t* x, int64_t start, int64_t end, acc_t A,
                       acc_t B, int64_t index, const Power& e, const Args& a) {
    const int64_t len = end - start;
    gx += start;
    x += start;
    if (len < W) {
      for (int64_t i = 0; i < len; ++i) {
        gx[i] = static_cast<scalar_t>(Math::grad_scalar(
            A, B, index, start + i, kGem ? static_cast<acc_t>(x[i]) : acc_t(0), e.scalar(), a.eps));
      }
      return;
    }
    const Vec Av[2] = {Vec(A), Vec(A)};
    const Vec Bv[2] = {Vec(B), Vec(B)};
    if constexpr (!kGem) {
      // One converted chunk, copied along the row, and the element at index.
      GK_ALIGNED scalar_t plain[W], hit[W];
      Math::constant_chunks(Av, Bv, plain, hit);
      fill_run<sizeof(plain)>(gx, len, plain);
      if (kMax && index >= start && index < end) gx[index - start] = hit[0];
    } else {
      const Vec eps(a.eps);
      auto rows = [&](auto pow_c) {
        constexpr int kPow = decltype(pow_c)::value;
        Vec out[2];
        int64_t i = 0;
        for (; i + W <= len; i += W) {
          Math::template grad_chunk<kPow>(Av, Bv, x + i, e, eps, out);
          IO::store(gx + i, out[0], out[1]);
        }
        if (i < len) {
          // The last chunk overlaps the previous one; those lanes get the same values again.
          Math::template grad_chunk<kPow>(Av, Bv, x + len - W, e, eps, out);
          IO::store(gx + len - W, out[0], out[1]);
        }
      };
      dispatch_power<0>(e.integral, false, rows);
    }
  }

  static void run(const scalar_t* x, scalar_t* gx, const Args& a, const Grad& g) {
    const int64_t R = a.N * a.C;
    const int64_t S = a.S;
    const Pieces pieces = ncs_backward_pieces(S);
    if (pieces.count == 1) {
      const int64_t grain = std::max<int64_t>(1, kMinTaskElements / S);
      torch::stable::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
        GK_ALIGNED acc_t A[kBatch], B[kBatch];
        int64_t index[kBatch];
        for (int64_t r0 = begin; r0 < end; r0 += kBatch) {
          const int64_t count = std::min(kBatch, end - r0);
          Math::row_coefficients(a, g, r0, count, A, B, index);
          int64_t c = r0 % a.C;
          for (int64_t i = 0; i < count; ++i) {
            const int64_t r = r0 + i;
            const Power e = kGem ? a.grad_power_of(c) : Power{};
            grad_run(gx + r * S, x + r * S, 0, S, A[i], kMax || kGem ? B[i] : acc_t(0),
                     kMax ? index[i] : -1, e, a);
            if (++c == a.C) c = 0;
          }
        }
      });
      return;
    }
    const int64_t P = pieces.count;
    torch::stable::parallel_for(0, R * P, 1, [&](int64_t begin, int64_t end) {
      GK_ALIGNED acc_t A[kBatch], B[kBatch];
      int64_t index[kBatch];
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r = t / P;
        const int64_t start = (t - r * P) * pieces.length;
        Math::row_coefficients(a, g, r, 1, A, B, index);
        const Power e = kGem ? a.grad_power_of(r % a.C) : Power{};
        grad_run(gx + r * S, x + r * S, start, std::min(S, start + pieces.length), A[0],
                 kMax || kGem ? B[0] : acc_t(0), kMax ? index[0] : -1, e, a);
      }
    });
  }
};

}  // namespace

template <Mode kMode, typename scalar_t>
void ncs_backward(const scalar_t* x, scalar_t* grad_x, const ArgsOf<scalar_t>& a,
                  const GradInputs<scalar_t>& g) {
  NcsBackward<kMode, scalar_t>::run(x, grad_x, a, g);
}

#define GK_INSTANTIATE(mode, T) \
  template void ncs_backward<mode, T>(const T*, T*, const ArgsOf<T>&, const GradInputs<T>&);
#define GK_INSTANTIATE_MODES(T) GK_CPU_FOR_MODES(GK_INSTANTIATE, T)
GK_CPU_FOR_DTYPES(GK_INSTANTIATE_MODES)

// Token pooling's run loop (cpu/token.h).
template <Mode kMode, typename scalar_t>
void ncs_grad_run(scalar_t* gx, const scalar_t* x, int64_t start, int64_t end, acc_type<scalar_t> A,
                  acc_type<scalar_t> B, int64_t index, int64_t c, const ArgsOf<scalar_t>& a) {
  using Run = NcsBackward<kMode, scalar_t>;
  Run::grad_run(gx, x, start, end, A, B, index,
                kMode == Mode::Gem ? a.grad_power_of(c) : ChunkPower<acc_type<scalar_t>>{}, a);
}

#define GK_INSTANTIATE_RUN(mode, T)                                                             \
  template void ncs_grad_run<mode, T>(T*, const T*, int64_t, int64_t, acc_type<T>, acc_type<T>, \
                                      int64_t, int64_t, const ArgsOf<T>&);
#define GK_INSTANTIATE_RUN_MODES(T) GK_CPU_FOR_MODES(GK_INSTANTIATE_RUN, T)
GK_CPU_FOR_DTYPES(GK_INSTANTIATE_RUN_MODES)

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gapkernels
