// The forward's last step on the CPU: out / aux / indices of a batch of rows from their complete
// statistics (pool_math.h's finishing step of each mode), and the in-order merge of the pieces of
// split rows before it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/layout.h"
#include "cpu/stats.h"
#include "cpu/vec.h"
#include "pool_math.h"

namespace gapkernels {
namespace cpu {
inline namespace CPU_CAPABILITY {

template <Mode kMode, typename scalar_t>
struct Finish {
  GK_CPU_KERNEL_TYPES(kMode, scalar_t);
  using Outputs = ForwardOutputs<scalar_t>;

  // Writes the results of rows r0 .. r0+count-1 (r = n*C + c), count <= kBatch.
  static void finalize(const Args& a, const Outputs& o, int64_t r0, int64_t count,
                       const Stats* st) {
    int64_t n = r0 / a.C;
    int64_t c = r0 - n * a.C;
    const acc_t S = static_cast<acc_t>(a.S);
    GK_ALIGNED acc_t root[kBatch];
    if constexpr (kGem) {
      // root = r ** (1/p), r = mean((y/M)**p) in [1/S, 1]: gem_value's power, kBatch rows at a
      // time in vectors.
      GK_ALIGNED acc_t r[kBatch];
      GK_ALIGNED acc_t inv_p[kBatch];
      int64_t cc = c;
      for (int64_t i = 0; i < kBatch; ++i) {
        r[i] = i < count ? avg_value(st[i].sum, S) : acc_t(1);
        inv_p[i] = i < count ? acc_t(1) / a.param(cc) : acc_t(1);
        if (++cc == a.C) cc = 0;
      }
      for (int64_t i = 0; i < kBatch; i += V) {
        vec_exp(Vec::loadu(inv_p + i) * vec_log(Vec::loadu(r + i))).store(root + i);
      }
    }
    for (int64_t i = 0; i < count; ++i, ++c) {
      if (c == a.C) {
        c = 0;
        ++n;
      }
      const int64_t r = r0 + i;
      const Stats& s = st[i];
      if (kMax && o.indices) o.indices[r] = s.index;
      if constexpr (kMode == Mode::Avg) {
        o.out[r] = static_cast<scalar_t>(avg_value(s.sum, S));
      } else if constexpr (kMode == Mode::Max) {
        o.out[r] = static_cast<scalar_t>(s.max);
      } else if constexpr (kMode == Mode::Mixed) {
        const acc_t mean = avg_value(s.sum, S);
        o.out[r] = static_cast<scalar_t>(mixed_value(a.param(c), s.max, mean));
        o.aux[r] = mixed_aux(s.max, mean);
      } else if constexpr (kMode == Mode::Cat) {
        o.out[n * 2 * a.C + c] = static_cast<scalar_t>(avg_value(s.sum, S));
        o.out[n * 2 * a.C + a.C + c] = static_cast<scalar_t>(s.max);
      } else {
        o.out[r] = static_cast<scalar_t>(gem_value_of_root(s.max, root[i]));
        acc_t* aux = o.aux + r * o.aux_columns;
        aux[0] = s.max;
        aux[1] = avg_value(s.sum, S);
        if (a.with_log) aux[2] = avg_value(s.log_sum, S);
      }
    }
  }

  // Merges pieces [r * P, r * P + P) of `parts` in order and finalizes rows [begin, end).
  static void merge_and_finalize(const Args& a, const Outputs& o, const std::vector<Stats>& parts,
                                 int64_t pieces, int64_t begin, int64_t end) {
    Stats st[kBatch];
    for (int64_t r0 = begin; r0 < end; r0 += kBatch) {
      const int64_t count = std::min(kBatch, end - r0);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t r = r0 + i;
        st[i] =
            Statistic<kMode, scalar_t>::merge_pieces(parts.data() + r * pieces, pieces, r % a.C, a);
      }
      finalize(a, o, r0, count, st);
    }
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gapkernels
