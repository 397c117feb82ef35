// CUDA kernels of gapkernels::pool_forward / pool_backward. The contract is docs/DESIGN.md.
//
// Two layouts of the (N, C, S) view, one forward and one backward kernel template each:
//   NCS (rows of S contiguous elements): a group of G lanes (G = 1..32, a power of two chosen from
//     S) per work item; a work item is a row, or a fixed-length chunk of a row when there are too
//     few rows to fill the GPU. The forward gives lanes 16-byte slots of the row by index (slot v
//     to lane v % G), read with 16-byte vectors when the row is aligned and with narrower loads of
//     the same slots when not, so the address never changes the summation order. The backward
//     (one formula per element) peels the elements before the first 16-byte boundary of grad_x
//     (head) and after the last one (tail).
//   NSC (C contiguous): each thread owns VEC adjacent channels (one 16-byte vector) and walks S;
//     a block is BX threads across channels by BY threads across S; S may be split over blocks.
// A split reduction writes per-piece partial statistics to a buffer and a second small kernel
// combines them in a fixed order. How a reduction is split depends on the shape alone; no
// floating-point atomics anywhere, so every result is bitwise reproducible, at any address.
// GeM keeps (M, sum of (y/M)^p[, sum of (y/M)^p log(y/M)]) per lane/thread/piece, rescaled to the
// larger maximum whenever a maximum grows or two pieces meet (docs/DESIGN.md "Modes").
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "pool_common.h"

namespace gapkernels {
namespace {

constexpr int kThreads = 256;
// NCS: rows fewer than this many (one warp each would leave the GPU idle) get split into chunks.
constexpr int64_t kNcsFillItems = 4096;
constexpr int64_t kNcsMinChunk = 2048;
constexpr int64_t kNcsChunkAlign = 64;
// NSC: fewer blocks than this get S split over blocks, each thread keeping at least
// kNscMinStepsPerThread steps over S.
constexpr int64_t kNscFillBlocks = 512;
constexpr int64_t kNscMinStepsPerThread = 16;
constexpr int kUnroll = 4;
// Marks "no element taken yet" in a max statistic; resolved to index 0 (torch's start index).
constexpr int64_t kNoIndex = std::numeric_limits<int64_t>::max();

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t>
constexpr int vec_size() {
  return 16 / static_cast<int>(sizeof(scalar_t));
}

// Which statistics a forward pass gathers.
enum class Stat : int { Sum, Max, SumMax, Pow, PowLog };

// Which formula a backward pass writes.
enum class Grad : int { Uniform, UniformPlusArgmax, Gem };

template <typename scalar_t, int VEC>
struct alignas(16) Pack {
  scalar_t v[VEC];
};

template <typename acc_t>
__device__ __forceinline__ acc_t negative_infinity() {
  if constexpr (std::is_same_v<acc_t, double>) {
    return __longlong_as_double(static_cast<long long>(0xfff0000000000000ULL));
  } else {
    return __int_as_float(static_cast<int>(0xff800000u));
  }
}

template <typename acc_t>
__device__ __forceinline__ bool is_nan(acc_t v) {
  return v != v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t accurate_pow(acc_t base, acc_t e) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return ::pow(base, e);
  } else {
    return ::powf(base, e);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t accurate_log(acc_t v) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return ::log(v);
  } else {
    return ::logf(v);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t fused_multiply_add(acc_t a, acc_t b, acc_t c) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return ::fma(a, b, c);
  } else {
    return ::fmaf(a, b, c);
  }
}

// 1/y for y > 0 to within about an ulp (subnormal and overflowing results included; +inf gives 0,
// NaN gives NaN), with no call: the IEEE division and reciprocal keep their slow path in a
// called subroutine, and the registers live across such a call in an element loop are spilled.
// y is scaled by a power of two into a range where the hardware approximation has no special
// case, refined by Newton steps, and scaled back (exactly, or with one rounding if subnormal).
__device__ __forceinline__ float reciprocal(float y) {
  const float scale = y > 0x1p+64f ? 0x1p-64f : (y < 0x1p-64f ? 0x1p+64f : 1.0f);
  const float ys = y * scale;
  float r = __fdividef(1.0f, ys);  // MUFU.RCP; ys in [2^-64, 2^64] here (no flush, no zero)
  r = fmaf(r, fmaf(-ys, r, 1.0f), r);
  r *= scale;
  return isinf(y) ? 0.0f : r;
}

__device__ __forceinline__ double reciprocal(double y) {
  const double scale = y > 0x1p+500 ? 0x1p-500 : (y < 0x1p-500 ? 0x1p+500 : 1.0);
  const double ys = y * scale;
  double r;
  asm("rcp.approx.ftz.f64 %0, %1;" : "=d"(r) : "d"(ys));  // about 20 bits
#pragma unroll
  for (int step = 0; step < 3; ++step) r = fma(r, fma(-ys, r, 1.0), r);  // 20 -> 40 -> 53
  r *= scale;
  return isinf(y) ? 0.0 : r;
}

// floor(a / b) for indices 0 <= a < 2^51, 1 <= b, with no call (the compiler's 64-bit division
// is one, and in the GeM forward kernels the registers live across it got spilled): 32-bit
// division when both fit, else a double-precision estimate (relative error < 2^-51, so off by at
// most 1) corrected to the exact quotient. (Fixed correction steps, not loops: the compiler turns
// such a loop back into a division.)
__device__ __forceinline__ int64_t divide_index(int64_t a, int64_t b) {
  if (((a | b) >> 32) == 0) {
    return static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b));
  }
  int64_t q = static_cast<int64_t>(static_cast<double>(a) * reciprocal(static_cast<double>(b)));
  int64_t rest = a - q * b;
#pragma unroll
  for (int step = 0; step < 2; ++step) {
    const bool low = rest < 0;
    q = low ? q - 1 : q;
    rest = low ? rest + b : rest;
    const bool high = rest >= b;
    q = high ? q + 1 : q;
    rest = high ? rest - b : rest;
  }
  return q;
}

// 0..8 when the exponent is that integer (computed with multiplications), else -1 (pow). GeM's p
// in [1, 8] takes the fast path forward, p - 1 in [0, 7] backward.
template <typename acc_t>
__device__ __forceinline__ int integral_exponent(acc_t e) {
  if (!(e >= acc_t(0) && e <= acc_t(8))) return -1;  // NaN: -1
  const int n = static_cast<int>(e);
  return static_cast<acc_t>(n) == e ? n : -1;
}

