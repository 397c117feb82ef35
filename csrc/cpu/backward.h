// The backward's math on the CPU, shared by the NCS and NSC units: each row's coefficients and
// the value of one grad_x element (scalar) or chunk (vectors). grad_x is written once.
//
// grad_x[r, s] = A[r] * f(x) + (s == index[r]) * B[r], f = 1 except for GEM, where
// f = (x * B[r])**(p-1) for x >= eps, else 0, with A = g * r**(1/p - 1) / S (pool_math.h's
// gem_grad_scale) and B = 1/M. GeM's exponent here is p - 1 (KernelArgs::grad_power_of), raised
// with pool_math.h's power() (scalar) and its vector form vec_power.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/layout.h"
#include "cpu/stats.h"
#include "cpu/vec.h"
#include "pool_math.h"

namespace gapkernels {
namespace cpu {
inline namespace CPU_CAPABILITY {

// 32 bytes of grad_x, moved whole (GCC's vector extension: one or two registers, or half of one).
typedef char RawPiece __attribute__((vector_size(32)));
constexpr int64_t kRawPieceBytes = sizeof(RawPiece);

// The constant modes write grad_x from a few values converted once. A copy loop that loads from a
// buffer and stores to rows whose addresses match the buffer's in the low 12 bits waits on the
// stores (the loads' false dependence on them): here the values are held in registers across the
// stores, or staged at a safe distance.

// dst[0, len) = the chunk `chunk` (kBytes bytes) repeated, the last one overlapping the
// previous; len * sizeof(T) >= kBytes.
template <int64_t kBytes, typename T>
C10_ALWAYS_INLINE void fill_run(T* dst, int64_t len, const T* chunk) {
  constexpr int64_t kPieces = kBytes / kRawPieceBytes;
  static_assert(kPieces * kRawPieceBytes == kBytes, "whole pieces");
  constexpr int64_t kCount = kBytes / static_cast<int64_t>(sizeof(T));
  RawPiece v[kPieces];
  for (int64_t k = 0; k < kPieces; ++k) {
    std::memcpy(&v[k], reinterpret_cast<const char*>(chunk) + k * kRawPieceBytes, kRawPieceBytes);
  }
  auto put = [&](T* at) {
    for (int64_t k = 0; k < kPieces; ++k) {
      std::memcpy(reinterpret_cast<char*>(at) + k * kRawPieceBytes, &v[k], kRawPieceBytes);
    }
  };
  int64_t i = 0;
  for (; i + kCount <= len; i += kCount) put(dst + i);
  if (i < len) put(dst + len - kCount);
}

// Rows dst + r * stride, r < rows, = src[0, count), copied from `stage` (count * sizeof(T) +
// 4096 bytes), where src is put first at 128 bytes past the first row's address modulo 4 KiB:
// rows of a multiple of 4 KiB then never alias the loads (copied straight from src, measured
// 1.5-2x slower for some C), and their rows are written in address order.
template <typename T>
inline void copy_to_rows(const T* src, int64_t count, T* dst, int64_t stride, int64_t rows,
                         std::vector<char>& stage) {
  const auto bytes = static_cast<size_t>(count) * sizeof(T);
  if (stage.size() < bytes + 4096) stage.resize(bytes + 4096);
  const uintptr_t base = reinterpret_cast<uintptr_t>(stage.data());
  char* staged = stage.data() + ((reinterpret_cast<uintptr_t>(dst) + 128 - base) & 4095);
  std::memcpy(staged, src, bytes);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * stride, staged, bytes);
}

template <Mode kMode, typename scalar_t>
struct GradMath {
  GK_CPU_KERNEL_TYPES(kMode, scalar_t);
  using Grad = GradInputs<scalar_t>;

  // A, B and index of rows r0 .. r0+count-1, count <= kBatch.
  static void row_coefficients(const Args& a, const Grad& g, int64_t r0, int64_t count, acc_t* A,
                               acc_t* B, int64_t* index) {
    int64_t n = r0 / a.C;
    int64_t c = r0 - n * a.C;
    const acc_t S = static_cast<acc_t>(a.S);
    if constexpr (kGem) {
      // gem_grad_scale for kBatch rows at a time, in vectors.
      GK_ALIGNED acc_t big_m[kBatch];
      GK_ALIGNED acc_t ratio[kBatch];
      GK_ALIGNED acc_t exponent[kBatch];
      GK_ALIGNED acc_t go[kBatch];
      for (int64_t i = 0; i < kBatch; ++i) {
        const int64_t r = r0 + i;
        big_m[i] = i < count ? g.aux[r * g.aux_columns] : acc_t(1);
        ratio[i] = i < count ? g.aux[r * g.aux_columns + 1] : acc_t(1);
        exponent[i] = i < count ? acc_t(1) / a.param(c) - acc_t(1) : acc_t(0);
        go[i] = i < count ? static_cast<acc_t>(g.grad_out[r]) : acc_t(0);
        if (++c == a.C) c = 0;
      }
      for (int64_t i = 0; i < kBatch; i += V) {
        const Vec pw = vec_exp(Vec::loadu(exponent + i) * vec_log(Vec::loadu(ratio + i)));
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

  // One chunk of GEM's grad_x: A * (x * B)**(p-1) masked by x >= eps, with the exponent p - 1
  // raised as kPow says (see dispatch_power). (The other modes' chunks are constants: see
  // constant_chunks.)
  template <int kPow>
  static inline void grad_chunk(const Vec (&A)[2], const Vec (&B)[2], const scalar_t* x,
                                const Power& e, const Vec& eps, Vec (&out)[2]) {
    static_assert(kGem, "GeM's chunks only");
    Vec v[2];
    IO::load(x, v[0], v[1]);
    for (int k = 0; k < 2; ++k) {
      const Vec z = v[k] * B[k];
      Vec log_z = z;
      if constexpr (kPow == kPowExp) {
        // z may underflow to 0: the clamp keeps 0**0 (p = 1) at 1.
        log_z = clamp_min(vec_log(z), Vec(std::numeric_limits<acc_t>::lowest()));
      }
      out[k] = (A[k] * vec_power<kPow>(z, log_z, e.vec[k], e.integral)) & (v[k] >= eps);
    }
  }

  // The other modes: every element of a row (NCS) or channel (NSC) is A, but the one at the
  // index (max modes): A + B. Writes the chunks of both at `plain` and `hit` (W elements each),
  // converted as a vector of A + (index ? B : 0) is in the max modes.
  static inline void constant_chunks(const Vec (&A)[2], const Vec (&B)[2], scalar_t* plain,
                                     scalar_t* hit) {
    static_assert(!kGem, "the constant modes only");
    if constexpr (kMax) {
      const Vec zero(acc_t(0));
      IO::store(plain, A[0] + zero, A[1] + zero);
      IO::store(hit, A[0] + B[0], A[1] + B[1]);
    } else {
      IO::store(plain, A[0], A[1]);
    }
  }

  // One element of grad_x (element s of its row); e: GeM's exponent p - 1.
  static inline acc_t grad_scalar(acc_t A, acc_t B, int64_t index, int64_t s, acc_t x,
                                  Exponent<acc_t> e, acc_t eps) {
    if constexpr (kGem) {
      if (!(x >= eps)) return acc_t(0);
      return A * power(x * B, e.p, e.integral);
    } else if constexpr (kMax) {
      return s == index ? A + B : A;
    } else {
      return A;
    }
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace gapkernels
