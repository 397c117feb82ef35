"""The C++ CPU kernels' mutations of scripts/mutate.py (see scripts/mutations.py)."""

from __future__ import annotations

from mutations_base import Mutation

MATH = "csrc/pool_math.h"
VEC = "csrc/cpu/vec.h"
GEM = "csrc/cpu/gem.h"
FINISH = "csrc/cpu/finish.h"
BACKWARD = "csrc/cpu/backward.h"
NCS_FORWARD = "csrc/cpu/ncs_forward.cpp"
NCS_FORWARD_H = "csrc/cpu/ncs_forward.h"
NSC_FORWARD = "csrc/cpu/nsc_forward.cpp"
NCS_BACKWARD = "csrc/cpu/ncs_backward.cpp"
NSC_BACKWARD = "csrc/cpu/nsc_backward.cpp"

# The C++ CPU kernels (csrc/cpu/ and the shared csrc/pool_math.h). A mutation of a header rebuilds
# every unit that includes it (pool_math.h, vec.h: all of them), one of a .cpp only that unit.
# Cheap ones first (a .cpp file or a header few units include), the headers every unit
# includes (vec.h, pool_math.h: a rebuild of the whole variant each) last; issue 19's merge_max
# tie first. Only the variant this machine loads is built and tested (mutate.py; choose one with
# GAPKERNELS_CPU_CAPABILITY), so a mutation of one variant's code names it (`variants`) and is
# skipped under another. The NCS 8x8 tile path (8-float vectors: AVX2 and default) has none.
CPU_MUTATIONS = [
    Mutation(
        "cpu-merge-max-tie-last",
        MATH,
        "(candidate == current && candidate_index < current_index)",
        "(candidate == current && candidate_index > current_index)",
        "merging pieces/threads, the last maximum wins a tie (issue 19: bfloat16 channels_last "
        "(2, 4, 64, 65) grad_x wrong, the suite passed)",
    ),
    Mutation(
        "cpu-nsc-fast-max-tie",
        NSC_FORWARD,
        "ix[k] = where_greater(value, mx[k], cur, ix[k]);",
        "ix[k] = where_greater(mx[k], value, ix[k], cur);",
        "the channels-last fast max pass gives the last maximum's index on a tie",
    ),
    Mutation(
        "cpu-ncs-nan-first",
        NCS_FORWARD,
        "for (int64_t k = tail_end - 1; k >= b; --k) {",
        "for (int64_t k = b; k < tail_end; ++k) {",
        "the contiguous run gives the first NaN of a block instead of the last",
    ),
    Mutation(
        "cpu-ncs-tail-dropped",
        NCS_FORWARD,
        "const bool with_tail = tail && max_block_end == full_end;",
        "const bool with_tail = false && tail && max_block_end == full_end;",
        "the contiguous run ignores its tail (len % W elements)",
    ),
    Mutation(
        "cpu-ncs-rows16-order",
        NCS_FORWARD_H,
        "return fold(fold(quad[0], quad[1]), fold(quad[2], quad[3]));",
        "return fold(fold(quad[1], quad[0]), fold(quad[2], quad[3]));",
        "AVX-512's 16-row reduction hands rows 0-3 the results of rows 4-7 and back",
        variants=("avx512",),
    ),
    Mutation(
        "cpu-ncs-rows16-last-index",
        NCS_FORWARD_H,
        "first, [](__m512 a, __m512 b) { return _mm512_min_ps(a, b); })",
        "first, [](__m512 a, __m512 b) { return _mm512_max_ps(a, b); })",
        "AVX-512's rows give the last index of a tied maximum",
        variants=("avx512",),
    ),
    Mutation(
        "cpu-ncs-rows16-rest-max-zero",
        NCS_FORWARD_H,
        "m1 = _mm512_max_ps(m1, _mm512_mask_blend_ps(rest, neg_inf, v));",
        "m1 = _mm512_max_ps(m1, v);",
        "AVX-512's rows take the masked-out lanes of a row's last vector (0) into its max",
        variants=("avx512",),
    ),
    Mutation(
        "cpu-ncs-rows8-order",
        NCS_FORWARD_H,
        "return op(_mm256_permute2f128_ps(quad[0], quad[1], 0x20),",
        "return op(_mm256_permute2f128_ps(quad[1], quad[0], 0x20),",
        "the 8-row sum (AVX2; AVX-512 below 64 elements) hands rows 0-3 half of the sums of rows "
        "4-7 and back",
        variants=("avx2", "avx512"),
    ),
    Mutation(
        "cpu-ncs-rows8-rest-max-lost",
        NCS_FORWARD_H,
        "if constexpr (kWithMax) m1 = _mm256_max_ps(m1, v);",
        "",
        "the 8-row reduction without the index leaves a row's last S % 8 elements out of its max",
        variants=("avx2", "avx512"),
    ),
    Mutation(
        "cpu-ncs-rows-noindex-swap",
        NCS_FORWARD,
        "st[i].max = maxima[i];",
        "st[i].max = maxima[i ^ 1];",
        "the rows without the index hand each row its neighbour's max",
        variants=("avx2", "avx512"),
    ),
    Mutation(
        "cpu-ncs-resolve-noindex-value",
        NCS_FORWARD,
        "run_max = m;\n    if (!with_index) return;",
        "if (!with_index) return;\n    run_max = m;",
        "a long contiguous run without the index keeps its first max block's value",
    ),
    Mutation(
        "cpu-nsc-noindex-max-lost",
        NSC_FORWARD,
        "mx[k] = clamp_min(mx[k], value);",
        "if constexpr (kIndex) mx[k] = clamp_min(mx[k], value);",
        "the channels-last max pass without the index never moves its maximum",
    ),
    Mutation(
        "cpu-ncs-rows8-rest-lane-lost",
        NCS_FORWARD_H,
        "_mm256_set1_epi32(7 - rest)",
        "_mm256_set1_epi32(8 - rest)",
        "the 8-row sum (AVX2; AVX-512 below 64 elements) drops the first element of a row's rest "
        "(S % 8)",
        variants=("avx2", "avx512"),
    ),
    Mutation(
        "cpu-ncs-piece-boundary",
        NCS_FORWARD_H,
        "const int64_t len = std::min(S, start + pieces.length) - start;",
        "const int64_t len = std::min(S, start + pieces.length) - start - (start + "
        "pieces.length < S);",
        "each piece of a split contiguous row but the last stops one element short",
    ),
    Mutation(
        "cpu-nsc-piece-index",
        NSC_FORWARD,
        "return {b.sum[c], b.log_sum[c], b.max[c], s0 + static_cast<int64_t>(b.index[c])};",
        "return {b.sum[c], b.log_sum[c], b.max[c], static_cast<int64_t>(b.index[c])};",
        "a channels-last piece's argmax is not offset by the piece's first row",
    ),
    Mutation(
        "cpu-nsc-avg-stride",
        NSC_FORWARD,
        "IO::load(xn + r * C + c, v[0], v[1]);\n        for (int k = 0; k < 2; ++k) sum[k]",
        "IO::load(xn + r * W + c, v[0], v[1]);\n        for (int k = 0; k < 2; ++k) sum[k]",
        "the channels-last avg reads rows W apart instead of C apart (wrong layout stride)",
    ),
    Mutation(
        "cpu-gem-no-eps-clamp",
        GEM,
        "const Vec z = clamp_min(v, eps) * inv_m;",
        "const Vec z = v * inv_m;",
        "the vector GeM skips the eps clamp",
    ),
    Mutation(
        "cpu-gem-rescale-no-power",
        GEM,
        "const Vec kp = vec_power<kPow>(k, log_k, p, n);",
        "const Vec kp = k;",
        "the vector GeM rescales its sums by k instead of k**p when the maximum grows",
    ),
    Mutation(
        "cpu-avg-divides-s-minus-1",
        FINISH,
        "o.out[r] = static_cast<scalar_t>(avg_value(s.sum, S));",
        "o.out[r] = static_cast<scalar_t>(avg_value(s.sum, S - acc_t(1)));",
        "avg divides by S - 1",
    ),
    Mutation(
        "cpu-mixed-alpha-swap",
        FINISH,
        "mixed_value(a.param(c), s.max, mean)",
        "mixed_value(acc_t(1) - a.param(c), s.max, mean)",
        "mixed pooling weighs max by 1 - alpha and avg by alpha",
    ),
    Mutation(
        "cpu-gem-per-channel-p",
        FINISH,
        "inv_p[i] = i < count ? acc_t(1) / a.param(cc) : acc_t(1);",
        "inv_p[i] = i < count ? acc_t(1) / a.param(c) : acc_t(1);",
        "GeM's root uses the first channel's p for a whole batch of rows (per-channel p)",
    ),
    Mutation(
        "cpu-gem-backward-no-eps-mask",
        BACKWARD,
        "out[k] = (A[k] * vec_power<kPow>(z, log_z, e.vec[k], e.integral)) & (v[k] >= eps);",
        "out[k] = A[k] * vec_power<kPow>(z, log_z, e.vec[k], e.integral);",
        "the vector GeM backward gives a gradient where x < eps",
    ),
    Mutation(
        "cpu-ncs-backward-index-start",
        NCS_BACKWARD,
        "if (kMax && index >= start && index < end) gx[index - start] = hit[0];",
        "if (kMax && index > start && index < end) gx[index - start] = hit[0];",
        "the contiguous backward loses the gradient of an argmax at the first element of a piece",
    ),
    Mutation(
        "cpu-ncs-backward-gem-tail",
        NCS_BACKWARD,
        "        if (i < len) {",
        "        if (i + 1 < len) {",
        "the contiguous GeM backward forgets a tail of one element (len % W == 1)",
    ),
    Mutation(
        "cpu-nsc-backward-block-last-row",
        NSC_BACKWARD,
        "const int64_t s1 = std::min(S, s0 + rows);",
        "const int64_t s1 = s0 + rows < S ? s0 + rows - 1 : S;",
        "the channels-last backward skips the last row of each block but the last (issue 19: "
        "shows only when S > 2**20 / C; the suite passed)",
    ),
    Mutation(
        "cpu-nsc-backward-channel-tail",
        NSC_BACKWARD,
        "if (full_end < C) chunk(s, C - W);",
        "if (full_end + 1 < C) chunk(s, C - W);",
        "the channels-last GeM backward forgets the channel tail when C % W == 1",
    ),
    Mutation(
        "cpu-nsc-backward-convert-tail",
        NSC_BACKWARD,
        "if (full_end < C) convert(C - W);",
        "if (full_end + 1 < C) convert(C - W);",
        "the channels-last backward's converted row lacks the channel tail when C % W == 1",
    ),
    Mutation(
        "cpu-vec-scan-max-tie",
        VEC,
        "const Vec take = (value > mx) | value.isnan();",
        "const Vec take = (value >= mx) | value.isnan();",
        "the vector scan (NaN rescans) takes a later equal value",
    ),
    Mutation(
        "cpu-vec-scan-nan-loses",
        VEC,
        "const Vec take = (value > mx) | value.isnan();",
        "const Vec take = value > mx;",
        "the vector scan lets a NaN lose (torch: NaN is the maximum)",
    ),
    Mutation(
        "cpu-tail-mask-short",
        VEC,
        "const Vec first(static_cast<acc_t>(2 * V - tail));",
        "const Vec first(static_cast<acc_t>(2 * V - tail + 1));",
        "the tail mask leaves out the first element of a run's tail",
    ),
    Mutation(
        "cpu-int-power-n-minus-1",
        VEC,
        "case 2:\n      return f(std::integral_constant<int, kFirst + 2>());",
        "case 2:\n      return f(std::integral_constant<int, kFirst + 1>());",
        "the unrolled integer power for the third exponent (p = 3 forward, p - 1 = 2 backward) "
        "uses one power less",
    ),
    Mutation(
        "cpu-merge-max-nan-first",
        MATH,
        "return !is_nan(current) || candidate_index > current_index;",
        "return !is_nan(current) || candidate_index < current_index;",
        "merging pieces/threads, the first NaN wins instead of the last (torch's scan)",
    ),
    Mutation(
        "cpu-scan-max-tie",
        MATH,
        "  if (v > m || is_nan(v)) {\n    m = v;",
        "  if (v >= m || is_nan(v)) {\n    m = v;",
        "the sequential scan takes a later equal value (last maximum wins)",
    ),
]