// base ** e; `integral` from integral_exponent(e). One code path for every integer 0..8: binary
// powering with selects (no table, no branch per exponent). No fast-math intrinsic: a tiny base
// gives a correctly rounded subnormal or 0, never a flushed or NaN result.
template <typename acc_t>
__device__ __forceinline__ acc_t power(acc_t base, acc_t e, int integral) {
  if (integral < 0) return accurate_pow(base, e);
  const acc_t b2 = base * base;
  const acc_t b4 = b2 * b2;
  acc_t result = (integral & 1) ? base : acc_t(1);
  if (integral & 2) result *= b2;
  if (integral & 4) result *= b4;
  if (integral & 8) result *= b4 * b4;
  return result;
}

// True when the candidate (value, index) beats the current one under torch's max semantics
// (docs/DESIGN.md): a NaN beats numbers and the later NaN wins; else the larger value, and the
// smaller index on a tie. A total order, so pieces may be combined in any grouping.
template <typename acc_t>
__device__ __forceinline__ bool max_candidate_wins(acc_t current, int64_t current_index,
                                                   acc_t candidate, int64_t candidate_index) {
  if (is_nan(candidate)) return !is_nan(current) || candidate_index > current_index;
  if (is_nan(current)) return false;
  return candidate > current || (candidate == current && candidate_index < current_index);
}

// GeM's per-channel exponent, with its integral fast-path code.
template <typename acc_t>
struct Exponent {
  acc_t p;
  int integral;
};

// GeM: brings a piece's sums (r = sum of (y/m_from)^p, l = sum of (y/m_from)^p log(y/m_from))
// to a maximum m_to >= m_from: with k = m_from / m_to (as m_from * (1/m_to)), r' = k^p r and, as
// log(y/m_to) = log(y/m_from) + log(k), l' = k^p (l + log(k) r). m_from == 0 (an empty piece: its
// sums are 0) or k^p == 0 (underflow) leaves exact zeros; a NaN maximum makes both NaN.
template <typename acc_t, bool kLog>
__device__ __forceinline__ void gem_rescale(acc_t& r, acc_t& l, acc_t m_from, acc_t m_to,
                                            Exponent<acc_t> e) {
  if (m_from == m_to) return;
  const acc_t k = m_from * reciprocal(m_to);  // <= 1; 0 when m_from = 0 or m_to = +inf
  const acc_t kp = power(k, e.p, e.integral);
  if constexpr (kLog) l = kp == acc_t(0) ? acc_t(0) : kp * (l + accurate_log(k) * r);
  r *= kp;
}

// Running statistics of one piece of a row.
//   Sum, Max, SumMax: v0 = sum, v1 = max, index = arg-max (v2, inv_m unused).
//   Pow, PowLog (GeM, relative to the piece's running maximum M of y = clamp(x, eps)):
//     v1 = M (0 while empty), v0 = sum of (y/M)^p, v2 = sum of (y/M)^p log(y/M) (PowLog),
//     inv_m = 1/M (index unused).
template <typename acc_t, Stat kStat>
struct Stats {
  static constexpr bool kSum = kStat == Stat::Sum || kStat == Stat::SumMax;
  static constexpr bool kMax = kStat == Stat::Max || kStat == Stat::SumMax;
  static constexpr bool kPow = kStat == Stat::Pow || kStat == Stat::PowLog;
  static constexpr bool kLog = kStat == Stat::PowLog;
  // acc_t values per piece in the split-reduction buffer: v0, v1 (and v2).
  static constexpr int kPartials = kLog ? 3 : 2;

  acc_t v0;
  acc_t v1;
  acc_t v2;
  acc_t inv_m;
  int64_t index;

  __device__ __forceinline__ void init() {
    v0 = acc_t(0);
    v1 = kMax ? negative_infinity<acc_t>() : acc_t(0);
    v2 = acc_t(0);
    inv_m = acc_t(0);
    index = kNoIndex;
  }

  // Elements of one piece must be added in increasing s (torch's scan order).
  __device__ __forceinline__ void add(acc_t v, int64_t s, acc_t eps, Exponent<acc_t> e) {
    if constexpr (kSum) v0 += v;
    if constexpr (kMax) {
      if (v > v1 || is_nan(v)) {
        v1 = v;
        index = s;
      }
    }
    if constexpr (kPow) {
      const acc_t y = v < eps ? eps : v;  // NaN stays NaN, as torch.clamp; y > 0 (eps > 0)
      if (y > v1 || is_nan(y)) {
        // A new maximum (a NaN is one for good: every later z is NaN): rescale, then y/M = 1
        // adds 1 to v0 and log(1) = 0 to v2.
        gem_rescale<acc_t, kLog>(v0, v2, v1, y, e);
        v1 = y;
        inv_m = reciprocal(y);
        v0 += acc_t(1);
      } else {
        // z = y/M in (0, 1]: exactly 1 for y == M (ties with the maximum: constant and dead
        // rows give r = 1, l = 0 exactly), else y * (1/M), within an ulp or so of the quotient,
        // clamped to 1 (so log(z) <= 0). M = +inf: z = 0 for finite y. M = NaN: r is NaN already.
        acc_t z = y < v1 ? y * inv_m : acc_t(1);
        z = z > acc_t(1) ? acc_t(1) : z;
        const acc_t zp = power(z, e.p, e.integral);
        v0 += zp;
        if constexpr (kLog) v2 += zp * accurate_log(z);
      }
    }
  }

  // Absorbs another piece's statistics (o2: its v2, read only for PowLog; e: GeM's exponent).
  // GeM: both pieces are brought to the larger maximum, then added (this + other).
  __device__ __forceinline__ void merge(acc_t o0, acc_t o1, acc_t o2, int64_t oindex,
                                        Exponent<acc_t> e) {
    if constexpr (kSum) v0 += o0;
    if constexpr (kMax) {
      if (max_candidate_wins(v1, index, o1, oindex)) {
        v1 = o1;
        index = oindex;
      }
    }
    if constexpr (kPow) {
      const acc_t m = (is_nan(v1) || v1 >= o1) ? v1 : o1;  // a NaN maximum wins
      gem_rescale<acc_t, kLog>(v0, v2, v1, m, e);
      gem_rescale<acc_t, kLog>(o0, o2, o1, m, e);
      v0 += o0;
      if constexpr (kLog) v2 += o2;
      v1 = m;
    }
  }

