// CPU kernels of gapkernels::pool_forward and gapkernels::pool_backward. The contract (modes,
// outputs, max/NaN semantics, determinism) is docs/DESIGN.md.
//
// One kernel template per (mode, dtype). Forward reads x once and produces every statistic the
// mode needs; backward writes grad_x once. Two layouts:
//   NCS: each (n, c) row is a contiguous run of S elements, vectorized along the run.
//   NSC: each (n, s) row holds C contiguous channels, vectorized over C with per-channel
//        accumulators in a per-task buffer.
// Reductions that must be split (few rows, long runs) are cut into pieces chosen from the shape
// only, and the pieces' partial results are merged in a fixed order, so results do not depend on
// the number of threads.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "pool_common.h"

namespace gapkernels {
namespace {

using at::vec::Vectorized;

constexpr int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Splitting a reduction: aim for this many tasks (a constant, never the thread count) ...
constexpr int64_t kTargetTasks = 64;
// ... but never pieces smaller than this many elements.
constexpr int64_t kMinTaskElements = 32768;
// NCS pieces stay well below 2**24 elements, where float-encoded lane indices stop being exact.
constexpr int64_t kMaxRunPiece = int64_t{1} << 22;
// NSC pieces (each adding C partial results) hold at least this many elements when split for
// parallelism ...
constexpr int64_t kMinChannelsPiece = int64_t{1} << 20;
// ... and at most this many rows, which bounds each per-channel float sum's length.
constexpr int64_t kMaxRowsPiece = 1024;
// NCS: a block's vector sums are folded into the running sums after every this many chunks ...
constexpr int64_t kSumBlockChunks = 16;
// ... and the max (value, index) is settled after every this many (an L1-sized block).
constexpr int64_t kMaxBlockChunks = 256;
// NSC: rows per block; a block's channel accumulators stay in registers.
constexpr int64_t kRowBlock = 16;
// Rows finalized together (vectorized pow for GEM).
constexpr int64_t kBatch = 16;
// NCS runs of at most this many elements are reduced with one row per vector lane.
constexpr int64_t kMaxLaneRun = 256;
// GEM uses repeated multiplication for integral p in [1, kMaxIntPower].
constexpr int kMaxIntPower = 8;

// grad_x is a fresh allocation that the kernel touches first; with 4 KiB pages the page faults
// cost more than writing it. Transparent huge pages (the same thing torch's THP_MEM_ALLOC_ENABLE
// asks for) cut them 512-fold. Only the 2 MiB-aligned interior of large buffers is advised.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  const uintptr_t bytes = static_cast<uintptr_t>(t.numel()) * t.element_size();
  if (bytes < 4 * kHugePage) return;
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (start + bytes) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

template <typename acc_t>
inline bool is_nan(acc_t v) {
  return v != v;
}

// Merges the max candidate (v, i) into (m, index) by the rule of docs/DESIGN.md, whatever the
// order of the candidates: a NaN wins, the largest index among NaNs, else the largest value with
// the smallest index.
template <typename acc_t>
inline void merge_max(acc_t v, int64_t i, acc_t& m, int64_t& index) {
  const bool v_nan = is_nan(v);
  const bool m_nan = is_nan(m);
  bool take;
  if (v_nan || m_nan) {
    take = v_nan && (!m_nan || i > index);
  } else {
    take = v > m || (v == m && i < index);
  }
  if (take) {
    m = v;
    index = i;
  }
}

// The sequential scan's step: (v, i) comes after every element already seen.
template <typename acc_t>
inline void scan_max(acc_t v, int64_t i, acc_t& m, int64_t& index) {
  if (v > m || is_nan(v)) {
    m = v;
    index = i;
  }
}

// The statistics of one row (or one piece of a row). `sum` is the sum of x for avg/mixed/cat.
// GEM: `max` is M, the maximum of y = clamp(x, eps) (NaN when a NaN was seen), `sum` is the sum
// of (y/M)**p and `log_sum` the sum of (y/M)**p * log(y/M) (docs/DESIGN.md, "Modes").
template <typename acc_t>
struct Partial {
  acc_t sum;
  acc_t log_sum;
  acc_t max;
  int64_t index;
};

template <typename acc_t>
inline Partial<acc_t> empty_partial() {
  return {acc_t(0), acc_t(0), -std::numeric_limits<acc_t>::infinity(), 0};
}

// p is an integer in [1, kMaxIntPower]: the exponent for repeated multiplication, else 0.
template <typename acc_t>
inline int small_integer_power(acc_t p) {
  if (p >= acc_t(1) && p <= acc_t(kMaxIntPower) && p == std::floor(p)) return static_cast<int>(p);
  return 0;
}

// Loads and stores a chunk: two accumulator vectors, 16 elements (8 for double).
template <typename scalar_t>
struct ChunkIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kVec = Vec::size();
  static constexpr int64_t kWidth = 2 * kVec;
  static constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  static_assert(!kReduced || Vectorized<scalar_t>::size() == kWidth, "chunk of 16-bit floats");

  static inline void load(const scalar_t* p, Vec& a, Vec& b) {
    if constexpr (kReduced) {
      at::vec::load_to_float(p, a, b);
    } else {
      a = Vec::loadu(p);
      b = Vec::loadu(p + kVec);
    }
  }
  static inline void store(scalar_t* p, const Vec& a, const Vec& b) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(a, b).store(p);
    } else {
      a.store(p);
      b.store(p + kVec);
    }
  }
};

// GEM's exponent for a chunk: repeated multiplication when `integer` > 0, else exp(p * log x).
template <typename acc_t>
struct ChunkPower {
  int integer;
  acc_t value;  // p, for scalar code; per-channel vectors may differ per lane
  Vectorized<acc_t> p[2];
};

template <typename acc_t>
inline Vectorized<acc_t> integer_pow(const Vectorized<acc_t>& x, int n) {
  if (n == 0) return Vectorized<acc_t>(acc_t(1));
  Vectorized<acc_t> y = x;
  for (int k = 1; k < n; ++k) y = y * x;
  return y;
}

// How a loop raises to GEM's p, fixed before the loop: kPowExp: exp(p * log x) per lane;
// kPowRuntimeInt: repeated multiplication, count known at run time; n > 0: x**n unrolled.
constexpr int kPowExp = -1;
constexpr int kPowRuntimeInt = 0;

template <int kPow, typename acc_t>
inline Vectorized<acc_t> gem_pow(const Vectorized<acc_t>& x, const Vectorized<acc_t>& log_x,
                                 const Vectorized<acc_t>& p, int n) {
  if constexpr (kPow == kPowExp) {
    return (p * log_x).exp();
  } else if constexpr (kPow == kPowRuntimeInt) {
    return integer_pow(x, n);
  } else {
    Vectorized<acc_t> y = x;
    for (int k = 1; k < kPow; ++k) y = y * x;
    return y;
  }
}

template <typename acc_t>
inline acc_t scalar_integer_pow(acc_t x, int n) {
  acc_t y = acc_t(1);
  for (int k = 0; k < n; ++k) y *= x;
  return y;
}

template <typename acc_t>
inline acc_t scalar_pow(acc_t x, int integer, acc_t p) {
  return integer > 0 ? scalar_integer_pow(x, integer) : std::exp(p * std::log(x));
}

// GEM's sums relative to a reference m0 (a running maximum, or above it) moved to another one
// m1 (neither NaN, both > 0): with k = m0/m1, sum *= k**p and
// log_sum = k**p * (log_sum + log(k) * sum), since log(y/m1) = log(y/m0) + log(k).
// k = 0 (m1 = inf) gives 0, the limit of k**p * log(k).
template <typename acc_t>
inline void gem_rescale_scalar(acc_t m0, acc_t m1, int integer, acc_t p, bool with_log, acc_t& sum,
                               acc_t& log_sum) {
  const acc_t k = m0 / m1;
  const acc_t kp = scalar_pow(k, integer, p);
  if (with_log) log_sum = k > acc_t(0) ? kp * (log_sum + std::log(k) * sum) : acc_t(0);
  sum *= kp;
}

// GEM's partial statistics of two pieces of a row combined into `into`, relative to the larger
// maximum; a NaN maximum (a NaN in x) makes everything NaN.
template <typename acc_t>
inline void gem_merge(Partial<acc_t>& into, Partial<acc_t> later, int integer, acc_t p,
                      bool with_log) {
  if (is_nan(into.max) || is_nan(later.max)) {
    into.max = into.sum = into.log_sum = std::numeric_limits<acc_t>::quiet_NaN();
    return;
  }
  if (later.max > into.max) {
    gem_rescale_scalar(into.max, later.max, integer, p, with_log, into.sum, into.log_sum);
    into.max = later.max;
  } else if (into.max > later.max) {
    gem_rescale_scalar(later.max, into.max, integer, p, with_log, later.sum, later.log_sum);
  }
  into.sum += later.sum;
  into.log_sum += later.log_sum;
}

template <Mode kMode, typename scalar_t>
struct PoolKernel {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  using IO = ChunkIO<scalar_t>;
  using Stats = Partial<acc_t>;
  using Power = ChunkPower<acc_t>;
  static constexpr int64_t V = IO::kVec;
  static constexpr int64_t W = IO::kWidth;
  static constexpr bool kSum = kMode == Mode::Avg || kMode == Mode::Mixed || kMode == Mode::Cat;
  static constexpr bool kMax = kMode == Mode::Max || kMode == Mode::Mixed || kMode == Mode::Cat;
  static constexpr bool kGem = kMode == Mode::Gem;

