// The NCS forward's driver, shared by its statistics (ncs_forward.cpp: sum and max;
// ncs_forward_gem.cpp: GeM): rows in batches, or pieces of long rows merged in order, or short
// rows one per vector lane (8x8 transposed tiles). `Run` reduces: Run::reduce_run(x, len, power,
// a), the statistics of one contiguous run; Run::reduce_lanes(x, r0, a, st), those of kBatch
// short rows at once (when kLanes).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/finish.h"
#include "cpu/layout.h"
#include "cpu/stats.h"
#include "cpu/vec.h"

namespace gapkernels {
namespace cpu {
inline namespace CPU_CAPABILITY {

// Short runs are reduced kBatch rows at a time with one row per vector lane, so that every
// statistic is a vertical operation and no row pays for horizontal reductions. AVG gains
// nothing from it (measured: slower than its plain run loop).
template <Mode kMode, typename scalar_t>
constexpr bool kLanes = kMode != Mode::Avg && std::is_same_v<at::opmath_type<scalar_t>, float> &&
                        Vectorized<float>::size() == 8 && kBatch == 16;

// 8 elements of a row as floats.
template <typename scalar_t>
C10_ALWAYS_INLINE Vectorized<float> load_row8(const scalar_t* p) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<scalar_t, at::Half>) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {
    const __m256i wide =
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
#else
  __at_align__ float buf[8];
  for (int j = 0; j < 8; ++j) buf[j] = static_cast<float>(p[j]);
  return Vectorized<float>::loadu(buf);
#endif
}

// t[j] lane l = x[l * stride + j], for l, j < 8.
template <typename scalar_t>
C10_ALWAYS_INLINE void load_tile(const scalar_t* x, int64_t stride, Vectorized<float> (&t)[8]) {
#if defined(CPU_CAPABILITY_AVX2)
  __m256 r[8];
  for (int l = 0; l < 8; ++l) r[l] = load_row8(x + l * stride);
  __m256 lo[4], hi[4], u[8];
  for (int q = 0; q < 4; ++q) {
    lo[q] = _mm256_unpacklo_ps(r[2 * q], r[2 * q + 1]);
    hi[q] = _mm256_unpackhi_ps(r[2 * q], r[2 * q + 1]);
  }
  for (int h = 0; h < 2; ++h) {
    u[4 * h + 0] = _mm256_shuffle_ps(lo[2 * h], lo[2 * h + 1], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * h + 1] = _mm256_shuffle_ps(lo[2 * h], lo[2 * h + 1], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * h + 2] = _mm256_shuffle_ps(hi[2 * h], hi[2 * h + 1], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * h + 3] = _mm256_shuffle_ps(hi[2 * h], hi[2 * h + 1], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
    t[j + 4] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
  }
#else
  __at_align__ float buf[8][8];
  for (int l = 0; l < 8; ++l) {
    for (int j = 0; j < 8; ++j) buf[j][l] = static_cast<float>(x[l * stride + j]);
  }
  for (int j = 0; j < 8; ++j) t[j] = Vectorized<float>::loadu(buf[j]);
#endif
}

template <Mode kMode, typename scalar_t, typename Run>
struct NcsForward {
  GK_CPU_KERNEL_TYPES(kMode, scalar_t);
  using Outputs = ForwardOutputs<scalar_t>;
  using Fin = Finish<kMode, scalar_t>;

  static Power power_of(const Args& a, int64_t c) { return kGem ? a.power_of(c) : Power{}; }

  static void run(const scalar_t* x, const Args& a, const Outputs& o) {
    const int64_t R = a.N * a.C;
    const int64_t S = a.S;
    const Pieces pieces = ncs_forward_pieces(R, S);
    if constexpr (kLanes<kMode, scalar_t>) {
      if (pieces.count == 1 && S >= 8 && S <= kMaxLaneRun) return run_lanes(x, a, o);
    }
    if (pieces.count == 1) {
      const int64_t grain = std::max<int64_t>(1, kMinTaskElements / S);
      at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
        Stats st[kBatch];
        for (int64_t r0 = begin; r0 < end; r0 += kBatch) {
          const int64_t count = std::min(kBatch, end - r0);
          int64_t c = r0 % a.C;
          for (int64_t i = 0; i < count; ++i) {
            st[i] = Run::reduce_run(x + (r0 + i) * S, S, power_of(a, c), a);
            if (++c == a.C) c = 0;
          }
          Fin::finalize(a, o, r0, count, st);
        }
      });
      return;
    }
    const int64_t P = pieces.count;
    std::vector<Stats> parts(R * P);
    at::parallel_for(0, R * P, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r = t / P;
        const int64_t start = (t - r * P) * pieces.length;
        const int64_t len = std::min(S, start + pieces.length) - start;
        Stats st = Run::reduce_run(x + r * S + start, len, power_of(a, r % a.C), a);
        st.index += start;
        parts[t] = st;
      }
    });
    at::parallel_for(0, R, kBatch, [&](int64_t begin, int64_t end) {
      Fin::merge_and_finalize(a, o, parts, P, begin, end);
    });
  }

  // One row per vector lane, kBatch rows at a time; a partial last group row by row.
  static void run_lanes(const scalar_t* x, const Args& a, const Outputs& o) {
    const int64_t R = a.N * a.C;
    const int64_t S = a.S;
    const int64_t groups = ceil_div(R, kBatch);
    const int64_t grain = std::max<int64_t>(1, kMinTaskElements / (kBatch * S));
    at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
      Stats st[kBatch];
      for (int64_t g = begin; g < end; ++g) {
        const int64_t r0 = g * kBatch;
        const int64_t count = std::min(kBatch, R - r0);
        if (count == kBatch) {
          Run::reduce_lanes(x + r0 * S, r0, a, st);
        } else {
          for (int64_t i = 0, c = r0 % a.C; i < count; ++i) {
            st[i] = Run::reduce_run(x + (r0 + i) * S, S, power_of(a, c), a);
            if (++c == a.C) c = 0;
          }
        }
        Fin::finalize(a, o, r0, count, st);
      }
    });
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gapkernels