  // Butterfly over groups of `group` lanes (a power of two); every lane of the warp must call it.
  // Each lane ends with the same, fixed-order result (the merge is commutative bit for bit).
  __device__ __forceinline__ void group_reduce(int group, Exponent<acc_t> e) {
    for (int offset = group >> 1; offset > 0; offset >>= 1) {
      const acc_t o0 = __shfl_xor_sync(0xffffffffu, v0, offset);
      const acc_t o1 = __shfl_xor_sync(0xffffffffu, v1, offset);
      acc_t o2 = acc_t(0);
      if constexpr (kLog) o2 = __shfl_xor_sync(0xffffffffu, v2, offset);
      int64_t oi = kNoIndex;
      if constexpr (!kPow) {
        oi = static_cast<int64_t>(
            __shfl_xor_sync(0xffffffffu, static_cast<long long>(index), offset));
      }
      merge(o0, o1, o2, oi, e);
    }
  }
};

template <typename scalar_t>
struct ForwardArgs {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x;
  scalar_t* out;
  acc_t* aux;
  int64_t* indices;
  const acc_t* weight;  // nullptr: use `scalar`
  int64_t weight_stride;  // 0 (one weight) or 1 (per channel)
  acc_t scalar;
  acc_t eps;
  int64_t N;
  int64_t C;
  int64_t S;
  int64_t aux_columns;
  bool cat;  // SumMax: CAT layout of out, else MIXED
  // Split reductions: per (row, piece) statistics, [row][piece] order; nullptr when unsplit.
  acc_t* partial_values;  // Stats::kPartials per piece
  int64_t* partial_indices;
  int64_t split;

  __device__ __forceinline__ acc_t channel_weight(int64_t c) const {
    return weight != nullptr ? weight[c * weight_stride] : scalar;
  }
};

template <typename scalar_t, Stat kStat>
__device__ __forceinline__ Exponent<acc_type<scalar_t>> gem_exponent(
    const ForwardArgs<scalar_t>& a, int64_t c) {
  using acc_t = acc_type<scalar_t>;
  Exponent<acc_t> e{acc_t(1), 1};
  if constexpr (Stats<acc_t, kStat>::kPow) {
    e.p = a.channel_weight(c);
    e.integral = integral_exponent(e.p);
  }
  return e;
}

// Writes out / aux / indices of row r = n * C + c from its complete statistics.
template <typename scalar_t, Stat kStat>
__device__ void write_row(const ForwardArgs<scalar_t>& a, int64_t r, int64_t n, int64_t c,
                          const Stats<acc_type<scalar_t>, kStat>& t,
                          Exponent<acc_type<scalar_t>> e) {
  using acc_t = acc_type<scalar_t>;
  using St = Stats<acc_t, kStat>;
  const acc_t count = static_cast<acc_t>(a.S);
  if constexpr (St::kMax) a.indices[r] = t.index == kNoIndex ? 0 : t.index;
  if constexpr (kStat == Stat::Sum) {
    a.out[r] = static_cast<scalar_t>(t.v0 / count);
  } else if constexpr (kStat == Stat::Max) {
    a.out[r] = static_cast<scalar_t>(t.v1);
  } else if constexpr (kStat == Stat::SumMax) {
    const acc_t avg = t.v0 / count;
    const acc_t mx = t.v1;
    if (a.cat) {
      a.out[n * 2 * a.C + c] = static_cast<scalar_t>(avg);
      a.out[n * 2 * a.C + a.C + c] = static_cast<scalar_t>(mx);
    } else {
      const acc_t alpha = a.channel_weight(c);
      a.out[r] = static_cast<scalar_t>(alpha * mx + (acc_t(1) - alpha) * avg);
      a.aux[r] = mx - avg;
    }
  } else {
    // GeM: M = t.v1, r = mean (y/M)^p in [1/S, 1], out = M r^(1/p) (M itself when M = +inf;
    // a NaN M gives NaN).
    // (Reciprocals rather than divisions: no call, see reciprocal().)
    const acc_t big_m = t.v1;
    const acc_t inv_count = reciprocal(count);
    acc_t mean_r = t.v0 * inv_count;  // then one correction step: the quotient, ~always
    mean_r = fused_multiply_add(fused_multiply_add(-mean_r, count, t.v0), inv_count, mean_r);
    const acc_t p = e.p;  // channel c's p, read before the element loop
    const acc_t value = isinf(big_m) ? big_m : big_m * accurate_pow(mean_r, reciprocal(p));
    a.out[r] = static_cast<scalar_t>(value);
    a.aux[r * a.aux_columns] = big_m;
    a.aux[r * a.aux_columns + 1] = mean_r;
    if constexpr (St::kLog) a.aux[r * a.aux_columns + 2] = t.v2 * inv_count;
  }
}

// Row r = n * C + c's piece `piece` is complete: finish the row, or leave the piece for the
// combine kernel. (n and c come from the caller, computed before the element loop: a 64-bit
// division is a call, and values live across a call in a long kernel get spilled.)
template <typename scalar_t, Stat kStat>
__device__ __forceinline__ void emit_piece(const ForwardArgs<scalar_t>& a, int64_t r, int64_t n,
                                           int64_t c, int64_t piece,
                                           const Stats<acc_type<scalar_t>, kStat>& t,
                                           Exponent<acc_type<scalar_t>> e) {
  if (a.split == 1) {
    write_row<scalar_t, kStat>(a, r, n, c, t, e);
  } else {
    using St = Stats<acc_type<scalar_t>, kStat>;
    const int64_t slot = r * a.split + piece;
    a.partial_values[St::kPartials * slot] = t.v0;
    a.partial_values[St::kPartials * slot + 1] = t.v1;
    if constexpr (St::kLog) a.partial_values[St::kPartials * slot + 2] = t.v2;
    a.partial_indices[slot] = t.index;
  }
}

// ---------------------------------------------------------------------------------------------
// NCS forward: work item = (row, piece) handled by 2^group_log2 lanes, enough lanes for each to
// take about kUnroll vectors (S = 49 float32: 4 lanes, 8 rows per warp).
struct NcsGeometry {
  int64_t split;  // pieces per row
  int64_t chunk;  // elements per piece (the last may be shorter)
  int64_t items;  // rows * split
  int64_t blocks;
  int group_log2;
};

