"""The token kernels' mutations of scripts/mutate.py (see scripts/mutations.py): the C++ CPU token
units (csrc/cpu/token_*.cpp, cpu/token.h) and the Triton token kernels
(gapkernels/triton/token_kernels.py, with the split pieces' merge in rows.py).

They run the token tests only (the default list is the pooling suite, which never reaches these
kernels). A .cpp mutation rebuilds that unit; token.h is included by the eight units that use it
(the token units and the NCS/NSC units that give them their loops).
"""

from __future__ import annotations

from mutations_base import Mutation

TOKEN_FORWARD = "csrc/cpu/token_forward.cpp"
TOKEN_BACKWARD = "csrc/cpu/token_backward.cpp"
TOKEN_H = "csrc/cpu/token.h"
TRITON_TOKENS = "gapkernels/triton/token_kernels.py"
TRITON_ROWS = "gapkernels/triton/rows.py"

# Most-likely killers first (pytest -x stops at the first failure).
TOKEN_CPU_TESTS = ("tests/test_tokens_cpu.py", "tests/test_tokens.py")
TOKEN_TRITON_TESTS = ("tests/test_tokens_triton_split.py", "tests/test_tokens_triton.py")

TOKEN_CPU_MUTATIONS = [
    Mutation(
        "cpu-token-ncs-span-end",
        TOKEN_FORWARD,
        "t.begin(b), t.end(b), kTokenRunPiece,",
        "t.begin(b), t.end(b) - 1, kTokenRunPiece,",
        "the NCS forward stops one position before the end of each row's span",
        TOKEN_CPU_TESTS,
    ),
    Mutation(
        "cpu-token-ncs-index-begin",
        TOKEN_FORWARD,
        "part.index += s0 - t.origin(b);",
        "part.index += s0 - t.begin(b);",
        "the NCS forward's max index is relative to the span's begin (start), not the grid",
        TOKEN_CPU_TESTS,
    ),
    Mutation(
        "cpu-token-nsc-piece-overlap",
        TOKEN_FORWARD,
        "const int64_t p0 = t.begin(b) + k * kTokenRowsPiece;",
        "const int64_t p0 = t.begin(b) + k * kTokenRowsPiece - (k > 0);",
        "the NSC forward's pieces of a long row overlap by one row (counted twice)",
        TOKEN_CPU_TESTS,
    ),
    Mutation(
        "cpu-token-nsc-piece-merge",
        TOKEN_FORWARD,
        "for (int64_t task = first[b]; task < first[b + 1]; ++task) {",
        "for (int64_t task = first[b] + 1; task < first[b + 1]; ++task) {",
        "merging a long NSC row's pieces, the first piece is left out",
        TOKEN_CPU_TESTS,
    ),
    Mutation(
        "cpu-token-varlen-index-origin",
        TOKEN_FORWARD,
        "part[c].index -= t.origin(b);",
        "part[c].index -= 0;",
        "varlen max indices are offsets in the packed batch, not in the sequence",
        TOKEN_CPU_TESTS,
    ),
    Mutation(
        "cpu-token-empty-index",
        TOKEN_FORWARD,
        "if constexpr (kMax) o.indices[r] = -1;",
        "if constexpr (kMax) o.indices[r] = 0;",
        "an empty row's max index is 0 instead of -1",
        TOKEN_CPU_TESTS,
    ),
    Mutation(
        "cpu-token-backward-count",
        TOKEN_BACKWARD,
        "ab.S = std::max<int64_t>(row_count, 1);",
        "ab.S = a.S;",
        "the backward divides by S instead of the row's count of positions that take part",
        TOKEN_CPU_TESTS,
    ),
    Mutation(
        "cpu-token-nsc-backward-start",
        TOKEN_BACKWARD,
        "const int64_t lo = std::max(t.begin(b), s0)",
        "const int64_t lo = std::max(t.origin(b), s0)",
        "the NSC backward ignores start: the skipped prefix tokens get a gradient",
        TOKEN_CPU_TESTS,
    ),
    Mutation(
        "cpu-token-varlen-backward-origin",
        TOKEN_BACKWARD,
        "const int64_t s = t.origin(b) + index[c];",
        "const int64_t s = index[c];",
        "the varlen backward puts the max's gradient at its offset from the batch's start",
        TOKEN_CPU_TESTS,
    ),
    Mutation(
        "cpu-token-mask-tail",
        TOKEN_H,
        "while (s < p1 && mask[s]) ++s;",
        "while (s < p1 && (mask[s] || s + 1 == p1)) ++s;",
        "a run of masked positions reaches a piece's last position even where the mask is False",
        TOKEN_CPU_TESTS,
    ),
]

