// The NCS forward's driver, shared by its statistics (ncs_forward.cpp: sum and max;
// ncs_forward_gem.cpp: GeM): rows in batches, or pieces of long rows merged in order, or short
// rows one per vector lane (8x8 transposed tiles). `Run` reduces: Run::reduce_run(x, len, power,
// a), the statistics of one contiguous run; Run::reduce_lanes(x, r0, a, st), those of kBatch
// short rows at once (when kLanes).
#pragma once

#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cstdint>
#include <limits>
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
// of V rows (two of 8 rows with 8 floats a vector, one of 16 with 16). AVG gains nothing from the
// transposed tiles (measured: slower than its plain run loop). With AVX-512, AVG, the modes with
// a max without their index (with_index false), and those with it in float16/bfloat16 on runs of
// kMinRowsMaxRun or more, do without them: each row is reduced along itself into one vector (a
// masked load for the rest of the row) and the 16 rows' vectors together (reduce_rows16); the
// max's index is then found again in the rows, which are in L1 (first_equal_rows16). With AVX2,
// AVG and the modes with a max without their index do the same 8 rows at a time (short_rows8),
// the rest of a row read as the overlapping last 8 elements with the lanes already counted masked
// off the sum; AVX-512 does too below kMinRows16Run.
constexpr int64_t kLaneRows = Vec<float>::size();
constexpr int64_t kLaneVecs = kBatch / kLaneRows;
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kAvgRows = kBatch == 16;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr bool kAvgRows = kBatch % 8 == 0;  // sum_short_rows8, kBatch / 8 times
#else
constexpr bool kAvgRows = false;
#endif
template <Mode kMode, typename scalar_t>
constexpr bool kLanes =
    (kMode != Mode::Avg || kAvgRows) && std::is_same_v<acc_type<scalar_t>, float> &&
    (kLaneRows == 8 || kLaneRows == 16) && kBatch % kLaneRows == 0;