// A piece of `length` elements at `start`, cut at 16-byte boundaries: `head` elements before the
// first boundary, `vectors` aligned 16-byte vectors, `tail` elements after the last one.
struct Peel {
  int64_t head;
  int64_t vectors;
  int64_t tail;
};

template <int VEC, typename scalar_t>
__device__ __forceinline__ Peel peel(const scalar_t* start, int64_t length) {
  const auto address = reinterpret_cast<uintptr_t>(start);
  int64_t head = static_cast<int64_t>(((16u - (address & 15u)) & 15u) / sizeof(scalar_t));
  head = head < length ? head : length;
  const int64_t vectors = (length - head) / VEC;
  return {head, vectors, length - head - vectors * VEC};
}

// The widest access (16, 8, 4 bytes, or one element) that a piece starting at `start` allows for
// each of its VEC-element slots (a slot is 16 bytes, so every slot has the start's alignment).
template <typename scalar_t>
__device__ __forceinline__ int slot_access_bytes(const scalar_t* start) {
  const auto address = reinterpret_cast<uintptr_t>(start);
  if ((address & 15u) == 0) return 16;
  if ((address & 7u) == 0) return 8;
  if ((address & 3u) == 0) return 4;
  return static_cast<int>(sizeof(scalar_t));
}

// Loads one slot of VEC elements with accesses of `bytes` (from slot_access_bytes): the same
// values whatever the width, so the width never changes the arithmetic.
template <typename scalar_t, int VEC>
__device__ __forceinline__ Pack<scalar_t, VEC> load_slot(const scalar_t* p, int bytes) {
  static_assert(sizeof(Pack<scalar_t, VEC>) == 16, "a slot is 16 bytes");
  Pack<scalar_t, VEC> loaded;
  if (bytes == 16) {
    loaded = *reinterpret_cast<const Pack<scalar_t, VEC>*>(p);
  } else if (bytes == 8) {
    const uint2* words = reinterpret_cast<const uint2*>(p);
    uint2* into = reinterpret_cast<uint2*>(loaded.v);
    into[0] = words[0];
    into[1] = words[1];
  } else if (sizeof(scalar_t) <= 4 && bytes == 4) {
    const unsigned int* words = reinterpret_cast<const unsigned int*>(p);
    unsigned int* into = reinterpret_cast<unsigned int*>(loaded.v);
#pragma unroll
    for (int w = 0; w < 4; ++w) into[w] = words[w];
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) loaded.v[j] = p[j];
  }
  return loaded;
}

// Which lane adds which element depends on the element's index in the piece alone, never on the
// address: slot v (elements [v*VEC, v*VEC + VEC) of the piece) belongs to lane v % group, which
// adds its slots in increasing v, each in increasing element order; the last, partial slot (the
// piece's length % VEC elements) belongs to lane (length / VEC) % group, after its full slots. A
// misaligned piece loads the same slots with narrower accesses (load_slot), so the same values
// give the same bits at any address.
template <typename scalar_t, Stat kStat>
__global__ void __launch_bounds__(kThreads)
    ncs_pool_forward_kernel(ForwardArgs<scalar_t> a, NcsGeometry g) {
  using acc_t = acc_type<scalar_t>;
  constexpr int VEC = vec_size<scalar_t>();
  using VecT = Pack<scalar_t, VEC>;
  const int group = 1 << g.group_log2;
  const int lane = threadIdx.x & (group - 1);
  const int64_t item = static_cast<int64_t>(blockIdx.x) * (kThreads >> g.group_log2) +
                       (threadIdx.x >> g.group_log2);

  Stats<acc_t, kStat> t;
  t.init();
  int64_t r = 0;
  int64_t n = 0;
  int64_t c = 0;
  int64_t piece = 0;
  Exponent<acc_t> e{acc_t(1), 1};
  const bool valid = item < g.items;
  if (valid) {
    r = divide_index(item, g.split);
    piece = item - r * g.split;
    n = divide_index(r, a.C);
    c = r - n * a.C;
    const int64_t begin = piece * g.chunk;
    const int64_t end = begin + g.chunk < a.S ? begin + g.chunk : a.S;
    e = gem_exponent<scalar_t, kStat>(a, c);
    const scalar_t* start = a.x + r * a.S + begin;
    const int bytes = slot_access_bytes(start);
    const int64_t slots = (end - begin) / VEC;
    const int64_t rest = (end - begin) - slots * VEC;

    // Up to kUnroll slot loads in flight per lane, issued before any of them is used.
    for (int64_t v = lane; v < slots; v += kUnroll * group) {
      VecT loaded[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (v + u * group < slots) loaded[u] = load_slot<scalar_t, VEC>(start + (v + u * group) * VEC, bytes);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (v + u * group < slots) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            t.add(static_cast<acc_t>(loaded[u].v[j]), begin + (v + u * group) * VEC + j, a.eps,
                  e);
          }
        }
      }
    }
    if (rest > 0 && lane == static_cast<int>(slots & (group - 1))) {
      const int64_t tail = slots * VEC;
      for (int64_t i = 0; i < rest; ++i) {
        t.add(static_cast<acc_t>(start[tail + i]), begin + tail + i, a.eps, e);
      }
    }
  }
  t.group_reduce(group, e);
  if (valid && lane == 0) emit_piece<scalar_t, kStat>(a, r, n, c, piece, t, e);
}

// ---------------------------------------------------------------------------------------------
// NSC forward: block = BX threads across channel vectors x BY threads across S.
struct NscGeometry {
  int64_t split;    // pieces of S
  int64_t s_chunk;  // S positions per piece (the last may be shorter)
  int64_t channel_blocks;
  int64_t blocks;  // channel_blocks * N * split
  int bx_log2;
  bool vectorized;  // 16-byte accesses (C % VEC == 0 and aligned pointers)
};

