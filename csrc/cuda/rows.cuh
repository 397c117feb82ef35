// Which positions of a row take part, on the device: every one for the pooling ops
// (AllPositions), a span and an optional mask per row for token pooling (TokenPositions; the
// normalized form of docs/DESIGN.md "Token pooling"). The kernel templates read a row's RowSpan
// once and test positions against it; with AllPositions every test is a compile-time constant.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/launch.h"

namespace gapkernels {

template <typename Positions>
constexpr bool kIsTokens = std::is_same_v<Positions, TokenPositions>;

struct RowSpan {
  int64_t begin;     // positions [begin, end) of the sample may take part
  int64_t end;       // (== begin for a row with count <= 0: nothing takes part)
  int64_t count;     // how many do: the divisor of the mean
  int64_t origin;    // a max index is written as s - origin
  int64_t own_end;   // varlen: the row owns (writes grad_x of) [origin, own_end)
  int64_t sample;    // the sample of x the row reads
  const bool* mask;  // the sample's S mask bytes, or nullptr: all of [begin, end)

  __device__ __forceinline__ bool masked_out(int64_t s) const {
    return mask != nullptr && !mask[s];
  }
  // Whether position s (anywhere in the sample) takes part.
  __device__ __forceinline__ bool takes_part(int64_t s) const {
    return s >= begin && s < end && !masked_out(s);
  }
};

__device__ __forceinline__ RowSpan row_span(const AllPositions&, int64_t n, int64_t S) {
  return {0, S, S, 0, S, n, nullptr};
}

__device__ __forceinline__ int64_t clamp_index(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// Row b's span, clamped into [0, S] (values never checked on the host, as inside torch.compile,
// cannot make a kernel read out of bounds; the CPU kernels clamp the same way).
__device__ __forceinline__ RowSpan row_span(const TokenPositions& t, int64_t b, int64_t S) {
  const int64_t* v = t.spans + 4 * b;
  RowSpan r;
  r.begin = clamp_index(v[0], 0, S);
  r.own_end = clamp_index(v[1], r.begin, S);
  r.count = v[2];
  r.end = r.count > 0 ? r.own_end : r.begin;
  r.origin = clamp_index(v[3], 0, S);
  r.sample = t.varlen ? 0 : b;
  r.mask = t.mask != nullptr ? t.mask + r.sample * S : nullptr;
  return r;
}

// The first position of the span that takes part, or -1 when none does (read only where a
// row's max statistic took no element above -inf: rare, so a plain scan of the mask).
__device__ __forceinline__ int64_t first_taken(const RowSpan& span) {
  for (int64_t s = span.begin; s < span.end; ++s) {
    if (!span.masked_out(s)) return s;
  }
  return -1;
}

// Piece `piece` of `chunk` positions of [lo, hi), cut at lo + k * chunk: [*first, *last).
__device__ __forceinline__ void piece_range(int64_t lo, int64_t hi, int64_t piece, int64_t chunk,
                                            int64_t* first, int64_t* last) {
  *first = lo + piece * chunk;
  *last = *first + chunk < hi ? *first + chunk : hi;
}

// A varlen batch's rows by position (the NSC backward walks the packed batch): row b owns
// [origin, own_end); origins do not decrease (cu_seqlens is checked so; a bad one only gives
// wrong values, never an access out of bounds).
__device__ __forceinline__ int64_t varlen_origin(const TokenPositions& t, int64_t b, int64_t S) {
  return clamp_index(t.spans[4 * b + 3], 0, S);
}

// The last row whose origin is <= s (0 when none is): binary search.
__device__ __forceinline__ int64_t varlen_row_at(const TokenPositions& t, int64_t s, int64_t S) {
  int64_t lo = 0;
  int64_t hi = t.rows;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int64_t mid = lo + ((hi - lo) >> 1);
    if (varlen_origin(t, mid, S) <= s) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// From row b (owning positions before s), the row that owns s: the last one with origin <= s.
__device__ __forceinline__ int64_t varlen_next_row(const TokenPositions& t, int64_t b, int64_t s,
                                                   int64_t S) {
  while (b + 1 < t.rows && varlen_origin(t, b + 1, S) <= s) ++b;
  return b;
}

}  // namespace gapkernels
