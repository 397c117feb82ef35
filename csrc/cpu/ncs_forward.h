// The NCS forward's driver, shared by its statistics (ncs_forward.cpp: sum and max;
// ncs_forward_gem.cpp: GeM): rows in batches, or pieces of long rows merged in order, or short
// rows one per vector lane (8x8 transposed tiles). `Run` reduces: Run::reduce_run(x, len, power,
// a), the statistics of one contiguous run; Run::reduce_lanes(x, r0, a, st), those of kBatch
// short rows at once (when kLanes).
#pragma once

#include <torch/csrc/stable/ops.h>

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
// statistic is a vertical operation and no row pays for horizontal reductions: kBatch / V vectors
// of V rows (two of 8 rows with 8 floats a vector, one of 16 with 16). AVG gains nothing from it
// (measured: slower than its plain run loop).
constexpr int64_t kLaneRows = Vec<float>::size();
constexpr int64_t kLaneVecs = kBatch / kLaneRows;
template <Mode kMode, typename scalar_t>
constexpr bool kLanes = kMode != Mode::Avg && std::is_same_v<acc_type<scalar_t>, float> &&
                        (kLaneRows == 8 || kLaneRows == 16) && kBatch % kLaneRows == 0;

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// 8 elements of a row as floats.
template <typename scalar_t>
C10_ALWAYS_INLINE __m256 load_row8(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<scalar_t, Half>) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {
    const __m256i wide =
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
}
#endif

// t[j] lane l = x[l * stride + j], for l < kLaneRows, j < 8.
template <typename scalar_t>
C10_ALWAYS_INLINE void load_tile(const scalar_t* x, int64_t stride, Vec<float> (&t)[8]) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#if defined(CPU_CAPABILITY_AVX512)
  // Rows l and l + 8 side by side: the 8x8 transposes of both halves at once, then the halves'
  // 128-bit quarters put back in row order.
  using Reg = __m512;
  Reg r[8];
  for (int l = 0; l < 8; ++l) {
    r[l] = _mm512_insertf32x8(_mm512_castps256_ps512(load_row8(x + l * stride)),
                              load_row8(x + (l + 8) * stride), 1);
  }
#define GK_TILE_OP(name) _mm512_##name
#else
  using Reg = __m256;
  Reg r[8];
  for (int l = 0; l < 8; ++l) r[l] = load_row8(x + l * stride);
#define GK_TILE_OP(name) _mm256_##name
#endif
  Reg lo[4], hi[4], u[8];
  for (int q = 0; q < 4; ++q) {
    lo[q] = GK_TILE_OP(unpacklo_ps)(r[2 * q], r[2 * q + 1]);
    hi[q] = GK_TILE_OP(unpackhi_ps)(r[2 * q], r[2 * q + 1]);
  }
  for (int h = 0; h < 2; ++h) {
    u[4 * h + 0] = GK_TILE_OP(shuffle_ps)(lo[2 * h], lo[2 * h + 1], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * h + 1] = GK_TILE_OP(shuffle_ps)(lo[2 * h], lo[2 * h + 1], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * h + 2] = GK_TILE_OP(shuffle_ps)(hi[2 * h], hi[2 * h + 1], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * h + 3] = GK_TILE_OP(shuffle_ps)(hi[2 * h], hi[2 * h + 1], _MM_SHUFFLE(3, 2, 3, 2));
  }
#undef GK_TILE_OP
#if defined(CPU_CAPABILITY_AVX512)
  // u[j]'s quarters hold column j of rows 0-3, column j + 4 of rows 0-3, then the same of rows
  // 8-11; u[j + 4]'s those of rows 4-7 and 12-15.
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
  const __m512i second =
      _mm512_setr_epi32(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_permutex2var_ps(u[j], first, u[4 + j]);
    t[j + 4] = _mm512_permutex2var_ps(u[j], second, u[4 + j]);
  }
#else
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
    t[j + 4] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
  }
#endif
#else
  GK_ALIGNED float buf[8][kLaneRows];
  for (int l = 0; l < kLaneRows; ++l) {
    for (int j = 0; j < 8; ++j) buf[j][l] = static_cast<float>(x[l * stride + j]);
  }
  for (int j = 0; j < 8; ++j) t[j] = Vec<float>::loadu(buf[j]);
#endif
}

// The lanes paths read kBatch rows a tile (8 columns) at a time, kBatch streams too many for the
// hardware prefetchers. While a batch's columns [s0, s1) are read, the same share of a batch
// further on (the batches follow one another in memory) is prefetched in address order: small
// batches into L1, enough of them ahead to be kLanePrefetchL1Bytes on; larger ones into L2, two
// batches ahead (measured on AMD EPYC: either alone reaches 0.8-1.0 of a read's bandwidth
// where it is used, the other 0.5-0.8).
constexpr int64_t kLanePrefetchL1Bytes = 8192;

struct LanePrefetch {
  uintptr_t ahead;  // bytes from a batch to the one prefetched
  bool to_l1;
};

template <typename scalar_t>
inline LanePrefetch lane_prefetch(int64_t S) {
  const int64_t batch = kBatch * S * static_cast<int64_t>(sizeof(scalar_t));
  if (batch <= kLanePrefetchL1Bytes) {
    return {static_cast<uintptr_t>(ceil_div(kLanePrefetchL1Bytes, batch) * batch), true};
  }
  return {static_cast<uintptr_t>(2 * batch), false};
}

template <typename scalar_t>
C10_ALWAYS_INLINE void prefetch_batch(const scalar_t* x, const LanePrefetch& pf, int64_t s0,
                                      int64_t s1) {
  constexpr auto kColumnBytes = static_cast<uintptr_t>(kBatch * sizeof(scalar_t));
  // Integer arithmetic: the addresses may lie past the end of x.
  const uintptr_t next = reinterpret_cast<uintptr_t>(x) + pf.ahead;
  const uintptr_t begin = next + static_cast<uintptr_t>(s0) * kColumnBytes;
  const uintptr_t end = next + static_cast<uintptr_t>(s1) * kColumnBytes;
  if (pf.to_l1) {
    prefetch_lines<3>(begin, end);
  } else {
    prefetch_lines<2>(begin, end);
  }
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
      torch::stable::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
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
    torch::stable::parallel_for(0, R * P, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r = t / P;
        const int64_t start = (t - r * P) * pieces.length;
        const int64_t len = std::min(S, start + pieces.length) - start;
        Stats st = Run::reduce_run(x + r * S + start, len, power_of(a, r % a.C), a);
        st.index += start;
        parts[t] = st;
      }
    });
    torch::stable::parallel_for(0, R, kBatch, [&](int64_t begin, int64_t end) {
      Fin::merge_and_finalize(a, o, parts, P, begin, end);
    });
  }

  // One row per vector lane, kBatch rows at a time; a partial last group row by row.
  static void run_lanes(const scalar_t* x, const Args& a, const Outputs& o) {
    const int64_t R = a.N * a.C;
    const int64_t S = a.S;
    const int64_t groups = ceil_div(R, kBatch);
    const int64_t grain = std::max<int64_t>(1, kMinTaskElements / (kBatch * S));
    torch::stable::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
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