TOKEN_TRITON_MUTATIONS = [
    Mutation(
        "triton-token-piece-end",
        TRITON_TOKENS,
        "piece_end = tl.minimum(piece_begin + per_piece, end)",
        "piece_end = tl.minimum(piece_begin + per_piece - 1, end)",
        "each piece of a split row stops one position short (forward and backward)",
        TOKEN_TRITON_TESTS,
    ),
    Mutation(
        "triton-token-split-order",
        TRITON_TOKENS,
        "split = tl.program_id(1)",
        "split = tl.num_programs(1) - 1 - tl.program_id(1)",
        "a split row's pieces are merged last to first (ties: a later maximum wins)",
        TOKEN_TRITON_TESTS,
    ),
    Mutation(
        "triton-token-combine-first",
        TRITON_ROWS,
        "take = (piece_max > row_max) | (piece_max != piece_max) | first",
        "take = (piece_max > row_max) | (piece_max != piece_max)",
        "the merge does not take the first piece that saw a position (a row of -inf: no index)",
        TOKEN_TRITON_TESTS,
    ),
    Mutation(
        "triton-token-gem-empty-piece",
        TRITON_ROWS,
        "seen = piece_max != 0.0",
        "seen = piece_max == piece_max",
        "GeM merges the state of a piece that saw nothing (0/0: NaN)",
        TOKEN_TRITON_TESTS,
    ),
    Mutation(
        "triton-token-lane-first",
        TRITON_TOKENS,
        "first = lane_index == S",
        "first = lane_index < 0",
        "a lane does not take its first position unconditionally (a row of -inf: no index)",
        TOKEN_TRITON_TESTS,
    ),
    Mutation(
        "triton-token-empty-index",
        TRITON_TOKENS,
        "row_index = tl.where(empty, -1, row_index - origin)",
        "row_index = tl.where(empty, 0, row_index - origin)",
        "an empty row's max index is 0 instead of -1",
        TOKEN_TRITON_TESTS,
    ),
    Mutation(
        "triton-token-varlen-index-origin",
        TRITON_TOKENS,
        "row_index = tl.where(empty, -1, row_index - origin)",
        "row_index = tl.where(empty, -1, row_index)",
        "varlen max indices are offsets in the packed batch, not in the sequence",
        TOKEN_TRITON_TESTS,
    ),
    Mutation(
        "triton-token-backward-origin",
        TRITON_TOKENS,
        "index = (tl.load(indices_ptr + row, mask=row_mask, other=-1) + origin)[:, None]",
        "index = (tl.load(indices_ptr + row, mask=row_mask, other=-1))[:, None]",
        "the varlen backward puts the max's gradient at its offset from the batch's start",
        TOKEN_TRITON_TESTS,
    ),
    Mutation(
        "triton-token-mask-tail",
        TRITON_TOKENS,
        "inside = inside & (flag != 0)",
        "inside = inside & ((flag != 0) | (s[None, :] == end[:, None] - 1))",
        "the last position of a row's range takes part even where the mask is False",
        TOKEN_TRITON_TESTS,
    ),
    Mutation(
        "triton-token-backward-start",
        TRITON_TOKENS,
        "part = _takes_part(s, begin, end, b, mask_ptr, S, row_mask, HAS_MASK) & own",
        "part = _takes_part(s, origin, end, b, mask_ptr, S, row_mask, HAS_MASK) & own",
        "the backward ignores start: the skipped prefix tokens get a gradient",
        TOKEN_TRITON_TESTS,
    ),
]