  struct Args {
    int64_t N, C, S;
    const acc_t* weight;  // alpha (MIXED) or p (GEM); null: `scalar`
    int64_t weight_numel;
    acc_t scalar;
    acc_t eps;
    bool with_log;
    // GEM with one p for every channel (scalar, 1-element weight, or all weights equal).
    bool uniform_p;
    acc_t param(int64_t c) const { return weight ? weight[weight_numel == 1 ? 0 : c] : scalar; }
    Power power_of(int64_t c) const {
      const acc_t p = param(c);
      return {small_integer_power(p), p, {Vec(p), Vec(p)}};
    }
  };

  // Lanes j of the chunk starting at `tail` elements before the end of a run that are not yet
  // covered by the full chunks before it.
  static inline void tail_mask(int64_t tail, Vec (&mask)[2]) {
    const Vec first(static_cast<acc_t>(W - tail));
    mask[0] = Vec::arange(acc_t(0), acc_t(1)) >= first;
    mask[1] = Vec::arange(acc_t(V), acc_t(1)) >= first;
  }

  // Calls f(pow, with_log) with GEM's way of raising to p (see kPowExp) and with_log as
  // compile-time constants, so that the loops inside f carry no per-element switches.
  template <typename F>
  static void with_power(const Power& power, bool per_lane_p, bool with_log, F&& f) {
    if constexpr (!kGem) {
      f(std::integral_constant<int, 1>(), std::false_type());
    } else {
      auto pick = [&](auto log_c) {
        if (per_lane_p || power.integer == 0)
          return f(std::integral_constant<int, kPowExp>(), log_c);
        switch (power.integer) {
          case 1:
            return f(std::integral_constant<int, 1>(), log_c);
          case 2:
            return f(std::integral_constant<int, 2>(), log_c);
          case 3:
            return f(std::integral_constant<int, 3>(), log_c);
          default:
            return f(std::integral_constant<int, kPowRuntimeInt>(), log_c);
        }
      };
      if (with_log) {
        pick(std::true_type());
      } else {
        pick(std::false_type());
      }
    }
  }

  // Adds one vector of x (lanes outside `mask` ignored when kMasked) to the per-lane sums
  // (AVG, MIXED, CAT; GEM has gem_term).
  template <bool kMasked, int kPow, bool kWithLog>
  static C10_ALWAYS_INLINE void accumulate(const Vec& v, const Vec& mask, const Vec& p, int n,
                                           const Vec& eps, Vec& sum, Vec& log_sum) {
    static_assert(!kGem, "GEM accumulates with gem_term");
    if constexpr (kSum) {
      sum += kMasked ? (v & mask) : v;
    }
  }

  static inline Vec masked_for_max(const Vec& v, const Vec& mask) {
    return Vec::blendv(Vec(-std::numeric_limits<acc_t>::infinity()), v, mask);
  }

  // The exact per-lane scan step of the max rule. cur (each lane's element index) must exceed
  // every index already in ix, so max(ix, take & cur) selects it.
  template <bool kMasked>
  static C10_ALWAYS_INLINE void update_max(const Vec& v, const Vec& cur, const Vec& mask, Vec& mx,
                                           Vec& ix) {
    const Vec value = kMasked ? masked_for_max(v, mask) : v;
    const Vec take = (value > mx) | value.isnan();
    mx = Vec::blendv(mx, value, take);
    ix = at::vec::clamp_min(ix, take & cur);
  }

  // Cheap pass over a block: the block's lane maxima and whether it holds a NaN.
  template <bool kMasked>
  static C10_ALWAYS_INLINE void track_max(const Vec& v, const Vec& mask, Vec& block_max,
                                          Vec& block_nan) {
    const Vec value = kMasked ? masked_for_max(v, mask) : v;
    block_max = at::vec::clamp_min(value, block_max);
    block_nan = block_nan | value.isnan();
  }

  static inline void update_scalar(acc_t v, int64_t i, int integer, acc_t p, acc_t eps,
                                   bool with_log, acc_t& sum, acc_t& log_sum, acc_t& mx,
                                   int64_t& index) {
    if constexpr (kSum) sum += v;
    if constexpr (kMax) scan_max(v, i, mx, index);
    if constexpr (kGem) {
      // mx is the running maximum M (it starts at eps, so it is never NaN: a NaN shows in sum).
      const acc_t y = is_nan(v) ? v : std::max(v, eps);
      if (y > mx) {
        gem_rescale_scalar(mx, y, integer, p, with_log, sum, log_sum);
        mx = y;
      }
      const acc_t z = y / mx;
      const acc_t pw = scalar_pow(z, integer, p);
      sum += pw;
      // z may underflow to 0; the clamp keeps 0 * log(z) at 0.
      if (with_log) log_sum += pw * std::max(std::log(z), std::numeric_limits<acc_t>::lowest());
    }
  }

  // ---------------------------------------------------------------- GEM, relative to the max
  //
  // Every vectorized GEM loop keeps, per lane, the running maximum `max` of y = clamp(x, eps), a
  // reference `ref` >= max, and the sums of (y/ref)**p (and of (y/ref)**p * log(y/ref)), as
  // flash-attention's online softmax does. It reads a small block of x into registers, takes the
  // block's maximum, and where that exceeds ref, moves the lanes' sums to a new reference (the
  // block's maximum times a headroom h = 2**(16/p), so that (max/ref)**p >= 2**-16) with
  // gem_rescale, before it adds the block's terms, each (y * (1/ref))**p <= 1: nothing over- or
  // underflows. The headroom makes those moves rare (the running maximum of a row grows at
  // ~ln(S) places, and most of them by less than h); the lane's sums are moved once more to its
  // exact maximum at the end (gem_to_max), so that the pieces' statistics are relative to M.
  // ref and max start at eps, a lower bound of every y. A NaN is left out of both (clamp_min
  // keeps them) and turns the sum NaN instead; gem_settle turns that into M = NaN.

  static constexpr int kAllLanes = (1 << V) - 1;
  // Register blocks: NCS chunks (2 vectors each), NSC rows (2 vectors each).
  static constexpr int kGemBlockChunks = 4;
  static constexpr int kGemBlockRows = 4;
  // log(h) * p: the headroom of a new reference is 2**16 ** (1/p).
  static constexpr double kGemHeadroomLog = 16 * 0.69314718055994530942;

  struct GemRef {
    Vec ref, inv, max;  // the reference, 1/ref and the exact running maximum, per lane
  };

  static inline Vec gem_headroom(const Vec& p) { return (Vec(acc_t(kGemHeadroomLog)) / p).exp(); }

  // Adds one vector's terms (lanes outside `mask` ignored when kMasked), relative to 1/inv_m.
  template <bool kMasked, int kPow, bool kLog>
  static C10_ALWAYS_INLINE void gem_term(const Vec& v, const Vec& mask, const Vec& inv_m,
                                         const Vec& p, int n, const Vec& eps, Vec& sum,
                                         Vec& log_sum) {
    const Vec z = at::vec::clamp_min(v, eps) * inv_m;
    if constexpr (kLog) {
      // z may underflow to 0: the clamp keeps 0 * log(z) at 0 (and NaN stays NaN).
      const Vec lg = at::vec::clamp_min(z.log(), Vec(std::numeric_limits<acc_t>::lowest()));
      const Vec pw = gem_pow<kPow>(z, lg, p, n);
      const Vec pw_lg = pw * lg;
      sum += kMasked ? (pw & mask) : pw;
      log_sum += kMasked ? (pw_lg & mask) : pw_lg;
    } else {
      const Vec pw = gem_pow<kPow>(z, kPow == kPowExp ? z.log() : z, p, n);
      sum += kMasked ? (pw & mask) : pw;
    }
  }

  // Moves kCount pairs of sums from the reference m0 to m1 in the lanes where `grew` (m0, m1 > 0
  // or m1 = inf; no NaN in either): the vector form of gem_rescale_scalar.
  template <int kPow, bool kLog, int kCount>
  static inline void gem_rescale(const Vec& m0, const Vec& m1, const Vec& grew, const Vec& p, int n,
                                 Vec (&sum)[kCount], Vec (&log_sum)[kCount]) {
    const Vec k = m0 / m1;
    const Vec log_k = kPow == kPowExp || kLog ? k.log() : k;
    const Vec kp = gem_pow<kPow>(k, log_k, p, n);
    for (int i = 0; i < kCount; ++i) {
      if constexpr (kLog) {
        const Vec moved = (kp * (log_sum[i] + log_k * sum[i])) & (k > Vec(acc_t(0)));
        log_sum[i] = Vec::blendv(log_sum[i], moved, grew);
      }
      sum[i] = Vec::blendv(sum[i], sum[i] * kp, grew);
    }
  }

  // Takes block_max into the running maximum and, where it exceeds the reference, moves the
  // kCount pairs of sums to block_max * headroom (not past the largest finite value unless
  // block_max is inf). A NaN in block_max leaves everything as it is. `on_grow` runs first when
  // a lane grows (NCS folds its block sums into the running ones there).
  template <int kPow, bool kLog, int kCount, typename F>
  static C10_ALWAYS_INLINE void gem_grow(const Vec& block_max, const Vec& p, const Vec& headroom,
                                         int n, GemRef& g, Vec (&sum)[kCount],
                                         Vec (&log_sum)[kCount], F&& on_grow) {
    g.max = at::vec::clamp_min(g.max, block_max);
    const Vec grew = block_max > g.ref;
    if (C10_UNLIKELY(grew.zero_mask() != kAllLanes)) {
      on_grow();
      const Vec top = at::vec::clamp_min(block_max, Vec(std::numeric_limits<acc_t>::max()));
      const Vec lifted = at::vec::clamp_max(block_max * headroom, top);
      const Vec ref1 = Vec::blendv(g.ref, lifted, grew);
      gem_rescale<kPow, kLog, kCount>(g.ref, ref1, grew, p, n, sum, log_sum);
      g.ref = ref1;
      g.inv = Vec(acc_t(1)) / ref1;
    }
  }