template <typename scalar_t, int VEC>
__device__ __forceinline__ Pack<scalar_t, VEC> load_channels(const scalar_t* p, bool vectorized,
                                                             int64_t channels_left) {
  if (vectorized) return *reinterpret_cast<const Pack<scalar_t, VEC>*>(p);
  Pack<scalar_t, VEC> loaded;
#pragma unroll
  for (int j = 0; j < VEC; ++j) loaded.v[j] = j < channels_left ? p[j] : scalar_t(0);
  return loaded;
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ void store_channels(scalar_t* p, const Pack<scalar_t, VEC>& values,
                                               bool vectorized, int64_t channels_left) {
  if (vectorized) {
    *reinterpret_cast<Pack<scalar_t, VEC>*>(p) = values;
    return;
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    if (j < channels_left) p[j] = values.v[j];
  }
}

// Where one thread of an NSC launch works: its channel vector (tx, from c0), its rows (ty, every
// by-th s of [s_begin, s_end)), its sample n and its piece of S. Shared by forward and backward.
struct NscPlace {
  int tid;
  int bx;
  int by;
  int ty;
  int64_t n;
  int64_t piece;
  int64_t c0;
  int64_t channels_left;
  int64_t s_begin;
  int64_t s_end;
};

template <int VEC>
__device__ __forceinline__ NscPlace nsc_place(const NscGeometry& g, int64_t N, int64_t C,
                                              int64_t S) {
  NscPlace p;
  p.tid = threadIdx.x;
  p.bx = 1 << g.bx_log2;
  p.by = kThreads >> g.bx_log2;
  p.ty = p.tid >> g.bx_log2;
  // 32-bit divisions (no call): the grid has at most INT_MAX blocks = channel_blocks * N * split.
  const uint32_t block = blockIdx.x;
  const uint32_t channel_blocks = static_cast<uint32_t>(g.channel_blocks);
  const uint32_t samples = static_cast<uint32_t>(N);
  const uint32_t channel_block = block % channel_blocks;
  const uint32_t rest = block / channel_blocks;
  p.n = rest % samples;
  p.piece = rest / samples;
  p.c0 = (static_cast<int64_t>(channel_block) * p.bx + (p.tid & (p.bx - 1))) * VEC;
  p.channels_left = C - p.c0;
  p.s_begin = p.piece * g.s_chunk;
  p.s_end = p.s_begin + g.s_chunk < S ? p.s_begin + g.s_chunk : S;
  return p;
}

template <typename scalar_t, Stat kStat>
__global__ void __launch_bounds__(kThreads)
    nsc_pool_forward_kernel(ForwardArgs<scalar_t> a, NscGeometry g) {
  using acc_t = acc_type<scalar_t>;
  using St = Stats<acc_t, kStat>;
  constexpr int VEC = vec_size<scalar_t>();
  __shared__ acc_t shared_v0[VEC * kThreads];
  __shared__ acc_t shared_v1[VEC * kThreads];
  // GeM keeps no index but (PowLog) a third sum.
  __shared__ acc_t shared_v2[St::kLog ? VEC * kThreads : 1];
  __shared__ int64_t shared_index[St::kPow ? 1 : VEC * kThreads];

  const NscPlace place = nsc_place<VEC>(g, a.N, a.C, a.S);
  const int tid = place.tid, bx = place.bx, by = place.by, ty = place.ty;
  const int64_t n = place.n, piece = place.piece, c0 = place.c0;
  const int64_t channels_left = place.channels_left, s_begin = place.s_begin, s_end = place.s_end;

  St t[VEC];
  Exponent<acc_t> e[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    t[j].init();
    e[j] = gem_exponent<scalar_t, kStat>(a, c0 + j < a.C ? c0 + j : 0);
  }
  if (channels_left > 0) {
    const scalar_t* base = a.x + n * a.S * a.C + c0;
    int64_t s = s_begin + ty;
    for (; s + (kUnroll - 1) * by < s_end; s += kUnroll * by) {
      Pack<scalar_t, VEC> loaded[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        loaded[u] = load_channels<scalar_t, VEC>(base + (s + u * by) * a.C, g.vectorized,
                                                 channels_left);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          t[j].add(static_cast<acc_t>(loaded[u].v[j]), s + u * by, a.eps, e[j]);
        }
      }
    }
    for (; s < s_end; s += by) {
      const auto loaded =
          load_channels<scalar_t, VEC>(base + s * a.C, g.vectorized, channels_left);
#pragma unroll
      for (int j = 0; j < VEC; ++j) t[j].add(static_cast<acc_t>(loaded.v[j]), s, a.eps, e[j]);
    }
  }

  // Fixed tree over the BY threads of each channel vector: ty < stride absorbs ty + stride.
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    shared_v0[j * kThreads + tid] = t[j].v0;
    shared_v1[j * kThreads + tid] = t[j].v1;
    if constexpr (St::kLog) shared_v2[j * kThreads + tid] = t[j].v2;
    if constexpr (!St::kPow) shared_index[j * kThreads + tid] = t[j].index;
  }
  __syncthreads();
  for (int stride = by >> 1; stride > 0; stride >>= 1) {
    if (ty < stride) {
      const int other = tid + stride * bx;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t o2 = St::kLog ? shared_v2[j * kThreads + other] : acc_t(0);
        const int64_t oindex = St::kPow ? kNoIndex : shared_index[j * kThreads + other];
        t[j].merge(shared_v0[j * kThreads + other], shared_v1[j * kThreads + other], o2, oindex,
                   e[j]);
        shared_v0[j * kThreads + tid] = t[j].v0;
        shared_v1[j * kThreads + tid] = t[j].v1;
        if constexpr (St::kLog) shared_v2[j * kThreads + tid] = t[j].v2;
        if constexpr (!St::kPow) shared_index[j * kThreads + tid] = t[j].index;
      }
    }
    __syncthreads();
  }
  if (ty == 0) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (j < channels_left) {
        emit_piece<scalar_t, kStat>(a, n * a.C + c0 + j, n, c0 + j, piece, t[j], e[j]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Combine of split reductions: 2^group_log2 lanes per row read the row's pieces.
template <typename scalar_t, Stat kStat>
__global__ void __launch_bounds__(kThreads)
    combine_pieces_kernel(ForwardArgs<scalar_t> a, int64_t rows, int group_log2) {
  using acc_t = acc_type<scalar_t>;
  const int group = 1 << group_log2;
  const int lane = threadIdx.x & (group - 1);
  const int64_t r =
      static_cast<int64_t>(blockIdx.x) * (kThreads >> group_log2) + (threadIdx.x >> group_log2);
  const bool valid = r < rows;
  using St = Stats<acc_t, kStat>;
  St t;
  t.init();
  const int64_t n = valid ? divide_index(r, a.C) : 0;
  const int64_t c = valid ? r - n * a.C : 0;
  const Exponent<acc_t> e = gem_exponent<scalar_t, kStat>(a, c);
  if (valid) {
    for (int64_t piece = lane; piece < a.split; piece += group) {
      const int64_t slot = r * a.split + piece;
      const acc_t* values = a.partial_values + St::kPartials * slot;
      t.merge(values[0], values[1], St::kLog ? values[St::kPartials - 1] : acc_t(0),
              a.partial_indices[slot], e);
    }
  }
  t.group_reduce(group, e);
  if (valid && lane == 0) write_row<scalar_t, kStat>(a, r, n, c, t, e);
}

// ---------------------------------------------------------------------------------------------
// Backward. Per row: grad_x = A + (s == index ? B : 0) (Uniform: B unused), or for GeM
// grad_x = x >= eps ? A * (x * B)^(p-1) : 0 with A = g r^(1/p - 1) / S and B = 1/M.
template <typename scalar_t>
struct BackwardArgs {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* grad_out;
  const scalar_t* x;
  const acc_t* aux;
  const int64_t* indices;
  const acc_t* weight;
  int64_t weight_stride;
  acc_t scalar;
  acc_t eps;
  scalar_t* grad_x;
  int64_t N;
  int64_t C;
  int64_t S;
  int64_t aux_columns;
  int mode;
  bool x_vectorized;  // x's 16-byte alignment matches grad_x's (NSC: also C % VEC == 0)
};

template <typename acc_t>
struct RowGradient {
  acc_t A;
  acc_t B;
  acc_t m;  // GeM: M
  int64_t index;
  Exponent<acc_t> e;  // GeM: p - 1
};

template <typename scalar_t, Grad kGrad>
__device__ __forceinline__ RowGradient<acc_type<scalar_t>> row_gradient(
    const BackwardArgs<scalar_t>& a, int64_t n, int64_t c) {
  using acc_t = acc_type<scalar_t>;
  const int64_t r = n * a.C + c;
  const acc_t count = static_cast<acc_t>(a.S);
  RowGradient<acc_t> rg{acc_t(0), acc_t(0), acc_t(0), -1, {acc_t(0), 0}};
  if constexpr (kGrad == Grad::Gem) {
    // GeM: A = g r^(1/p - 1) / S (r in [1/S, 1]: no overflow), B = 1/M. Reciprocals rather
    // than divisions: no call (see reciprocal()), so nothing is spilled around one.
    const acc_t g = static_cast<acc_t>(a.grad_out[r]);
    const acc_t p = a.weight != nullptr ? a.weight[c * a.weight_stride] : a.scalar;
    const acc_t big_m = a.aux[r * a.aux_columns];
    const acc_t mean_r = a.aux[r * a.aux_columns + 1];
    rg.A = g * accurate_pow(mean_r, reciprocal(p) - acc_t(1)) * reciprocal(count);
    rg.B = reciprocal(big_m);  // as the forward's z = y * (1/M)
    rg.m = big_m;
    rg.e.p = p - acc_t(1);
    rg.e.integral = integral_exponent(rg.e.p);
    return rg;
  }
  const Mode mode = static_cast<Mode>(a.mode);
  if (mode == Mode::Cat) {
    rg.A = static_cast<acc_t>(a.grad_out[n * 2 * a.C + c]) / count;
    rg.B = static_cast<acc_t>(a.grad_out[n * 2 * a.C + a.C + c]);
  } else {
    const acc_t g = static_cast<acc_t>(a.grad_out[r]);
    if (mode == Mode::Avg) {
      rg.A = g / count;
    } else if (mode == Mode::Max) {
      rg.B = g;
    } else if (mode == Mode::Mixed) {
      const acc_t alpha = a.weight != nullptr ? a.weight[c * a.weight_stride] : a.scalar;
      rg.A = (acc_t(1) - alpha) * g / count;
      rg.B = alpha * g;
    }
  }
  if constexpr (kGrad == Grad::UniformPlusArgmax) rg.index = a.indices[r];
  return rg;
}

template <typename scalar_t, Grad kGrad>
__device__ __forceinline__ acc_type<scalar_t> grad_value(const RowGradient<acc_type<scalar_t>>& rg,
                                                         int64_t s, acc_type<scalar_t> xv,
                                                         acc_type<scalar_t> eps) {
  using acc_t = acc_type<scalar_t>;
  if constexpr (kGrad == Grad::Uniform) {
    return rg.A;
  } else if constexpr (kGrad == Grad::UniformPlusArgmax) {
    return s == rg.index ? rg.A + rg.B : rg.A;
  } else {
    // (y/M)^(p-1) with y = x (x >= eps), z as in the forward (1 for x == M, else x * (1/M)
    // clamped to 1); NaN x: 0.
    acc_t z = xv < rg.m ? xv * rg.B : acc_t(1);
    z = z > acc_t(1) ? acc_t(1) : z;
    return xv >= eps ? rg.A * power(z, rg.e.p, rg.e.integral) : acc_t(0);
  }
}

template <typename scalar_t, Grad kGrad>
__global__ void __launch_bounds__(kThreads)
    ncs_pool_backward_kernel(BackwardArgs<scalar_t> a, NcsGeometry g) {
  using acc_t = acc_type<scalar_t>;
  constexpr int VEC = vec_size<scalar_t>();
  using VecT = Pack<scalar_t, VEC>;
  constexpr bool kReadsX = kGrad == Grad::Gem;
  const int group = 1 << g.group_log2;
  const int lane = threadIdx.x & (group - 1);
  const int64_t item = static_cast<int64_t>(blockIdx.x) * (kThreads >> g.group_log2) +
                       (threadIdx.x >> g.group_log2);
  if (item >= g.items) return;
  const int64_t r = item / g.split;
  const int64_t piece = item - r * g.split;
  const int64_t n = r / a.C;
  const RowGradient<acc_t> rg = row_gradient<scalar_t, kGrad>(a, n, r - n * a.C);
  const int64_t begin = piece * g.chunk;
  const int64_t end = begin + g.chunk < a.S ? begin + g.chunk : a.S;
  scalar_t* gx = a.grad_x + r * a.S + begin;
  const scalar_t* xs = a.x + r * a.S + begin;
  const Peel pl = peel<VEC>(gx, end - begin);

  for (int64_t i = lane; i < pl.head; i += group) {
    const acc_t xv = kReadsX ? static_cast<acc_t>(xs[i]) : acc_t(0);
    gx[i] = static_cast<scalar_t>(grad_value<scalar_t, kGrad>(rg, begin + i, xv, a.eps));
  }
  VecT* body = reinterpret_cast<VecT*>(gx + pl.head);
  const scalar_t* x_body = xs + pl.head;
  const int64_t body_s = begin + pl.head;
#pragma unroll 2
  for (int64_t v = lane; v < pl.vectors; v += group) {
    VecT x_loaded;
    if constexpr (kReadsX) {
      x_loaded = load_channels<scalar_t, VEC>(x_body + v * VEC, a.x_vectorized, VEC);
    }
    VecT values;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t xv = kReadsX ? static_cast<acc_t>(x_loaded.v[j]) : acc_t(0);
      values.v[j] =
          static_cast<scalar_t>(grad_value<scalar_t, kGrad>(rg, body_s + v * VEC + j, xv, a.eps));
    }
    body[v] = values;
  }
  const int64_t tail_start = pl.head + pl.vectors * VEC;
  for (int64_t i = lane; i < pl.tail; i += group) {
    const acc_t xv = kReadsX ? static_cast<acc_t>(xs[tail_start + i]) : acc_t(0);
    gx[tail_start + i] = static_cast<scalar_t>(
        grad_value<scalar_t, kGrad>(rg, begin + tail_start + i, xv, a.eps));
  }
}

template <typename scalar_t, Grad kGrad>
__global__ void __launch_bounds__(kThreads)
    nsc_pool_backward_kernel(BackwardArgs<scalar_t> a, NscGeometry g) {
  using acc_t = acc_type<scalar_t>;
  constexpr int VEC = vec_size<scalar_t>();
  constexpr bool kReadsX = kGrad == Grad::Gem;
  const NscPlace place = nsc_place<VEC>(g, a.N, a.C, a.S);
  const int by = place.by, ty = place.ty;
  const int64_t n = place.n, c0 = place.c0;
  const int64_t channels_left = place.channels_left, s_begin = place.s_begin, s_end = place.s_end;
  if (channels_left <= 0) return;

  RowGradient<acc_t> rg[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    rg[j] = row_gradient<scalar_t, kGrad>(a, n, j < channels_left ? c0 + j : c0);
  }
  const int64_t base = n * a.S * a.C + c0;
#pragma unroll 2
  for (int64_t s = s_begin + ty; s < s_end; s += by) {
    const int64_t offset = base + s * a.C;
    Pack<scalar_t, VEC> x_loaded;
    if constexpr (kReadsX) {
      x_loaded = load_channels<scalar_t, VEC>(a.x + offset, a.x_vectorized, channels_left);
    }
    Pack<scalar_t, VEC> values;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t xv = kReadsX ? static_cast<acc_t>(x_loaded.v[j]) : acc_t(0);
      values.v[j] = static_cast<scalar_t>(grad_value<scalar_t, kGrad>(rg[j], s, xv, a.eps));
    }
    store_channels<scalar_t, VEC>(a.grad_x + offset, values, g.vectorized, channels_left);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: geometry from the shape alone, dispatch, launches.
int ceil_log2(int64_t v) {
  int log2 = 0;
  while ((int64_t{1} << log2) < v) ++log2;
  return log2;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t checked_grid(int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "gapkernels: input too large (",
              blocks, " blocks)");
  return blocks;
}

NcsGeometry ncs_geometry(int64_t rows, int64_t S, int vec) {
  NcsGeometry g{};
  g.split = 1;
  g.chunk = S;
  if (rows < kNcsFillItems) {
    const int64_t pieces = std::min(ceil_div(kNcsFillItems, rows), ceil_div(S, kNcsMinChunk));
    if (pieces > 1) {
      g.chunk = ceil_div(ceil_div(S, pieces), kNcsChunkAlign) * kNcsChunkAlign;
      g.split = ceil_div(S, g.chunk);
    }
  }
  g.items = rows * g.split;
  g.group_log2 = std::min(ceil_log2(ceil_div(ceil_div(g.chunk, vec), kUnroll)), 5);
  g.blocks = checked_grid(ceil_div(g.items, kThreads >> g.group_log2));
  return g;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

NscGeometry nsc_geometry(int64_t N, int64_t C, int64_t S, int vec) {
  NscGeometry g{};
  const int64_t channel_vectors = ceil_div(C, vec);
  g.bx_log2 = std::min(ceil_log2(channel_vectors), 5);
  const int64_t bx = int64_t{1} << g.bx_log2;
  const int64_t by = kThreads / bx;
  g.channel_blocks = ceil_div(channel_vectors, bx);
  const int64_t base_blocks = g.channel_blocks * N;
  g.split = 1;
  g.s_chunk = S;
  if (base_blocks < kNscFillBlocks) {
    const int64_t pieces = std::min(ceil_div(kNscFillBlocks, base_blocks),
                                    ceil_div(S, by * kNscMinStepsPerThread));
    if (pieces > 1) {
      g.s_chunk = ceil_div(S, pieces);
      g.split = ceil_div(S, g.s_chunk);
    }
  }
  g.blocks = checked_grid(base_blocks * g.split);
  return g;
}

template <typename scalar_t, Stat kStat>
void launch_forward(ForwardArgs<scalar_t> args, const PoolShape& shape, const at::Tensor& x,
                    cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  constexpr int VEC = vec_size<scalar_t>();
  const int64_t rows = shape.N * shape.C;
  at::Tensor partial_values;
  at::Tensor partial_indices;
  auto make_partials = [&](int64_t split) {
    args.split = split;
    if (split > 1) {
      partial_values =
          at::empty({rows * split * Stats<acc_t, kStat>::kPartials},
                    x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      partial_indices = at::empty({rows * split}, x.options().dtype(at::kLong));
      args.partial_values = partial_values.data_ptr<acc_t>();
      args.partial_indices = partial_indices.data_ptr<int64_t>();
    }
  };
  if (shape.channels_last) {
    NscGeometry g = nsc_geometry(shape.N, shape.C, shape.S, VEC);
    g.vectorized = shape.C % VEC == 0 && aligned16(args.x);
    make_partials(g.split);
    nsc_pool_forward_kernel<scalar_t, kStat><<<g.blocks, kThreads, 0, stream>>>(args, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const NcsGeometry g = ncs_geometry(rows, shape.S, VEC);
    make_partials(g.split);
    ncs_pool_forward_kernel<scalar_t, kStat><<<g.blocks, kThreads, 0, stream>>>(args, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (args.split > 1) {
    const int group_log2 = std::min(ceil_log2(args.split), 5);
    const int64_t blocks = checked_grid(ceil_div(rows, kThreads >> group_log2));
    combine_pieces_kernel<scalar_t, kStat>
        <<<blocks, kThreads, 0, stream>>>(args, rows, group_log2);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t, Grad kGrad>
void launch_backward(BackwardArgs<scalar_t> args, const PoolShape& shape, cudaStream_t stream) {
  constexpr int VEC = vec_size<scalar_t>();
  if (shape.channels_last) {
    NscGeometry g = nsc_geometry(shape.N, shape.C, shape.S, VEC);
    g.vectorized = shape.C % VEC == 0 && aligned16(args.grad_x);
    args.x_vectorized = g.vectorized && aligned16(args.x);
    nsc_pool_backward_kernel<scalar_t, kGrad><<<g.blocks, kThreads, 0, stream>>>(args, g);
  } else {
    const NcsGeometry g = ncs_geometry(shape.N * shape.C, shape.S, VEC);
    args.x_vectorized =
        ((reinterpret_cast<uintptr_t>(args.x) ^ reinterpret_cast<uintptr_t>(args.grad_x)) &
         15u) == 0;
    ncs_pool_backward_kernel<scalar_t, kGrad><<<g.blocks, kThreads, 0, stream>>>(args, g);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
void weight_arguments(const std::optional<at::Tensor>& weight, Mode mode, const acc_t** data,
                      int64_t* stride) {
  *data = nullptr;
  *stride = 0;
  if (weight.has_value() && (mode == Mode::Mixed || mode == Mode::Gem)) {
    *data = weight->data_ptr<acc_t>();
    *stride = weight->numel() == 1 ? 0 : 1;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_forward_cuda(
    const at::Tensor& x, int64_t mode_value, const std::optional<at::Tensor>& weight,
    double scalar, double eps, bool with_log) {
  const PoolShape shape = check_forward_inputs(x, mode_value, weight, "gapkernels::pool_forward");
  TORCH_CHECK(x.is_cuda(), "gapkernels::pool_forward: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const Mode mode = static_cast<Mode>(mode_value);
  auto [out, aux, indices] = allocate_forward_outputs(x, shape, mode, with_log);
  if (shape.N == 0 || shape.C == 0) return {out, aux, indices};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "pool_forward_cuda", [&] {
        using acc_t = acc_type<scalar_t>;
        ForwardArgs<scalar_t> args{};
        args.x = x.const_data_ptr<scalar_t>();
        args.out = out.mutable_data_ptr<scalar_t>();
        args.aux = aux.numel() > 0 ? aux.mutable_data_ptr<acc_t>() : nullptr;
        args.indices = indices.numel() > 0 ? indices.mutable_data_ptr<int64_t>() : nullptr;
        weight_arguments<acc_t>(weight, mode, &args.weight, &args.weight_stride);
        args.scalar = static_cast<acc_t>(scalar);
        args.eps = static_cast<acc_t>(eps);
        args.N = shape.N;
        args.C = shape.C;
        args.S = shape.S;
        args.aux_columns = aux.size(2);
        args.cat = mode == Mode::Cat;
        args.split = 1;
        switch (mode) {
          case Mode::Avg:
            launch_forward<scalar_t, Stat::Sum>(args, shape, x, stream);
            break;
          case Mode::Max:
            launch_forward<scalar_t, Stat::Max>(args, shape, x, stream);
            break;
          case Mode::Mixed:
          case Mode::Cat:
            launch_forward<scalar_t, Stat::SumMax>(args, shape, x, stream);
            break;
          case Mode::Gem:
            if (with_log) {
              launch_forward<scalar_t, Stat::PowLog>(args, shape, x, stream);
            } else {
              launch_forward<scalar_t, Stat::Pow>(args, shape, x, stream);
            }
            break;
        }
      });
  return {out, aux, indices};
}

at::Tensor pool_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                              const at::Tensor& aux, const at::Tensor& indices, int64_t mode_value,
                              const std::optional<at::Tensor>& weight, double scalar, double eps) {
  const PoolShape shape = check_backward_inputs(grad_out, x, aux, indices, mode_value, weight);
  TORCH_CHECK(x.is_cuda(), "gapkernels::pool_backward: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const Mode mode = static_cast<Mode>(mode_value);
  at::Tensor grad_x = allocate_grad_input(x, shape);
  if (shape.N == 0 || shape.C == 0) return grad_x;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "pool_backward_cuda", [&] {
        using acc_t = acc_type<scalar_t>;
        BackwardArgs<scalar_t> args{};
        args.grad_out = grad_out.const_data_ptr<scalar_t>();
        args.x = x.const_data_ptr<scalar_t>();
        args.aux = mode == Mode::Gem ? aux.const_data_ptr<acc_t>() : nullptr;
        args.indices = mode_has_max(mode) ? indices.const_data_ptr<int64_t>() : nullptr;
        weight_arguments<acc_t>(weight, mode, &args.weight, &args.weight_stride);
        args.scalar = static_cast<acc_t>(scalar);
        args.eps = static_cast<acc_t>(eps);
        args.grad_x = grad_x.mutable_data_ptr<scalar_t>();
        args.N = shape.N;
        args.C = shape.C;
        args.S = shape.S;
        args.aux_columns = mode == Mode::Gem ? aux.size(2) : 0;
        args.mode = static_cast<int>(mode);
        switch (mode) {
          case Mode::Avg:
            launch_backward<scalar_t, Grad::Uniform>(args, shape, stream);
            break;
          case Mode::Max:
          case Mode::Mixed:
          case Mode::Cat:
            launch_backward<scalar_t, Grad::UniformPlusArgmax>(args, shape, stream);
            break;
          case Mode::Gem:
            launch_backward<scalar_t, Grad::Gem>(args, shape, stream);
            break;
        }
      });
  return grad_x;
}

}  // namespace
}  // namespace gapkernels

TORCH_LIBRARY_IMPL(gapkernels, CUDA, m) {
  m.impl("pool_forward", &gapkernels::pool_forward_cuda);
  m.impl("pool_backward", &gapkernels::pool_backward_cuda);
}
