// How the CPU kernels cut their work, for each layout: the constants (mirrored in
// tests/test_paths_cpu.py, which plants its specials at these boundaries) and the pieces a
// reduction is split into. Chosen from the shape only, never from the thread count, so that the
// results do not depend on it (docs/DESIGN.md "Determinism"). 64-bit offsets throughout.
// (In CPU_CAPABILITY, as everything of the kernel units: see vec.h.)
//   NCS: each (n, c) row is a contiguous run of S elements, vectorized along the run.
//   NSC: each (n, s) row holds C contiguous channels, vectorized over C with per-channel
//        accumulators in a per-task buffer.
#pragma once

#include <algorithm>
#include <cstdint>

namespace gapkernels {
namespace cpu {
inline namespace CPU_CAPABILITY {

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
// Rows finalized together (vectorized pow for GeM).
constexpr int64_t kBatch = 16;
// NCS runs of at most this many elements are reduced with one row per vector lane ...
constexpr int64_t kMaxLaneRun = 256;
// ... or, with AVX-512, row by row, 16 rows together (ncs_forward.h's short_rows16): AVG always,
// the modes with a max in float16/bfloat16 from this length on. Measured on AMD EPYC, one
// thread: from cache, at S = 49 the lanes take 0.16-0.20 ns an element and the rows 0.22-0.24;
// at S = 196 and 221 in bfloat16 the rows 0.14 and the lanes 0.16-0.17 (from memory 0.74-0.83x
// the time); in float32 the rows gain 7% from cache and nothing measurable from memory.
constexpr int64_t kMinRowsMaxRun = 128;
// With AVX-512, rows shorter than this (without the max's index) are reduced 8 at a time in
// 8-float vectors (AVX2's short_rows8) rather than 16 in 16-float ones: at S = 49 a 16-float row
// wastes 15 lanes of its last vector. Measured on AMD EPYC, one thread, interleaved: 7x7 avg, max
// and mixed 0.87-0.95x the time (bfloat16 max and mixed 0.87x, noise 2%); 13x17 and 14x14
// unchanged within noise (0.88-1.07x; the lowest, avg float32, with 15-23% noise).
constexpr int64_t kMinRows16Run = 64;
// GeM's register blocks: NCS chunks (2 vectors each), NSC rows (2 vectors each).
constexpr int kGemBlockChunks = 4;
constexpr int kGemBlockRows = 4;
// Backward: NCS rows longer than this are cut into pieces (spread over threads, and
// float-encoded indices stay exact) ...
constexpr int64_t kBackwardRunPiece = int64_t{1} << 18;
// ... and NSC tasks hold about this many elements of rows.
constexpr int64_t kBackwardRowsElements = int64_t{1} << 20;

// The pieces a reduction is cut into: `count` pieces of `length` (the last may be shorter).
struct Pieces {
  int64_t count;
  int64_t length;
};

// NCS forward: R rows of S. Pieces are multiples of 16 elements.
inline Pieces ncs_forward_pieces(int64_t R, int64_t S) {
  int64_t pieces = ceil_div(S, kMaxRunPiece);
  if (R < kTargetTasks) {
    pieces = std::max(pieces, std::min(ceil_div(kTargetTasks, R), ceil_div(S, kMinTaskElements)));
  }
  const int64_t length = ceil_div(ceil_div(S, pieces), 16) * 16;
  return {ceil_div(S, length), length};
}

// NSC forward: N samples of S rows of C channels, cut along S into pieces of rows.
inline Pieces nsc_forward_pieces(int64_t N, int64_t C, int64_t S) {
  int64_t pieces = ceil_div(S, kMaxRowsPiece);
  if (N < kTargetTasks) {
    // Each piece costs C partial results to write and merge, so pieces stay large.
    pieces =
        std::max(pieces, std::min(ceil_div(kTargetTasks, N), ceil_div(S * C, kMinChannelsPiece)));
  }
  pieces = std::min(pieces, S);
  const int64_t rows = ceil_div(S, pieces);
  return {ceil_div(S, rows), rows};
}

// NCS backward: every element is computed independently; pieces only spread long rows.
inline Pieces ncs_backward_pieces(int64_t S) {
  const int64_t pieces = ceil_div(S, kBackwardRunPiece);
  return {pieces, ceil_div(S, pieces)};
}

// NSC backward: blocks of rows, enough that the per-channel coefficients cost little next to
// the rows.
inline Pieces nsc_backward_blocks(int64_t C, int64_t S) {
  const int64_t rows = std::min(S, std::max<int64_t>(ceil_div(kBackwardRowsElements, C), 1));
  return {ceil_div(S, rows), rows};
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gapkernels