  template <int kPow, bool kLog, int kCount>
  static C10_ALWAYS_INLINE void gem_grow(const Vec& block_max, const Vec& p, const Vec& headroom,
                                         int n, GemRef& g, Vec (&sum)[kCount],
                                         Vec (&log_sum)[kCount]) {
    gem_grow<kPow, kLog, kCount>(block_max, p, headroom, n, g, sum, log_sum, [] {});
  }

  // Moves the sums from the lanes' references to `target` (their maximum, or the row's).
  template <int kPow, bool kLog, int kCount>
  static inline void gem_to_max(const GemRef& g, const Vec& target, const Vec& p, int n,
                                Vec (&sum)[kCount], Vec (&log_sum)[kCount]) {
    gem_rescale<kPow, kLog, kCount>(g.ref, target, g.ref != target, p, n, sum, log_sum);
  }

  static inline GemRef gem_start(const Vec& eps) { return {eps, Vec(acc_t(1)) / eps, eps}; }

  // The end of a piece of `count` elements of one row, `stride` apart: a NaN sum means a NaN in
  // x, unless M is +inf (inf/inf is NaN too); then the piece is scanned for a NaN.
  static inline void gem_settle(Stats& st, const scalar_t* x, int64_t count, int64_t stride) {
    if (!is_nan(st.sum)) return;
    bool has_nan = true;
    if (st.max == std::numeric_limits<acc_t>::infinity()) {
      has_nan = false;
      for (int64_t i = 0; i < count && !has_nan; ++i)
        has_nan = is_nan(static_cast<acc_t>(x[i * stride]));
    }
    if (has_nan) st.max = std::numeric_limits<acc_t>::quiet_NaN();
  }

  // GEM's statistics of the contiguous run x[0, len).
  static Stats reduce_run_gem(const scalar_t* x, int64_t len, const Power& power, const Args& a) {
    Stats st{acc_t(0), acc_t(0), a.eps, 0};
    if (len < W) {
      for (int64_t i = 0; i < len; ++i) {
        update_scalar(static_cast<acc_t>(x[i]), i, power.integer, power.value, a.eps, a.with_log,
                      st.sum, st.log_sum, st.max, st.index);
      }
      gem_settle(st, x, len, 1);
      return st;
    }
    const int64_t tail = len % W;
    const int64_t full_end = len - tail;
    with_power(power, false, a.with_log, [&](auto pow_c, auto log_c) {
      constexpr int kPow = decltype(pow_c)::value;
      constexpr bool kLog = decltype(log_c)::value;
      const Vec eps(a.eps);
      const Vec zero(acc_t(0));
      const Vec p = power.p[0];
      const int n = power.integer;
      const Vec headroom = gem_headroom(p);
      // Both halves of a chunk share the lanes' references. bsum: the sums of the current block
      // of kSumBlockChunks chunks; a move folds them into sum first.
      GemRef g = gem_start(eps);
      Vec sum[2] = {zero, zero}, log_sum[2] = {zero, zero};
      Vec bsum[2] = {zero, zero}, blog[2] = {zero, zero};
      auto grow = [&](const Vec& block_max) {
        gem_grow<kPow, kLog, 2>(block_max, p, headroom, n, g, sum, log_sum, [&] {
          for (int k = 0; k < 2; ++k) {
            sum[k] += bsum[k];
            log_sum[k] += blog[k];
            bsum[k] = zero;
            blog[k] = zero;
          }
        });
      };
      auto block = [&](const scalar_t* xb, auto chunks_c) {
        constexpr int kChunks = decltype(chunks_c)::value;
        Vec v[2 * kChunks];
        for (int j = 0; j < kChunks; ++j) IO::load(xb + j * W, v[2 * j], v[2 * j + 1]);
        Vec block_max = v[0];
        for (int j = 1; j < 2 * kChunks; ++j) block_max = at::vec::clamp_min(v[j], block_max);
        grow(block_max);
        for (int j = 0; j < 2 * kChunks; ++j) {
          gem_term<false, kPow, kLog>(v[j], zero, g.inv, p, n, eps, bsum[j & 1], blog[j & 1]);
        }
      };
      for (int64_t i = 0; i < full_end;) {
        const int64_t sum_block_end = std::min(full_end, i + kSumBlockChunks * W);
        for (; i + kGemBlockChunks * W <= sum_block_end; i += kGemBlockChunks * W) {
          block(x + i, std::integral_constant<int, kGemBlockChunks>());
        }
        for (; i < sum_block_end; i += W) block(x + i, std::integral_constant<int, 1>());
        for (int k = 0; k < 2; ++k) {
          sum[k] += bsum[k];
          log_sum[k] += blog[k];
          bsum[k] = zero;
          blog[k] = zero;
        }
      }
      if (tail) {
        // The last chunk overlaps the previous one; the mask drops the lanes already counted
        // (0 never raises m >= eps).
        Vec mask[2], v[2];
        tail_mask(tail, mask);
        IO::load(x + len - W, v[0], v[1]);
        grow(at::vec::clamp_min(v[0] & mask[0], v[1] & mask[1]));
        for (int k = 0; k < 2; ++k) {
          gem_term<true, kPow, kLog>(v[k], mask[k], g.inv, p, n, eps, sum[k], log_sum[k]);
        }
      }
      // The lanes' sums, moved to the row's maximum, added up.
      const acc_t big_m = at::vec::vec_reduce_all<acc_t>(
          [](const Vec& l, const Vec& r) { return at::vec::clamp_min(l, r); }, g.max);
      Vec total[1] = {sum[0] + sum[1]}, log_total[1] = {log_sum[0] + log_sum[1]};
      gem_to_max<kPow, kLog, 1>(g, Vec(big_m), p, n, total, log_total);
      auto add = [](const Vec& l, const Vec& r) { return l + r; };
      st.max = big_m;
      st.sum = at::vec::vec_reduce_all<acc_t>(add, total[0]);
      if constexpr (kLog) st.log_sum = at::vec::vec_reduce_all<acc_t>(add, log_total[0]);
    });
    gem_settle(st, x, len, 1);
    return st;
  }

  // ---------------------------------------------------------------- forward, NCS

  // Moves the running (max, index) of a run past x[b, e) (a multiple of W long), given the
  // block's lane maxima and NaN flags from track_max: a NaN block hands over its last NaN;
  // otherwise a block whose max beats the running one hands over its first occurrence of it.
  // With the run's tail, [e, tail_end) follows, read as the chunk at tail_end - W.
  static inline void resolve_block(const scalar_t* x, int64_t b, int64_t e, int64_t tail_end,
                                   const Vec (&block_max)[2], const Vec (&block_nan)[2],
                                   acc_t& run_max, int64_t& run_index) {
    if ((block_nan[0] | block_nan[1]).zero_mask() != (1 << V) - 1) {
      for (int64_t k = tail_end - 1; k >= b; --k) {
        if (is_nan(static_cast<acc_t>(x[k]))) {
          run_max = static_cast<acc_t>(x[k]);
          run_index = k;
          return;
        }
      }
    }
    if (is_nan(run_max)) return;
    const acc_t m = at::vec::vec_reduce_all<acc_t>(
        [](const Vec& p, const Vec& q) { return at::vec::clamp_min(p, q); },
        at::vec::clamp_min(block_max[0], block_max[1]));
    if (!(m > run_max)) return;
    run_max = m;
    const Vec target(m);
    constexpr int all_lanes = (1 << V) - 1;
    for (int64_t j = b; j < tail_end; j = j + W < e || j + W == tail_end ? j + W : tail_end - W) {
      Vec v[2];
      IO::load(x + j, v[0], v[1]);
      // zero_mask sets the bits of lanes that do not match.
      const int matches = (~(v[0] == target).zero_mask() & all_lanes) |
                          ((~(v[1] == target).zero_mask() & all_lanes) << V);
      if (matches) {
        run_index = j + __builtin_ctz(static_cast<unsigned>(matches));
        return;
      }
    }
  }

  // Statistics of the contiguous run x[0, len); indices relative to x.
  static Stats reduce_run(const scalar_t* x, int64_t len, const Power& power, const Args& a) {
    if constexpr (kGem) {
      return reduce_run_gem(x, len, power, a);
    } else {
      return reduce_run_plain(x, len, power, a);
    }
  }

