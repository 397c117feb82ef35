// Where a thread works in each layout: the NCS peel of a piece at 16-byte boundaries and the NSC
// place (channel vector, rows of S, sample, piece) of a thread. 64-bit offsets throughout.
#pragma once

#include <cstdint>

#include "cuda/launch.h"

namespace gapkernels {

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

// Where one thread of an NSC launch works: its channel vector (tx, from c0), its rows (ty: every
// by-th position of its piece), its row or sample n and its piece (the kernel cuts the piece's
// range: rows.cuh's piece_range). Shared by forward and backward.
struct NscPlace {
  int tid;
  int bx;
  int by;
  int ty;
  int64_t n;
  int64_t piece;
  int64_t c0;
  int64_t channels_left;
};

template <int VEC>
__device__ __forceinline__ NscPlace nsc_place(const NscGeometry& g, int64_t N, int64_t C) {
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
  return p;
}

}  // namespace gapkernels