#if defined(CPU_CAPABILITY_AVX512)
// The 16 elements at p as floats, lanes outside `keep` 0 (and not read: a masked load never
// faults).
template <typename scalar_t>
C10_ALWAYS_INLINE __m512 load_row16(const scalar_t* p, __mmask16 keep) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm512_maskz_loadu_ps(keep, p);
  } else if constexpr (std::is_same_v<scalar_t, Half>) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(keep, p));
  } else {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(keep, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
}

// Lane r of the result: v[r]'s lanes reduced with op (an add, or a max), 45 operations for the
// 16 rows where 16 horizontal reductions take about 128. Pairs of vectors are combined half
// against half (within 128-bit blocks, then across them), each step serving two rows at once.
template <typename Op>
C10_ALWAYS_INLINE __m512 reduce_rows16(const __m512 (&v)[16], Op op) {
  __m512 pair[8], quad[4];
  for (int i = 0; i < 8; ++i) {
    // per block: (a0 . a2, b0 . b2, a1 . a3, b1 . b3) of rows a = 2i, b = 2i + 1
    pair[i] =
        op(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {
    // per block: one partial of each of rows 4i .. 4i + 3, in that order
    const __m512d lo = _mm512_castps_pd(pair[2 * i]), hi = _mm512_castps_pd(pair[2 * i + 1]);
    quad[i] = op(_mm512_castpd_ps(_mm512_unpacklo_pd(lo, hi)),
                 _mm512_castpd_ps(_mm512_unpackhi_pd(lo, hi)));
  }
  // Blocks (0 . 1, 2 . 3) of quad[2i] and of quad[2i + 1], then of those: block i, rows 4i ..
  constexpr int kEven = _MM_SHUFFLE(2, 0, 2, 0), kOdd = _MM_SHUFFLE(3, 1, 3, 1);
  auto fold = [&](__m512 a, __m512 b) {
    return op(_mm512_shuffle_f32x4(a, b, kEven), _mm512_shuffle_f32x4(a, b, kOdd));
  };
  return fold(fold(quad[0], quad[1]), fold(quad[2], quad[3]));
}

// The sums (and, kWithMax, the NaN-blind maxima) of the 16 rows x[r * S, (r + 1) * S), r < 16:
// each row along itself in two vectors, its last S % 16 elements with a masked load (read as -inf
// for the max), then reduce_rows16.
template <bool kWithMax, typename scalar_t>
C10_ALWAYS_INLINE void short_rows16(const scalar_t* x, int64_t S, float* sums, float* maxima) {
  const int64_t full = S / 16;
  const auto rest = static_cast<__mmask16>((1u << (S % 16)) - 1u);
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 row_sum[16], row_max[16];
  for (int r = 0; r < 16; ++r) {
    const scalar_t* p = x + r * S;
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), m0 = neg_inf, m1 = neg_inf;
    auto take = [&](__m512 v, __m512& s, __m512& m) {
      s = _mm512_add_ps(s, v);
      if constexpr (kWithMax) m = _mm512_max_ps(m, v);
    };
    int64_t j = 0;
    for (; j + 2 <= full; j += 2) {
      take(load_row16(p + 16 * j, 0xffff), s0, m0);
      take(load_row16(p + 16 * j + 16, 0xffff), s1, m1);
    }
    if (j < full) take(load_row16(p + 16 * j, 0xffff), s0, m0);
    if (rest) {
      const __m512 v = load_row16(p + 16 * full, rest);
      s1 = _mm512_add_ps(s1, v);
      if constexpr (kWithMax) m1 = _mm512_max_ps(m1, _mm512_mask_blend_ps(rest, neg_inf, v));
    }
    row_sum[r] = _mm512_add_ps(s0, s1);
    if constexpr (kWithMax) row_max[r] = _mm512_max_ps(m0, m1);
  }
  _mm512_store_ps(sums,
                  reduce_rows16(row_sum, [](__m512 a, __m512 b) { return _mm512_add_ps(a, b); }));
  if constexpr (kWithMax) {
    _mm512_store_ps(maxima,
                    reduce_rows16(row_max, [](__m512 a, __m512 b) { return _mm512_max_ps(a, b); }));
  }
}

// indices[r]: the first i < S with x[r * S + i] == maxima[r] (which occurs in the row, and is not
// NaN), for the 16 rows: per row, the smallest lane index among the matches of every vector (no
// branches), then reduce_rows16 with min. The rows are in L1 from short_rows16.
template <typename scalar_t>
C10_ALWAYS_INLINE void first_equal_rows16(const scalar_t* x, int64_t S, const float* maxima,
                                          int64_t* indices) {
  const int64_t full = S / 16;
  const auto rest = static_cast<__mmask16>((1u << (S % 16)) - 1u);
  const __m512 lanes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 step = _mm512_set1_ps(16.0f);
  __m512 first[16];
  for (int r = 0; r < 16; ++r) {
    const scalar_t* p = x + r * S;
    const __m512 target = _mm512_set1_ps(maxima[r]);
    __m512 best = _mm512_set1_ps(static_cast<float>(S)), at = lanes;
    for (int64_t k = 0; k < full; ++k) {
      const __mmask16 hits = _mm512_cmp_ps_mask(load_row16(p + 16 * k, 0xffff), target, _CMP_EQ_OQ);
      best = _mm512_mask_min_ps(best, hits, best, at);
      at = _mm512_add_ps(at, step);
    }
    if (rest) {
      const __mmask16 hits =
          _mm512_mask_cmp_ps_mask(rest, load_row16(p + 16 * full, rest), target, _CMP_EQ_OQ);
      best = _mm512_mask_min_ps(best, hits, best, at);
    }
    first[r] = best;
  }
  GK_ALIGNED int32_t found[16];
  _mm512_store_si512(found, _mm512_cvttps_epi32(reduce_rows16(
                                first, [](__m512 a, __m512 b) { return _mm512_min_ps(a, b); })));
  for (int r = 0; r < 16; ++r) indices[r] = found[r];
}
#endif

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

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// Lane r of the result: v[r]'s lanes reduced with op (an add, or a max), for 8 rows (21
// operations): as reduce_rows16, pairs within 128-bit blocks, then the two blocks.
template <typename Op>
C10_ALWAYS_INLINE __m256 reduce_rows8(const __m256 (&v)[8], Op op) {
  __m256 pair[4], quad[2];
  for (int i = 0; i < 4; ++i) {
    pair[i] =
        op(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 2; ++i) {
    const __m256d lo = _mm256_castps_pd(pair[2 * i]), hi = _mm256_castps_pd(pair[2 * i + 1]);
    quad[i] = op(_mm256_castpd_ps(_mm256_unpacklo_pd(lo, hi)),
                 _mm256_castpd_ps(_mm256_unpackhi_pd(lo, hi)));
  }
  return op(_mm256_permute2f128_ps(quad[0], quad[1], 0x20),
            _mm256_permute2f128_ps(quad[0], quad[1], 0x31));
}

// The sums (and, kWithMax, the NaN-blind maxima) of the 8 rows x[r * S, (r + 1) * S), r < 8,
// S >= 8, into sums[8] (maxima[8]): each row along itself in two vectors; its last S % 8
// elements as the row's last 8, the lanes before them (already counted) masked off the sum (a
// max may count them twice).
template <bool kWithMax, typename scalar_t>
C10_ALWAYS_INLINE void short_rows8(const scalar_t* x, int64_t S, float* sums, float* maxima) {
  const int64_t full = S / 8;
  const int rest = static_cast<int>(S % 8);
  const __m256 keep = _mm256_castsi256_ps(
      _mm256_cmpgt_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(7 - rest)));
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 row_sum[8], row_max[8];
  for (int r = 0; r < 8; ++r) {
    const scalar_t* p = x + r * S;
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), m0 = neg_inf, m1 = neg_inf;
    auto take = [&](__m256 v, __m256& s, __m256& m) {
      s = _mm256_add_ps(s, v);
      if constexpr (kWithMax) m = _mm256_max_ps(m, v);
    };
    int64_t j = 0;
    for (; j + 2 <= full; j += 2) {
      take(load_row8(p + 8 * j), s0, m0);
      take(load_row8(p + 8 * j + 8), s1, m1);
    }
    if (j < full) take(load_row8(p + 8 * j), s0, m0);
    if (rest) {
      const __m256 v = load_row8(p + S - 8);
      s1 = _mm256_add_ps(s1, _mm256_and_ps(v, keep));
      if constexpr (kWithMax) m1 = _mm256_max_ps(m1, v);
    }
    row_sum[r] = _mm256_add_ps(s0, s1);
    if constexpr (kWithMax) row_max[r] = _mm256_max_ps(m0, m1);
  }
  _mm256_store_ps(sums,
                  reduce_rows8(row_sum, [](__m256 a, __m256 b) { return _mm256_add_ps(a, b); }));
  if constexpr (kWithMax) {
    _mm256_store_ps(maxima,
                    reduce_rows8(row_max, [](__m256 a, __m256 b) { return _mm256_max_ps(a, b); }));
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