  static Stats reduce_run_plain(const scalar_t* x, int64_t len, const Power& power, const Args& a) {
    Stats st = empty_partial<acc_t>();
    if (len < W) {
      const acc_t p = power.value;
      for (int64_t i = 0; i < len; ++i) {
        update_scalar(static_cast<acc_t>(x[i]), i, power.integer, p, a.eps, a.with_log, st.sum,
                      st.log_sum, st.max, st.index);
      }
      return st;
    }
    const int64_t tail = len % W;
    const int64_t full_end = len - tail;
    with_power(power, false, a.with_log, [&](auto pow_c, auto log_c) {
      constexpr int kPow = decltype(pow_c)::value;
      constexpr bool kLog = decltype(log_c)::value;
      // Accumulators are locals of this loop nest so that they stay in registers.
      const Vec eps(a.eps);
      const Vec zero(acc_t(0));
      const Vec neg_inf(-std::numeric_limits<acc_t>::infinity());
      const Vec p = power.p[0];
      const int n = power.integer;
      Vec sum0 = zero, sum1 = zero, log_sum0 = zero, log_sum1 = zero;
      Vec v0, v1;
      // Max blocks fit in L1, where resolve_block finds the index again.
      for (int64_t i = 0; i < full_end;) {
        const int64_t max_block_end = std::min(full_end, i + kMaxBlockChunks * W);
        const int64_t max_block_begin = i;
        Vec max0 = neg_inf, max1 = neg_inf, nan0 = zero, nan1 = zero;
        while (i < max_block_end) {
          const int64_t sum_block_end = std::min(max_block_end, i + kSumBlockChunks * W);
          Vec bsum0 = zero, bsum1 = zero, blog0 = zero, blog1 = zero;
          for (; i < sum_block_end; i += W) {
            IO::load(x + i, v0, v1);
            accumulate<false, kPow, kLog>(v0, zero, p, n, eps, bsum0, blog0);
            accumulate<false, kPow, kLog>(v1, zero, p, n, eps, bsum1, blog1);
            if constexpr (kMax) {
              track_max<false>(v0, zero, max0, nan0);
              track_max<false>(v1, zero, max1, nan1);
            }
          }
          sum0 += bsum0;
          sum1 += bsum1;
          log_sum0 += blog0;
          log_sum1 += blog1;
        }
        const bool with_tail = tail && max_block_end == full_end;
        if (with_tail) {
          // The last chunk overlaps the previous one; the mask drops the lanes already counted.
          Vec mask[2];
          tail_mask(tail, mask);
          IO::load(x + len - W, v0, v1);
          accumulate<true, kPow, kLog>(v0, mask[0], p, n, eps, sum0, log_sum0);
          accumulate<true, kPow, kLog>(v1, mask[1], p, n, eps, sum1, log_sum1);
          if constexpr (kMax) {
            track_max<true>(v0, mask[0], max0, nan0);
            track_max<true>(v1, mask[1], max1, nan1);
          }
        }
        if constexpr (kMax) {
          const Vec block_max[2] = {max0, max1}, block_nan[2] = {nan0, nan1};
          resolve_block(x, max_block_begin, max_block_end, with_tail ? len : max_block_end,
                        block_max, block_nan, st.max, st.index);
        }
      }
      auto add = [](const Vec& l, const Vec& r) { return l + r; };
      if constexpr (kSum || kGem) st.sum = at::vec::vec_reduce_all<acc_t>(add, sum0 + sum1);
      if constexpr (kLog) st.log_sum = at::vec::vec_reduce_all<acc_t>(add, log_sum0 + log_sum1);
    });
    return st;
  }

  // ---------------------------------------------------------------- finalize

  struct Outputs {
    scalar_t* out;
    acc_t* aux;
    int64_t aux_columns;
    int64_t* indices;
  };

  // Writes the results of rows r0 .. r0+count-1 (r = n*C + c), count <= kBatch.
  static void finalize(const Args& a, const Outputs& o, int64_t r0, int64_t count,
                       const Stats* st) {
    int64_t n = r0 / a.C;
    int64_t c = r0 - n * a.C;
    const acc_t S = static_cast<acc_t>(a.S);
    __at_align__ acc_t root[kBatch];
    if constexpr (kGem) {
      // root = r ** (1/p), r = mean((y/M)**p) in [1/S, 1].
      __at_align__ acc_t r[kBatch];
      __at_align__ acc_t inv_p[kBatch];
      int64_t cc = c;
      for (int64_t i = 0; i < kBatch; ++i) {
        r[i] = i < count ? st[i].sum / S : acc_t(1);
        inv_p[i] = i < count ? acc_t(1) / a.param(cc) : acc_t(1);
        if (++cc == a.C) cc = 0;
      }
      for (int64_t i = 0; i < kBatch; i += V) {
        (Vec::loadu(inv_p + i) * Vec::loadu(r + i).log()).exp().store(root + i);
      }
    }
    for (int64_t i = 0; i < count; ++i, ++c) {
      if (c == a.C) {
        c = 0;
        ++n;
      }
      const int64_t r = r0 + i;
      const Stats& s = st[i];
      if constexpr (kMax) o.indices[r] = s.index;
      if constexpr (kMode == Mode::Avg) {
        o.out[r] = static_cast<scalar_t>(s.sum / S);
      } else if constexpr (kMode == Mode::Max) {
        o.out[r] = static_cast<scalar_t>(s.max);
      } else if constexpr (kMode == Mode::Mixed) {
        const acc_t mean = s.sum / S;
        const acc_t alpha = a.param(c);
        o.out[r] = static_cast<scalar_t>(alpha * s.max + (acc_t(1) - alpha) * mean);
        o.aux[r] = s.max - mean;
      } else if constexpr (kMode == Mode::Cat) {
        o.out[n * 2 * a.C + c] = static_cast<scalar_t>(s.sum / S);
        o.out[n * 2 * a.C + a.C + c] = static_cast<scalar_t>(s.max);
      } else {
        // out = M * r**(1/p); M when M is +inf (r is NaN then); NaN when M is NaN.
        const acc_t big_m = s.max;
        const bool inf = big_m == std::numeric_limits<acc_t>::infinity();
        o.out[r] = static_cast<scalar_t>(inf ? big_m : big_m * root[i]);
        acc_t* aux = o.aux + r * o.aux_columns;
        aux[0] = big_m;
        aux[1] = s.sum / S;
        if (a.with_log) aux[2] = s.log_sum / S;
      }
    }
  }

  static inline void merge(Stats& into, const Stats& later) {
    into.sum += later.sum;
    into.log_sum += later.log_sum;
    if constexpr (kMax) merge_max(later.max, later.index, into.max, into.index);
  }

  // Merges pieces [r * P, r * P + P) of `parts` in order and finalizes rows [begin, end).
  static void merge_and_finalize(const Args& a, const Outputs& o, const std::vector<Stats>& parts,
                                 int64_t pieces, int64_t begin, int64_t end) {
    Stats st[kBatch];
    for (int64_t r0 = begin; r0 < end; r0 += kBatch) {
      const int64_t count = std::min(kBatch, end - r0);
      for (int64_t i = 0; i < count; ++i) {
        const Stats* row = parts.data() + (r0 + i) * pieces;
        st[i] = row[0];
        if constexpr (kGem) {
          const acc_t p = a.param((r0 + i) % a.C);
          const int integer = small_integer_power(p);
          for (int64_t k = 1; k < pieces; ++k) gem_merge(st[i], row[k], integer, p, a.with_log);
        } else {
          for (int64_t k = 1; k < pieces; ++k) merge(st[i], row[k]);
        }
      }
      finalize(a, o, r0, count, st);
    }
  }

