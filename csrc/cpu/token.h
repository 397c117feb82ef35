// Token pooling on the CPU (docs/DESIGN.md, "Token pooling"): the entry points of the token
// units (token_forward.cpp, token_backward.cpp) and the pieces of the pooling units they reuse.
//
// The token kernels run the pooling kernels' own reductions over the positions that take part:
// NCS reduces each maximal run of such positions of a row with the NCS run loop (vectorized
// along the run), NSC each run of such rows with the NSC row loop (vectorized over C), and the
// runs' statistics are merged in order (stats.h's merge rules), then finished with the row's
// count instead of S (finish.h). A row's span is cut at fixed offsets from its begin (never by
// the thread count), so results do not depend on the number of threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/nsc_forward.h"
#include "cpu/stats.h"
#include "pool_math.h"

namespace gapkernels {
namespace cpu {
inline namespace CPU_CAPABILITY {

// The normalized form: spans (B, 4) int64 (begin, end, count, origin) per output row, an optional
// (N, S) mask (one byte per position), and varlen (every row reads sample 0).
struct TokenArgs {
  int64_t B;
  const int64_t* spans;
  const bool* mask;
  bool varlen;
  int64_t begin(int64_t b) const { return spans[4 * b]; }
  int64_t end(int64_t b) const { return spans[4 * b + 1]; }
  int64_t count(int64_t b) const { return spans[4 * b + 2]; }
  int64_t origin(int64_t b) const { return spans[4 * b + 3]; }
  int64_t sample(int64_t b) const { return varlen ? 0 : b; }
};

// NCS pieces of a row's span (fixed offsets from begin; float-encoded lane indices stay exact).
constexpr int64_t kTokenRunPiece = kMaxRunPiece;
// NSC pieces: rows of a span per task.
constexpr int64_t kTokenRowsPiece = kMaxRowsPiece;
// NSC: runs of positions shorter than this (a scattered mask) are gathered into a buffer of this
// many rows and reduced together (token_forward.cpp).
constexpr int64_t kCompactRows = 64;

// Calls f(s0, s1) for each maximal run of positions of [p0, p1) that take part, in order.
template <typename F>
inline void for_each_run(const bool* mask, int64_t p0, int64_t p1, F&& f) {
  if (mask == nullptr) {
    if (p1 > p0) f(p0, p1);
    return;
  }
  int64_t s = p0;
  while (s < p1) {
    while (s < p1 && !mask[s]) ++s;
    if (s == p1) break;
    const int64_t s0 = s;
    while (s < p1 && mask[s]) ++s;
    f(s0, s);
  }
}

// The runs of positions of [lo, hi) that take part, cut at lo + k * piece: found once per row
// and used for each of its channels (NCS).
using Runs = std::vector<std::pair<int64_t, int64_t>>;
inline void collect_runs(const bool* mask, int64_t lo, int64_t hi, int64_t piece, Runs& runs) {
  runs.clear();
  for (int64_t p0 = lo; p0 < hi; p0 += piece) {
    for_each_run(mask, p0, std::min(hi, p0 + piece),
                 [&](int64_t s0, int64_t s1) { runs.emplace_back(s0, s1); });
  }
}

// Statistics of the contiguous run x[0, len) of channel c (indices relative to x): the NCS
// forward's run loop (ncs_forward.cpp, ncs_forward_gem.cpp).
template <Mode kMode, typename scalar_t>
Partial<acc_type<scalar_t>> ncs_run_sum_max(const scalar_t* x, int64_t len, int64_t c,
                                            const ArgsOf<scalar_t>& a);
template <typename scalar_t>
Partial<acc_type<scalar_t>> ncs_run_gem(const scalar_t* x, int64_t len, int64_t c,
                                        const ArgsOf<scalar_t>& a);

// Per-channel statistics st[0, C) of rows [s0, s1) of sample xn (S x C; indices absolute rows):
// the NSC forward's row loop (nsc_forward.cpp, nsc_forward_gem.cpp), with the task's buffers b.
template <Mode kMode, typename scalar_t>
void nsc_rows_sum_max(const scalar_t* xn, int64_t s0, int64_t s1, const ArgsOf<scalar_t>& a,
                      ChannelBuffers<acc_type<scalar_t>>& b, Partial<acc_type<scalar_t>>* st);
template <typename scalar_t>
void nsc_rows_gem(const scalar_t* xn, int64_t s0, int64_t s1, const ArgsOf<scalar_t>& a,
                  ChannelBuffers<acc_type<scalar_t>>& b, Partial<acc_type<scalar_t>>* st);

template <Mode kMode, typename scalar_t>
inline Partial<acc_type<scalar_t>> ncs_run(const scalar_t* x, int64_t len, int64_t c,
                                           const ArgsOf<scalar_t>& a) {
  if constexpr (kMode == Mode::Gem) {
    return ncs_run_gem(x, len, c, a);
  } else {
    return ncs_run_sum_max<kMode>(x, len, c, a);
  }
}

template <Mode kMode, typename scalar_t>
inline void nsc_rows(const scalar_t* xn, int64_t s0, int64_t s1, const ArgsOf<scalar_t>& a,
                     ChannelBuffers<acc_type<scalar_t>>& b, Partial<acc_type<scalar_t>>* st) {
  if constexpr (kMode == Mode::Gem) {
    nsc_rows_gem(xn, s0, s1, a, b, st);
  } else {
    nsc_rows_sum_max<kMode>(xn, s0, s1, a, b, st);
  }
}

// grad_x[start, end) of one NCS row (channel c) from its coefficients (backward.h; index: the
// max's position in the row, or -1): the NCS backward's run loop (ncs_backward.cpp).
template <Mode kMode, typename scalar_t>
void ncs_grad_run(scalar_t* gx, const scalar_t* x, int64_t start, int64_t end, acc_type<scalar_t> A,
                  acc_type<scalar_t> B, int64_t index, int64_t c, const ArgsOf<scalar_t>& a);

// The token units' entry points (x: the (N, C, S) view's data, NCS or NSC).
template <Mode kMode, typename scalar_t>
void token_forward(const scalar_t* x, bool channels_last, const TokenArgs& t,
                   const ArgsOf<scalar_t>& a, const ForwardOutputs<scalar_t>& o);
template <Mode kMode, typename scalar_t>
void token_backward(const scalar_t* x, scalar_t* grad_x, bool channels_last, const TokenArgs& t,
                    const ArgsOf<scalar_t>& a, const GradInputs<scalar_t>& g);

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gapkernels
