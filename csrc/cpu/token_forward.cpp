// Token pooling's forward on the CPU (cpu/token.h): the pooling units' run loops over the
// positions that take part, merged in order and finished with each row's count.
//   NCS: each (row, channel) in parallel; its span's runs of positions that take part (the
//        whole span without a mask) are reduced in order, cut at kTokenRunPiece.
//   NSC: each (row, piece of kTokenRowsPiece rows of its span) in parallel, over all channels;
//        pieces merged in order afterwards. Within a piece, a run of kCompactRows positions or
//        more is reduced where it lies; shorter runs (a scattered mask) are copied, in order,
//        into a buffer of kCompactRows rows that is reduced when full (and at the end), so that
//        the per-channel merge is paid once per kCompactRows positions, not once per run.
// An empty row is written as the design says: out 0, index -1, MIXED aux 0, GEM aux (0, 1, 0).
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "cpu/finish.h"
#include "cpu/kernels.h"
#include "cpu/layout.h"
#include "cpu/stats.h"
#include "cpu/token.h"

namespace gapkernels {
namespace cpu {
inline namespace CPU_CAPABILITY {
namespace {

template <Mode kMode, typename scalar_t>
struct TokenForward {
  GK_CPU_KERNEL_TYPES(kMode, scalar_t);
  using Outputs = ForwardOutputs<scalar_t>;
  using Fin = Finish<kMode, scalar_t>;
  using Buffers = ChannelBuffers<acc_t>;

  // acc (seen: holds something) followed by next, in order.
  static inline void merge(Stats& acc, bool& seen, const Stats& next, int64_t c, const Args& a) {
    if (!seen) {
      acc = next;
      seen = true;
      return;
    }
    const Stats pair[2] = {acc, next};
    acc = Statistic<kMode, scalar_t>::merge_pieces(pair, 2, c, a);
  }

  // Writes channels [c0, c0 + count) of row b: empty (no position took part), or finished with
  // the row's count.
  static void finish(const Args& a, const Outputs& o, int64_t b, int64_t row_count, int64_t c0,
                     int64_t count, const Stats* st, const bool* seen) {
    Args ab = a;
    ab.S = std::max<int64_t>(row_count, 1);
    for (int64_t i = 0; i < count;) {
      // Batches of non-empty channels (all or none of a row's channels are empty, but a count
      // that disagrees with the mask is not trusted).
      int64_t j = i;
      while (j < count && seen[j] == seen[i]) ++j;
      if (seen[i] && row_count > 0) {
        Fin::finalize(ab, o, b * a.C + c0 + i, j - i, st + i);
      } else {
        for (int64_t k = i; k < j; ++k) write_empty(a, o, b, c0 + k);
      }
      i = j;
    }
  }

  static void write_empty(const Args& a, const Outputs& o, int64_t b, int64_t c) {
    const int64_t r = b * a.C + c;
    if constexpr (kMax) o.indices[r] = -1;
    if constexpr (kMode == Mode::Cat) {
      o.out[b * 2 * a.C + c] = scalar_t(0);
      o.out[b * 2 * a.C + a.C + c] = scalar_t(0);
    } else {
      o.out[r] = scalar_t(0);
    }
    if constexpr (kMode == Mode::Mixed) o.aux[r] = acc_t(0);
    if constexpr (kGem) {
      acc_t* aux = o.aux + r * o.aux_columns;
      aux[0] = acc_t(0);
      aux[1] = acc_t(1);
      if (a.with_log) aux[2] = acc_t(0);
    }
  }

  static void ncs(const scalar_t* x, const TokenArgs& t, const Args& a, const Outputs& o) {
    const int64_t C = a.C, S = a.S;
    torch::stable::parallel_for(0, t.B * C, kBatch, [&](int64_t begin, int64_t end) {
      Stats st[kBatch];
      bool seen[kBatch];
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
        for (int64_t i = 0; i < count; ++i) {
          const int64_t c = c0 + i;
          const scalar_t* row = x + (b * C + c) * S;
          seen[i] = false;
          for (const auto& [s0, s1] : runs) {
            Stats part = ncs_run<kMode>(row + s0, s1 - s0, c, a);
            part.index += s0 - t.origin(b);
            merge(st[i], seen[i], part, c, a);
          }
        }
        finish(a, o, b, t.count(b), c0, count, st, seen);
        r0 += count;
      }
    });
  }

  // The short runs' rows gathered for one reduction, with the positions they came from.
  struct Compact {
    std::vector<scalar_t> rows;  // kCompactRows x C
    int64_t positions[kCompactRows];
    int64_t count = 0;
  };

  // Channels [0, C) of rows [p0, p1) of row b's sample into st / seen (indices from origin).
  static void nsc_piece(const scalar_t* x, const TokenArgs& t, const Args& a, int64_t b, int64_t p0,
                        int64_t p1, Buffers& buf, Stats* part, Stats* st, bool* seen,
                        Compact& compact) {
    const int64_t C = a.C, S = a.S;
    const int64_t n = t.sample(b);
    const scalar_t* xn = x + n * S * C;
    const bool* mask = t.mask ? t.mask + n * S : nullptr;
    const int64_t origin = t.origin(b);
    std::fill(seen, seen + C, false);
    // Reduces rows [s0, s1) of rows (positions[r] is row r's position, or rows is xn) and merges.
    auto reduce = [&](const scalar_t* rows, int64_t s0, int64_t s1, const int64_t* positions) {
      nsc_rows<kMode>(rows, s0, s1, a, buf, part);
      for (int64_t c = 0; c < C; ++c) {
        int64_t index = part[c].index;
        if (positions != nullptr && index >= 0 && index < s1) index = positions[index];
        part[c].index = index - origin;
        merge(st[c], seen[c], part[c], c, a);
      }
    };
    auto flush = [&]() {
      if (compact.count == 0) return;
      reduce(compact.rows.data(), 0, compact.count, compact.positions);
      compact.count = 0;
    };
    for_each_run(mask, p0, p1, [&](int64_t s0, int64_t s1) {
      if (s1 - s0 >= kCompactRows || (mask == nullptr)) {
        flush();
        reduce(xn, s0, s1, nullptr);
        return;
      }
      if (compact.rows.empty()) compact.rows.resize(kCompactRows * C);
      for (int64_t s = s0; s < s1; ++s) {
        if (compact.count == kCompactRows) flush();
        std::copy(xn + s * C, xn + (s + 1) * C, compact.rows.data() + compact.count * C);
        compact.positions[compact.count++] = s;
      }
    });
    flush();
  }

  static void nsc(const scalar_t* x, const TokenArgs& t, const Args& a, const Outputs& o) {
    const int64_t C = a.C;
    // Tasks: (row, piece); rows of one piece are finished in their task.
    std::vector<int64_t> first(t.B + 1, 0);
    for (int64_t b = 0; b < t.B; ++b) {
      const int64_t len = std::max<int64_t>(t.end(b) - t.begin(b), 0);
      first[b + 1] = first[b] + std::max<int64_t>(1, ceil_div(len, kTokenRowsPiece));
    }
    const int64_t tasks = first[t.B];
    // Pieces of rows cut in several, (task, channel), merged in order afterwards.
    std::vector<Stats> parts;
    std::vector<char> parts_seen;
    if (tasks > t.B) {
      parts.resize(tasks * C);
      parts_seen.resize(tasks * C);
    }
    torch::stable::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      Buffers buf(C, kGem);
      std::vector<Stats> part(C), st(C);
      std::unique_ptr<bool[]> seen(new bool[C]);
      Compact compact;
      int64_t b = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
      for (int64_t task = begin; task < end; ++task) {
        while (first[b + 1] <= task) ++b;
        const int64_t k = task - first[b];
        const int64_t p0 = t.begin(b) + k * kTokenRowsPiece;
        const int64_t p1 = std::min(t.end(b), p0 + kTokenRowsPiece);
        nsc_piece(x, t, a, b, p0, p1, buf, part.data(), st.data(), seen.get(), compact);
        if (first[b + 1] - first[b] == 1) {
          for (int64_t c0 = 0; c0 < C; c0 += kBatch) {
            finish(a, o, b, t.count(b), c0, std::min(kBatch, C - c0), st.data() + c0,
                   seen.get() + c0);
          }
        } else {
          std::copy(st.begin(), st.end(), parts.begin() + task * C);
          std::copy(seen.get(), seen.get() + C, parts_seen.begin() + task * C);
        }
      }
    });
    if (tasks == t.B) return;
    torch::stable::parallel_for(0, t.B, 1, [&](int64_t begin, int64_t end) {
      Stats st[kBatch];
      bool seen[kBatch];
      for (int64_t b = begin; b < end; ++b) {
        if (first[b + 1] - first[b] == 1) continue;
        for (int64_t c0 = 0; c0 < C; c0 += kBatch) {
          const int64_t count = std::min(kBatch, C - c0);
          for (int64_t i = 0; i < count; ++i) {
            seen[i] = false;
            for (int64_t task = first[b]; task < first[b + 1]; ++task) {
              if (parts_seen[task * C + c0 + i]) {
                merge(st[i], seen[i], parts[task * C + c0 + i], c0 + i, a);
              }
            }
          }
          finish(a, o, b, t.count(b), c0, count, st, seen);
        }
      }
    });
  }
};

}  // namespace

template <Mode kMode, typename scalar_t>
void token_forward(const scalar_t* x, bool channels_last, const TokenArgs& t,
                   const ArgsOf<scalar_t>& a, const ForwardOutputs<scalar_t>& o) {
  if (channels_last) {
    TokenForward<kMode, scalar_t>::nsc(x, t, a, o);
  } else {
    TokenForward<kMode, scalar_t>::ncs(x, t, a, o);
  }
}

#define GK_INSTANTIATE(mode, T)                                                            \
  template void token_forward<mode, T>(const T*, bool, const TokenArgs&, const ArgsOf<T>&, \
                                       const ForwardOutputs<T>&);
#define GK_INSTANTIATE_MODES(T) GK_CPU_FOR_MODES(GK_INSTANTIATE, T)
GK_CPU_FOR_DTYPES(GK_INSTANTIATE_MODES)

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gapkernels