  static void forward_ncs(const scalar_t* x, const Args& a, const Outputs& o) {
    const int64_t R = a.N * a.C;
    const int64_t S = a.S;
    int64_t pieces = ceil_div(S, kMaxRunPiece);
    if (R < kTargetTasks) {
      pieces = std::max(pieces, std::min(ceil_div(kTargetTasks, R), ceil_div(S, kMinTaskElements)));
    }
    const int64_t piece_len = ceil_div(ceil_div(S, pieces), 16) * 16;
    pieces = ceil_div(S, piece_len);
    if constexpr (kLanes) {
      if (pieces == 1 && S >= 8 && S <= kMaxLaneRun) return forward_ncs_lanes(x, a, o);
    }
    if (pieces == 1) {
      const int64_t grain = std::max<int64_t>(1, kMinTaskElements / S);
      at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
        Stats st[kBatch];
        for (int64_t r0 = begin; r0 < end; r0 += kBatch) {
          const int64_t count = std::min(kBatch, end - r0);
          int64_t c = r0 % a.C;
          for (int64_t i = 0; i < count; ++i) {
            const Power power = kGem ? a.power_of(c) : Power{};
            st[i] = reduce_run(x + (r0 + i) * S, S, power, a);
            if (++c == a.C) c = 0;
          }
          finalize(a, o, r0, count, st);
        }
      });
      return;
    }
    std::vector<Stats> parts(R * pieces);
    at::parallel_for(0, R * pieces, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r = t / pieces;
        const int64_t start = (t - r * pieces) * piece_len;
        const int64_t len = std::min(S, start + piece_len) - start;
        const Power power = kGem ? a.power_of(r % a.C) : Power{};
        Stats st = reduce_run(x + r * S + start, len, power, a);
        st.index += start;
        parts[t] = st;
      }
    });
    at::parallel_for(0, R, kBatch, [&](int64_t begin, int64_t end) {
      merge_and_finalize(a, o, parts, pieces, begin, end);
    });
  }

  // ---------------------------------------------------------------- forward, NCS short runs

  // Short runs are reduced kBatch rows at a time with one row per vector lane, so that every
  // statistic is a vertical operation and no row pays for horizontal reductions. AVG gains
  // nothing from it (measured: slower than its plain run loop).
  static constexpr bool kLanes =
      kMode != Mode::Avg && std::is_same_v<acc_t, float> && V == 8 && kBatch == 2 * V;

  static C10_ALWAYS_INLINE Vec load_row8(const scalar_t* p) {
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
    __at_align__ acc_t buf[8];
    for (int j = 0; j < 8; ++j) buf[j] = static_cast<acc_t>(p[j]);
    return Vec::loadu(buf);
#endif
  }

  // t[j] lane l = x[l * stride + j], for l, j < 8.
  static C10_ALWAYS_INLINE void load_tile(const scalar_t* x, int64_t stride, Vec (&t)[8]) {
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
    __at_align__ acc_t buf[8][8];
    for (int l = 0; l < 8; ++l) {
      for (int j = 0; j < 8; ++j) buf[j][l] = static_cast<acc_t>(x[l * stride + j]);
    }
    for (int j = 0; j < 8; ++j) t[j] = Vec::loadu(buf[j]);
#endif
  }

  // Statistics of the kBatch rows x[0, kBatch * S), row r0 first, S >= 8. The max is tracked
  // with a NaN-blind maximum; a row whose sum turns out NaN (a NaN, or inf and -inf) is reduced
  // again by reduce_run, which applies the exact rule.
  static void reduce_lanes(const scalar_t* x, int64_t r0, const Args& a, Stats* st) {
    const int64_t S = a.S;
    const int64_t c0 = r0 % a.C;
    const Power power = kGem ? a.power_of(c0) : Power{};
    const bool per_lane_p = kGem && !a.uniform_p;
    Vec p[2] = {power.p[0], power.p[1]};
    if (per_lane_p) {
      __at_align__ acc_t pl[kBatch];
      for (int64_t i = 0, c = c0; i < kBatch; ++i) {
        pl[i] = a.param(c);
        if (++c == a.C) c = 0;
      }
      p[0] = Vec::loadu(pl);
      p[1] = Vec::loadu(pl + V);
    }
    __at_align__ acc_t sums[kBatch], log_sums[kBatch], maxima[kBatch], indices[kBatch];
    with_power(power, per_lane_p, a.with_log, [&](auto pow_c, auto log_c) {
      constexpr int kPow = decltype(pow_c)::value;
      constexpr bool kLog = decltype(log_c)::value;
      const Vec eps(a.eps);
      const Vec zero(acc_t(0));
      const int n = power.integer;
      Vec sum[2] = {zero, zero}, log_sum[2] = {zero, zero}, ix[2] = {zero, zero};
      Vec mx[2] = {Vec(-std::numeric_limits<acc_t>::infinity()),
                   Vec(-std::numeric_limits<acc_t>::infinity())};
      // Both halves of the batch advance together: two independent dependency chains.
      auto step = [&](const Vec& v, const Vec& cur, int k) {
        accumulate<false, kPow, kLog>(v, zero, p[k], n, eps, sum[k], log_sum[k]);
        if constexpr (kMax) {
          if constexpr (!kSum) sum[k] += v;
          ix[k] = at::vec::clamp_min(ix[k], (v > mx[k]) & cur);
          mx[k] = at::vec::clamp_min(v, mx[k]);
        }
      };
      Vec t[8];
      int64_t s0 = 0;
      for (; s0 + 8 <= S; s0 += 8) {
        for (int k = 0; k < 2; ++k) {
          load_tile(x + k * V * S + s0, S, t);
          for (int j = 0; j < 8; ++j) step(t[j], Vec(static_cast<acc_t>(s0 + j)), k);
        }
      }
      if (s0 < S) {
        // The last tile overlaps the previous one; its first columns were already counted.
        const int64_t base = S - 8;
        for (int k = 0; k < 2; ++k) {
          load_tile(x + k * V * S + base, S, t);
          for (int64_t j = s0 - base; j < 8; ++j) step(t[j], Vec(static_cast<acc_t>(base + j)), k);
        }
      }
      for (int k = 0; k < 2; ++k) {
        sum[k].store(sums + k * V);
        log_sum[k].store(log_sums + k * V);
        mx[k].store(maxima + k * V);
        ix[k].store(indices + k * V);
      }
    });
    for (int64_t i = 0, c = c0; i < kBatch; ++i) {
      if (kMax && is_nan(sums[i])) {
        st[i] = reduce_run(x + i * S, S, kGem ? a.power_of(c) : Power{}, a);
      } else {
        st[i] = {kMax && !kSum ? acc_t(0) : sums[i], log_sums[i], maxima[i],
                 static_cast<int64_t>(indices[i])};
      }
      if (++c == a.C) c = 0;
    }
  }

  // GEM's version of reduce_lanes: each lane (row) keeps its running maximum, raised once per
  // tile of 8 columns before the tile's terms are added. A row whose sum is NaN is reduced again
  // by reduce_run, which settles it.
  static void reduce_lanes_gem(const scalar_t* x, int64_t r0, const Args& a, Stats* st) {
    const int64_t S = a.S;
    const int64_t c0 = r0 % a.C;
    const Power power = a.power_of(c0);
    const bool per_lane_p = !a.uniform_p;
    Vec p[2] = {power.p[0], power.p[1]};
    if (per_lane_p) {
      __at_align__ acc_t pl[kBatch];
      for (int64_t i = 0, c = c0; i < kBatch; ++i) {
        pl[i] = a.param(c);
        if (++c == a.C) c = 0;
      }
      p[0] = Vec::loadu(pl);
      p[1] = Vec::loadu(pl + V);
    }
    __at_align__ acc_t sums[kBatch], log_sums[kBatch], maxima[kBatch];
    with_power(power, per_lane_p, a.with_log, [&](auto pow_c, auto log_c) {
      constexpr int kPow = decltype(pow_c)::value;
      constexpr bool kLog = decltype(log_c)::value;
      const Vec eps(a.eps);
      const Vec zero(acc_t(0));
      const int n = power.integer;
      const Vec headroom[2] = {gem_headroom(p[0]), gem_headroom(p[1])};
      Vec sum[2][1] = {{zero}, {zero}}, log_sum[2][1] = {{zero}, {zero}};
      GemRef g[2] = {gem_start(eps), gem_start(eps)};
      Vec t[8];
      // Columns [j0, 8) of the tile at column `base`, for both halves of the batch.
      auto tile = [&](int64_t base, int64_t j0) {
        for (int k = 0; k < 2; ++k) {
          load_tile(x + k * V * S + base, S, t);
          Vec block_max = t[j0];
          for (int64_t j = j0 + 1; j < 8; ++j) block_max = at::vec::clamp_min(t[j], block_max);
          gem_grow<kPow, kLog, 1>(block_max, p[k], headroom[k], n, g[k], sum[k], log_sum[k]);
          for (int64_t j = j0; j < 8; ++j) {
            gem_term<false, kPow, kLog>(t[j], zero, g[k].inv, p[k], n, eps, sum[k][0],
                                        log_sum[k][0]);
          }
        }
      };
      int64_t s0 = 0;
      for (; s0 + 8 <= S; s0 += 8) tile(s0, 0);
      // The last tile overlaps the previous one; its first columns were already counted.
      if (s0 < S) tile(S - 8, s0 - (S - 8));
      for (int k = 0; k < 2; ++k) {
        gem_to_max<kPow, kLog, 1>(g[k], g[k].max, p[k], n, sum[k], log_sum[k]);
        sum[k][0].store(sums + k * V);
        log_sum[k][0].store(log_sums + k * V);
        g[k].max.store(maxima + k * V);
      }
    });
    for (int64_t i = 0, c = c0; i < kBatch; ++i) {
      if (is_nan(sums[i])) {
        st[i] = reduce_run(x + i * S, S, a.power_of(c), a);
      } else {
        st[i] = {sums[i], log_sums[i], maxima[i], 0};
      }
      if (++c == a.C) c = 0;
    }
  }

  static void forward_ncs_lanes(const scalar_t* x, const Args& a, const Outputs& o) {
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
          if constexpr (kGem) {
            reduce_lanes_gem(x + r0 * S, r0, a, st);
          } else {
            reduce_lanes(x + r0 * S, r0, a, st);
          }
        } else {
          for (int64_t i = 0, c = r0 % a.C; i < count; ++i) {
            st[i] = reduce_run(x + (r0 + i) * S, S, kGem ? a.power_of(c) : Power{}, a);
            if (++c == a.C) c = 0;
          }
        }
        finalize(a, o, r0, count, st);
      }
    });
  }

  // ---------------------------------------------------------------- forward, NSC

  struct ChannelBuffers {
    // ref: GEM's references (see reduce_run_gem); empty for the other modes.
    std::vector<acc_t> sum, log_sum, max, index, ref;
    explicit ChannelBuffers(int64_t C) : sum(C), log_sum(C), max(C), index(C), ref(kGem ? C : 0) {}
    // GEM's running maxima start at eps, the max modes' at -inf.
    void reset(acc_t max_start) {
      std::fill(sum.begin(), sum.end(), acc_t(0));
      std::fill(log_sum.begin(), log_sum.end(), acc_t(0));
      std::fill(max.begin(), max.end(), max_start);
      std::fill(index.begin(), index.end(), acc_t(0));
      std::fill(ref.begin(), ref.end(), max_start);
    }
  };

  // GEM's version of reduce_channels: each channel keeps its running maximum in b.max and its
  // reference in b.ref, raised once per kGemBlockRows rows (read into registers first) before
  // their terms are added. The rows of the next block are prefetched, as in reduce_channels_max:
  // with the extra work per element, the hardware prefetcher alone no longer keeps up.
  template <bool kMasked, int kPow, bool kLog>
  static void reduce_channels_gem(const scalar_t* xn, int64_t s0, int64_t s1, int64_t c,
                                  const Vec (&mask)[2], const Args& a, const Power& power,
                                  ChannelBuffers& b) {
    const int64_t C = a.C;
    const Vec eps(a.eps);
    const int n = power.integer;
    const Vec p[2] = {kPow == kPowExp && !a.uniform_p ? Vec::loadu(a.weight + c) : power.p[0],
                      kPow == kPowExp && !a.uniform_p ? Vec::loadu(a.weight + c + V) : power.p[1]};
    const Vec headroom[2] = {gem_headroom(p[0]), gem_headroom(p[1])};
    Vec sum[2][1], log_sum[2][1];
    GemRef g[2];
    for (int k = 0; k < 2; ++k) {
      sum[k][0] = Vec::loadu(b.sum.data() + c + k * V);
      log_sum[k][0] = Vec::loadu(b.log_sum.data() + c + k * V);
      g[k].max = Vec::loadu(b.max.data() + c + k * V);
      g[k].ref = Vec::loadu(b.ref.data() + c + k * V);
      g[k].inv = Vec(acc_t(1)) / g[k].ref;
    }
    // Integer arithmetic: the address may lie past the end of x.
    const uintptr_t ahead = static_cast<uintptr_t>(kRowBlock * C) * sizeof(scalar_t);
    auto rows = [&](int64_t r, auto rows_c) {
      constexpr int kRows = decltype(rows_c)::value;
      Vec v[kRows][2];
      for (int i = 0; i < kRows; ++i) {
        const scalar_t* row = xn + (r + i) * C + c;
        __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(row) + ahead));
        IO::load(row, v[i][0], v[i][1]);
      }
      for (int k = 0; k < 2; ++k) {
        // Masked lanes (channels of the previous chunk) read 0, which never raises max >= eps.
        Vec block_max = kMasked ? v[0][k] & mask[k] : v[0][k];
        for (int i = 1; i < kRows; ++i) {
          block_max = at::vec::clamp_min(kMasked ? v[i][k] & mask[k] : v[i][k], block_max);
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

  // Folds the sums of channels [c, c + W) of rows [s0, s1) into the channel buffers, in blocks
  // of kRowBlock rows so that the accumulators stay in registers within a block.
  template <bool kMasked, int kPow, bool kLog>
  static void reduce_channels(const scalar_t* xn, int64_t s0, int64_t s1, int64_t c,
                              const Vec (&mask)[2], const Args& a, const Power& power,
                              ChannelBuffers& b) {
    const int64_t C = a.C;
    const Vec eps(a.eps);
    const int n = power.integer;
    const Vec p[2] = {kPow == kPowExp && !a.uniform_p ? Vec::loadu(a.weight + c) : power.p[0],
                      kPow == kPowExp && !a.uniform_p ? Vec::loadu(a.weight + c + V) : power.p[1]};
    Vec sum[2], log_sum[2];
    for (int k = 0; k < 2; ++k) {
      sum[k] = Vec::loadu(b.sum.data() + c + k * V);
      log_sum[k] = Vec::loadu(b.log_sum.data() + c + k * V);
    }
    Vec v[2];
    for (int64_t r = s0; r < s1; ++r) {
      IO::load(xn + r * C + c, v[0], v[1]);
      for (int k = 0; k < 2; ++k) {
        accumulate<kMasked, kPow, kLog>(v[k], mask[k], p[k], n, eps, sum[k], log_sum[k]);
      }
    }
    for (int k = 0; k < 2; ++k) {
      sum[k].store(b.sum.data() + c + k * V);
      log_sum[k].store(b.log_sum.data() + c + k * V);
    }
  }

  // The max modes' version of reduce_channels. Without NaNs the scan step is a strict compare,
  // a max keeping the old value on ties and an index blend; a NaN probe (a sum, which any NaN
  // turns into NaN; a false alarm only costs time) or a NaN running max tells when the block (now
  // in L1) must be scanned again with the exact rule, from the state before it. The rows of the
  // next block are prefetched: a block's rows are far apart, too many streams for the hardware
  // prefetcher. Past the end of the rows too: the next piece or sample follows in memory, and a
  // prefetch never faults.
  template <bool kMasked>
  static void reduce_channels_max(const scalar_t* xn, int64_t piece_start, int64_t s0, int64_t s1,
                                  int64_t c, const Vec (&mask)[2], int64_t C, ChannelBuffers& b) {
    Vec probe[2], mx[2], ix[2];
    for (int k = 0; k < 2; ++k) {
      probe[k] = kSum ? Vec::loadu(b.sum.data() + c + k * V) : Vec(acc_t(0));
      mx[k] = Vec::loadu(b.max.data() + c + k * V);
      ix[k] = Vec::loadu(b.index.data() + c + k * V);
    }
    const Vec mx0[2] = {mx[0], mx[1]}, ix0[2] = {ix[0], ix[1]};
    // Integer arithmetic: the address may lie past the end of x.
    const uintptr_t ahead = static_cast<uintptr_t>(kRowBlock * C) * sizeof(scalar_t);
    Vec v[2];
    for (int64_t r = s0; r < s1; ++r) {
      const scalar_t* row = xn + r * C + c;
      __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(row) + ahead));
      IO::load(row, v[0], v[1]);
      const Vec cur(static_cast<acc_t>(r - piece_start));
      for (int k = 0; k < 2; ++k) {
        probe[k] += kMasked ? (v[k] & mask[k]) : v[k];
        const Vec value = kMasked ? masked_for_max(v[k], mask[k]) : v[k];
        const Vec take = value > mx[k];
        mx[k] = at::vec::clamp_min(mx[k], value);
        ix[k] = Vec::blendv(ix[k], cur, take);
      }
    }
    if constexpr (kSum) {
      for (int k = 0; k < 2; ++k) probe[k].store(b.sum.data() + c + k * V);
    }
    const Vec nan = probe[0].isnan() | probe[1].isnan() | mx0[0].isnan() | mx0[1].isnan();
    if (nan.zero_mask() != (1 << V) - 1) {
      for (int k = 0; k < 2; ++k) {
        mx[k] = mx0[k];
        ix[k] = ix0[k];
      }
      for (int64_t r = s0; r < s1; ++r) {
        IO::load(xn + r * C + c, v[0], v[1]);
        const Vec cur(static_cast<acc_t>(r - piece_start));
        for (int k = 0; k < 2; ++k) update_max<kMasked>(v[k], cur, mask[k], mx[k], ix[k]);
      }
    }
    for (int k = 0; k < 2; ++k) {
      mx[k].store(b.max.data() + c + k * V);
      ix[k].store(b.index.data() + c + k * V);
    }
  }

  // Accumulates rows [s0, s1) of sample xn (S x C, C contiguous) into the channel buffers;
  // buffer indices are relative to s0.
  static void reduce_rows(const scalar_t* xn, int64_t s0, int64_t s1, const Args& a,
                          const Power& uniform, ChannelBuffers& b) {
    const int64_t C = a.C;
    b.reset(kGem ? a.eps : -std::numeric_limits<acc_t>::infinity());
    if (C < W) {
      for (int64_t s = s0; s < s1; ++s) {
        const scalar_t* row = xn + s * C;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t p = a.param(c);
          int64_t index = static_cast<int64_t>(b.index[c]);
          update_scalar(static_cast<acc_t>(row[c]), s - s0, small_integer_power(p), p, a.eps,
                        a.with_log, b.sum[c], b.log_sum[c], b.max[c], index);
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
    with_power(uniform, !a.uniform_p, a.with_log, [&](auto pow_c, auto log_c) {
      constexpr int kPow = decltype(pow_c)::value;
      constexpr bool kLog = decltype(log_c)::value;
      for (int64_t s = s0; s < s1; s += kRowBlock) {
        const int64_t s_end = std::min(s1, s + kRowBlock);
        if constexpr (kMax) {
          for (int64_t c = 0; c < full_end; c += W) {
            reduce_channels_max<false>(xn, s0, s, s_end, c, mask, C, b);
          }
          if (tail) reduce_channels_max<true>(xn, s0, s, s_end, C - W, mask, C, b);
        } else if constexpr (kGem) {
          for (int64_t c = 0; c < full_end; c += W) {
            reduce_channels_gem<false, kPow, kLog>(xn, s, s_end, c, mask, a, uniform, b);
          }
          if (tail) reduce_channels_gem<true, kPow, kLog>(xn, s, s_end, C - W, mask, a, uniform, b);
        } else {
          for (int64_t c = 0; c < full_end; c += W) {
            reduce_channels<false, kPow, kLog>(xn, s, s_end, c, mask, a, uniform, b);
          }
          if (tail) reduce_channels<true, kPow, kLog>(xn, s, s_end, C - W, mask, a, uniform, b);
        }
      }
    });
  }

  // Channel c's statistics of rows [s0, s1) of sample xn. GEM's sums are moved from the
  // channel's reference to its maximum.
  static inline Stats channel_stats(const ChannelBuffers& b, int64_t c, const scalar_t* xn,
                                    int64_t s0, int64_t s1, const Args& a) {
    Stats st{b.sum[c], b.log_sum[c], b.max[c], s0 + static_cast<int64_t>(b.index[c])};
    if constexpr (kGem) {
      if (b.ref[c] != st.max) {
        const acc_t p = a.param(c);
        gem_rescale_scalar(b.ref[c], st.max, small_integer_power(p), p, a.with_log, st.sum,
                           st.log_sum);
      }
      gem_settle(st, xn + s0 * a.C + c, s1 - s0, a.C);
    }
    return st;
  }

  static void forward_nsc(const scalar_t* x, const Args& a, const Outputs& o) {
    const int64_t N = a.N, C = a.C, S = a.S;
    int64_t pieces = ceil_div(S, kMaxRowsPiece);
    if (N < kTargetTasks) {
      // Each piece costs C partial results to write and merge, so pieces stay large.
      pieces =
          std::max(pieces, std::min(ceil_div(kTargetTasks, N), ceil_div(S * C, kMinChannelsPiece)));
    }
    pieces = std::min(pieces, S);
    const int64_t rows = ceil_div(S, pieces);
    pieces = ceil_div(S, rows);
    const Power uniform = kGem ? a.power_of(0) : Power{};
    std::vector<Stats> parts(pieces > 1 ? N * pieces * C : 0);
    at::parallel_for(0, N * pieces, 1, [&](int64_t begin, int64_t end) {
      ChannelBuffers b(C);
      Stats st[kBatch];
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / pieces;
        const int64_t s0 = (t - n * pieces) * rows;
        const int64_t s1 = std::min(S, s0 + rows);
        const scalar_t* xn = x + n * S * C;
        reduce_rows(xn, s0, s1, a, uniform, b);
        if (pieces == 1) {
          for (int64_t c0 = 0; c0 < C; c0 += kBatch) {
            const int64_t count = std::min(kBatch, C - c0);
            for (int64_t i = 0; i < count; ++i) st[i] = channel_stats(b, c0 + i, xn, s0, s1, a);
            finalize(a, o, n * C + c0, count, st);
          }
        } else {
          // parts is ordered (n, c, piece) so that merging reads each row's pieces in a run.
          const int64_t k = t - n * pieces;
          for (int64_t c = 0; c < C; ++c) {
            parts[(n * C + c) * pieces + k] = channel_stats(b, c, xn, s0, s1, a);
          }
        }
      }
    });
    if (pieces > 1) {
      at::parallel_for(0, N * C, kBatch, [&](int64_t begin, int64_t end) {
        merge_and_finalize(a, o, parts, pieces, begin, end);
      });
    }
  }

  // ---------------------------------------------------------------- backward

  struct Grad {
    const scalar_t* grad_out;
    const acc_t* aux;
    int64_t aux_columns;
    const int64_t* indices;
  };

  // grad_x[r, s] = A[r] * f(x) + (s == index[r]) * B[r], f = 1 except for GEM, where
  // f = (x * B[r])**(p-1) for x >= eps, else 0, with A = g * r**(1/p - 1) / S and B = 1/M.
  // Fills rows r0 .. r0+count-1, count <= kBatch.
  static void row_coefficients(const Args& a, const Grad& g, int64_t r0, int64_t count, acc_t* A,
                               acc_t* B, int64_t* index) {
    int64_t n = r0 / a.C;
    int64_t c = r0 - n * a.C;
    const acc_t S = static_cast<acc_t>(a.S);
    if constexpr (kGem) {
      __at_align__ acc_t big_m[kBatch];
      __at_align__ acc_t ratio[kBatch];
      __at_align__ acc_t exponent[kBatch];
      __at_align__ acc_t go[kBatch];
      for (int64_t i = 0; i < kBatch; ++i) {
        const int64_t r = r0 + i;
        big_m[i] = i < count ? g.aux[r * g.aux_columns] : acc_t(1);
        ratio[i] = i < count ? g.aux[r * g.aux_columns + 1] : acc_t(1);
        exponent[i] = i < count ? acc_t(1) / a.param(c) - acc_t(1) : acc_t(0);
        go[i] = i < count ? static_cast<acc_t>(g.grad_out[r]) : acc_t(0);
        if (++c == a.C) c = 0;
      }
      for (int64_t i = 0; i < kBatch; i += V) {
        const Vec pw = (Vec::loadu(exponent + i) * Vec::loadu(ratio + i).log()).exp();
        (Vec::loadu(go + i) * pw / Vec(S)).store(A + i);
        (Vec(acc_t(1)) / Vec::loadu(big_m + i)).store(B + i);
      }
      return;
    }
    for (int64_t i = 0; i < count; ++i, ++c) {
      if (c == a.C) {
        c = 0;
        ++n;
      }
      const int64_t r = r0 + i;
      if constexpr (kMax) index[i] = g.indices[r];
      if constexpr (kMode == Mode::Cat) {
        A[i] = static_cast<acc_t>(g.grad_out[n * 2 * a.C + c]) / S;
        B[i] = static_cast<acc_t>(g.grad_out[n * 2 * a.C + a.C + c]);
      } else {
        const acc_t go = static_cast<acc_t>(g.grad_out[r]);
        if constexpr (kMode == Mode::Avg) {
          A[i] = go / S;
        } else if constexpr (kMode == Mode::Max) {
          A[i] = acc_t(0);
          B[i] = go;
        } else {
          const acc_t alpha = a.param(c);
          A[i] = (acc_t(1) - alpha) * go / S;
          B[i] = alpha * go;
        }
      }
    }
  }

  // One chunk of grad_x: A + (cur == index) * B, or GEM's A * (x * B)**(p-1) masked by x >= eps.
  // z**(p-1), z = y/M in [0, 1], with GEM's way of raising to p fixed by kPow (see kPowExp).
  template <int kPow>
  static C10_ALWAYS_INLINE Vec grad_pow(const Vec& v, const Vec& p, int n) {
    if constexpr (kPow == kPowExp) {
      // z may underflow to 0: the clamp keeps 0**0 (p = 1) at 1.
      const Vec lg = at::vec::clamp_min(v.log(), Vec(std::numeric_limits<acc_t>::lowest()));
      return ((p - Vec(acc_t(1))) * lg).exp();
    } else if constexpr (kPow == kPowRuntimeInt) {
      return integer_pow(v, n - 1);
    } else if constexpr (kPow == 1) {
      return Vec(acc_t(1));
    } else {
      Vec y = v;
      for (int k = 2; k < kPow; ++k) y = y * v;
      return y;
    }
  }

  template <int kPow>
  static inline void grad_chunk(const Vec (&A)[2], const Vec (&B)[2], const Vec (&index)[2],
                                const Vec (&cur)[2], const scalar_t* x, const Power& power,
                                const Vec& eps, Vec (&out)[2]) {
    if constexpr (kGem) {
      Vec v[2];
      IO::load(x, v[0], v[1]);
      for (int k = 0; k < 2; ++k) {
        const Vec pw = grad_pow<kPow>(v[k] * B[k], power.p[k], power.integer);
        out[k] = (A[k] * pw) & (v[k] >= eps);
      }
    } else if constexpr (kMax) {
      for (int k = 0; k < 2; ++k) out[k] = A[k] + ((cur[k] == index[k]) & B[k]);
    } else {
      out[0] = A[0];
      out[1] = A[1];
    }
  }

  static inline acc_t grad_scalar(acc_t A, acc_t B, int64_t index, int64_t s, acc_t x, int integer,
                                  acc_t p, acc_t eps) {
    if constexpr (kGem) {
      if (!(x >= eps)) return acc_t(0);
      const acc_t z = x * B;
      const acc_t pw =
          integer > 0
              ? scalar_integer_pow(z, integer - 1)
              : std::exp((p - 1) * std::max(std::log(z), std::numeric_limits<acc_t>::lowest()));
      return A * pw;
    } else if constexpr (kMax) {
      return s == index ? A + B : A;
    } else {
      return A;
    }
  }

  // Writes grad_x[start, end) of one NCS row.
  static void grad_run(scalar_t* gx, const scalar_t* x, int64_t start, int64_t end, acc_t A,
                       acc_t B, int64_t index, const Power& power, const Args& a) {
    const int64_t len = end - start;
    gx += start;
    x += start;
    if (len < W) {
      const acc_t p = power.value;
      for (int64_t i = 0; i < len; ++i) {
        gx[i] = static_cast<scalar_t>(grad_scalar(A, B, index, start + i,
                                                  kGem ? static_cast<acc_t>(x[i]) : acc_t(0),
                                                  power.integer, p, a.eps));
      }
      return;
    }
    const Vec eps(a.eps);
    const Vec Av[2] = {Vec(A), Vec(A)};
    const Vec Bv[2] = {Vec(B), Vec(B)};
    const acc_t local_index =
        index >= start && index < end ? static_cast<acc_t>(index - start) : acc_t(-1);
    const Vec iv[2] = {Vec(local_index), Vec(local_index)};
    const Vec lane0 = Vec::arange(acc_t(0), acc_t(1));
    const Vec lane1 = Vec::arange(acc_t(V), acc_t(1));
    const Vec step(static_cast<acc_t>(W));
    with_power(power, false, false, [&](auto pow_c, auto) {
      constexpr int kPow = decltype(pow_c)::value;
      Vec cur[2] = {lane0, lane1};
      Vec out[2];
      int64_t i = 0;
      for (; i + W <= len; i += W) {
        grad_chunk<kPow>(Av, Bv, iv, cur, x + i, power, eps, out);
        IO::store(gx + i, out[0], out[1]);
        cur[0] += step;
        cur[1] += step;
      }
      if (i < len) {
        // The last chunk overlaps the previous one; those lanes get the same values again.
        const Vec base(static_cast<acc_t>(len - W));
        const Vec tail_cur[2] = {lane0 + base, lane1 + base};
        grad_chunk<kPow>(Av, Bv, iv, tail_cur, x + len - W, power, eps, out);
        IO::store(gx + len - W, out[0], out[1]);
      }
    });
  }

  static void backward_ncs(const scalar_t* x, scalar_t* gx, const Args& a, const Grad& g) {
    const int64_t R = a.N * a.C;
    const int64_t S = a.S;
    // Every element is computed independently; pieces only spread long rows over threads and
    // keep float-encoded indices exact.
    const int64_t pieces = ceil_div(S, int64_t{1} << 18);
    const int64_t piece_len = ceil_div(S, pieces);
    if (pieces == 1) {
      const int64_t grain = std::max<int64_t>(1, kMinTaskElements / S);
      at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
        __at_align__ acc_t A[kBatch], B[kBatch];
        int64_t index[kBatch];
        for (int64_t r0 = begin; r0 < end; r0 += kBatch) {
          const int64_t count = std::min(kBatch, end - r0);
          row_coefficients(a, g, r0, count, A, B, index);
          int64_t c = r0 % a.C;
          for (int64_t i = 0; i < count; ++i) {
            const int64_t r = r0 + i;
            const Power power = kGem ? a.power_of(c) : Power{};
            grad_run(gx + r * S, x + r * S, 0, S, A[i], kMax || kGem ? B[i] : acc_t(0),
                     kMax ? index[i] : -1, power, a);
            if (++c == a.C) c = 0;
          }
        }
      });
      return;
    }
    at::parallel_for(0, R * pieces, 1, [&](int64_t begin, int64_t end) {
      __at_align__ acc_t A[kBatch], B[kBatch];
      int64_t index[kBatch];
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r = t / pieces;
        const int64_t start = (t - r * pieces) * piece_len;
        row_coefficients(a, g, r, 1, A, B, index);
        const Power power = kGem ? a.power_of(r % a.C) : Power{};
        grad_run(gx + r * S, x + r * S, start, std::min(S, start + piece_len), A[0],
                 kMax || kGem ? B[0] : acc_t(0), kMax ? index[0] : -1, power, a);
      }
    });
  }

  static void backward_nsc(const scalar_t* x, scalar_t* gx, const Args& a, const Grad& g) {
    const int64_t N = a.N, C = a.C, S = a.S;
    // Rows per task: enough that the per-channel coefficients cost little next to the rows.
    const int64_t rows = std::min(S, std::max<int64_t>(ceil_div(int64_t{1} << 20, C), 1));
    const int64_t blocks = ceil_div(S, rows);
    const Power uniform = kGem ? a.power_of(0) : Power{};
    at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> A(C + kBatch), B(C + kBatch), local_index(C), p(kGem ? C : 0);
      std::vector<int64_t> index(C + kBatch);
      int64_t coefficients_of = -1;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / blocks;
        const int64_t s0 = (t - n * blocks) * rows;
        const int64_t s1 = std::min(S, s0 + rows);
        if (coefficients_of != n) {
          for (int64_t c0 = 0; c0 < C; c0 += kBatch) {
            row_coefficients(a, g, n * C + c0, std::min(kBatch, C - c0), A.data() + c0,
                             B.data() + c0, index.data() + c0);
          }
          coefficients_of = n;
          if constexpr (kGem) {
            for (int64_t c = 0; c < C; ++c) p[c] = a.param(c);
          }
        }
        if constexpr (kMax) {
          for (int64_t c = 0; c < C; ++c) {
            local_index[c] =
                index[c] >= s0 && index[c] < s1 ? static_cast<acc_t>(index[c] - s0) : acc_t(-1);
          }
        }
        const scalar_t* xn = x + n * S * C;
        scalar_t* gn = gx + n * S * C;
        if (C < W) {
          for (int64_t s = s0; s < s1; ++s) {
            for (int64_t c = 0; c < C; ++c) {
              const acc_t pc = kGem ? p[c] : acc_t(0);
              gn[s * C + c] = static_cast<scalar_t>(
                  grad_scalar(A[c], kMax || kGem ? B[c] : acc_t(0), kMax ? index[c] : -1, s,
                              kGem ? static_cast<acc_t>(xn[s * C + c]) : acc_t(0),
                              small_integer_power(pc), pc, a.eps));
            }
          }
          continue;
        }
        const Vec eps(a.eps);
        const int64_t full_end = C - C % W;
        auto chunk = [&](int64_t s, int64_t c, const Vec(&cur)[2]) {
          const Vec Av[2] = {Vec::loadu(A.data() + c), Vec::loadu(A.data() + c + V)};
          Vec Bv[2], iv[2];
          if constexpr (kMax || kGem) {
            Bv[0] = Vec::loadu(B.data() + c);
            Bv[1] = Vec::loadu(B.data() + c + V);
          }
          if constexpr (kMax) {
            iv[0] = Vec::loadu(local_index.data() + c);
            iv[1] = Vec::loadu(local_index.data() + c + V);
          }
          Vec out[2];
          if (kGem && !a.uniform_p) {
            const Power per_channel{
                0, acc_t(0), {Vec::loadu(p.data() + c), Vec::loadu(p.data() + c + V)}};
            grad_chunk<kPowExp>(Av, Bv, iv, cur, xn + s * C + c, per_channel, eps, out);
          } else if (uniform.integer > 0) {
            grad_chunk<kPowRuntimeInt>(Av, Bv, iv, cur, xn + s * C + c, uniform, eps, out);
          } else {
            grad_chunk<kPowExp>(Av, Bv, iv, cur, xn + s * C + c, uniform, eps, out);
          }
          IO::store(gn + s * C + c, out[0], out[1]);
        };
        for (int64_t s = s0; s < s1; ++s) {
          const Vec cur_s(static_cast<acc_t>(s - s0));
          const Vec cur[2] = {cur_s, cur_s};
          for (int64_t c = 0; c < full_end; c += W) chunk(s, c, cur);
          // The last chunk overlaps the previous one; those lanes get the same values again.
          if (full_end < C) chunk(s, C - W, cur);
        }
      }
    });
  }

  // ---------------------------------------------------------------- entry points

  static Args make_args(const PoolShape& shape, const std::optional<at::Tensor>& weight,
                        double scalar, double eps, bool with_log) {
    Args a{};
    a.N = shape.N;
    a.C = shape.C;
    a.S = shape.S;
    const bool uses_weight = kMode == Mode::Mixed || kMode == Mode::Gem;
    a.weight = uses_weight && weight.has_value() ? weight->data_ptr<acc_t>() : nullptr;
    a.weight_numel = a.weight ? weight->numel() : 0;
    a.scalar = static_cast<acc_t>(scalar);
    a.eps = static_cast<acc_t>(eps);
    a.with_log = kGem && with_log;
    a.uniform_p = true;
    if (a.weight && a.weight_numel > 1) {
      a.uniform_p = std::all_of(a.weight, a.weight + a.weight_numel,
                                [&](acc_t p) { return p == a.weight[0]; });
    }
    return a;
  }

  static void forward(const at::Tensor& x, const PoolShape& shape,
                      const std::optional<at::Tensor>& weight, double scalar, double eps,
                      bool with_log, at::Tensor& out, at::Tensor& aux, at::Tensor& indices) {
    const Args a = make_args(shape, weight, scalar, eps, with_log);
    const Outputs o{out.data_ptr<scalar_t>(), aux.numel() ? aux.data_ptr<acc_t>() : nullptr,
                    aux.size(2), kMax ? indices.data_ptr<int64_t>() : nullptr};
    if (shape.channels_last) {
      forward_nsc(x.data_ptr<scalar_t>(), a, o);
    } else {
      forward_ncs(x.data_ptr<scalar_t>(), a, o);
    }
  }

  static void backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& aux,
                       const at::Tensor& indices, const PoolShape& shape,
                       const std::optional<at::Tensor>& weight, double scalar, double eps,
                       at::Tensor& grad_x) {
    const Args a = make_args(shape, weight, scalar, eps, false);
    const Grad g{grad_out.data_ptr<scalar_t>(), kGem ? aux.data_ptr<acc_t>() : nullptr,
                 kGem ? aux.size(2) : 0, kMax ? indices.data_ptr<int64_t>() : nullptr};
    if (shape.channels_last) {
      backward_nsc(x.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), a, g);
    } else {
      backward_ncs(x.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), a, g);
    }
  }
};

// Turns the runtime mode into the kernel's template parameter.
template <typename F>
void dispatch_mode(Mode mode, F&& f) {
  switch (mode) {
    case Mode::Avg:
      return f(std::integral_constant<Mode, Mode::Avg>());
    case Mode::Max:
      return f(std::integral_constant<Mode, Mode::Max>());
    case Mode::Mixed:
      return f(std::integral_constant<Mode, Mode::Mixed>());
    case Mode::Cat:
      return f(std::integral_constant<Mode, Mode::Cat>());
    case Mode::Gem:
      return f(std::integral_constant<Mode, Mode::Gem>());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_forward_cpu(
    const at::Tensor& x, int64_t mode, const std::optional<at::Tensor>& weight, double scalar,
    double eps, bool with_log) {
  const PoolShape shape = check_forward_inputs(x, mode, weight, "gapkernels::pool_forward");
  const Mode m = static_cast<Mode>(mode);
  auto [out, aux, indices] = allocate_forward_outputs(x, shape, m, with_log);
  if (shape.N == 0 || shape.C == 0) return {out, aux, indices};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "pool_forward_cpu", [&] {
        dispatch_mode(m, [&](auto mode_constant) {
          PoolKernel<decltype(mode_constant)::value, scalar_t>::forward(
              x, shape, weight, scalar, eps, with_log, out, aux, indices);
        });
      });
  return {out, aux, indices};
}

at::Tensor pool_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& aux,
                             const at::Tensor& indices, int64_t mode,
                             const std::optional<at::Tensor>& weight, double scalar, double eps) {
  const PoolShape shape = check_backward_inputs(grad_out, x, aux, indices, mode, weight);
  at::Tensor grad_x = allocate_grad_input(x, shape);
  if (shape.N == 0 || shape.C == 0) return grad_x;
  advise_huge_pages(grad_x);
  const Mode m = static_cast<Mode>(mode);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "pool_backward_cpu", [&] {
        dispatch_mode(m, [&](auto mode_constant) {
          PoolKernel<decltype(mode_constant)::value, scalar_t>::backward(
              grad_out, x, aux, indices, shape, weight, scalar, eps, grad_x);
        });
      });
  return grad_x;
}

}  // namespace
}  // namespace gapkernels

TORCH_LIBRARY_IMPL(gapkernels, CPU, m) {
  m.impl("pool_forward", &gapkernels::pool_forward_cpu);
  m.impl("pool_backward", &gapkernels::pool_backward_cpu);
}
