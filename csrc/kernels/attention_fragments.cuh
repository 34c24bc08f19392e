// Flash attention, part 1 of 4 (the overview is attention.cu's): the mma.sync building blocks.
// Packing fp32 pairs into 16-bit operands, the ldmatrix lane offsets into padded tiles, the warp-
// level GEMMs on m16n8k16 MMAs whose fragments never leave registers, and the padded tile loader.
// Every part opens fmcore's anonymous namespace itself: attention.cu is their one translation unit.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "ptx.cuh"

namespace fmcore {
namespace {

// Two floats as one 32-bit register of two T (the lower half holds the first, lower-index element).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// The A fragment (16 rows x 16 cols kk*16..) of a 16 x N accumulator held as N/8 tiles of c-layout:
// tiles 2kk and 2kk+1 are exactly the four registers' halves (no data moves between lanes).
template <typename T, int NT>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&c)[NT][4], int kk) {
  a[0] = pack2<T>(c[2 * kk][0], c[2 * kk][1]);
  a[1] = pack2<T>(c[2 * kk][2], c[2 * kk][3]);
  a[2] = pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// Lane offsets into a row-major smem tile for the three ldmatrix.x4 uses (r = lane % 8, i = lane /
// 8):
//  a_off: A operand 16x16 at (row0, col0): matrices (rows 0-7|8-15) x (cols 0-7|8-15), row-fastest
//  b_off: B operand read from rows = N index (K for S = Q K^T): two n-tiles (rows 0-7, 8-15), each
//         needing cols 0-7 (b0) and 8-15 (b1)
//  The .trans B operand (V for O = P V: rows = k index) uses a_off: matrices (k 0-7|8-15) x (n
//  0-7|8-15) give b0, b1 of n-tile 0, then b0, b1 of n-tile 1.
template <int kPitch>
__device__ __forceinline__ int a_off(int lane) {
  return ((lane & 7) + ((lane >> 3) & 1) * 8) * kPitch + (lane >> 4) * 8;
}
template <int kPitch>
__device__ __forceinline__ int b_off(int lane) {
  return ((lane & 7) + (lane >> 4) * 8) * kPitch + ((lane >> 3) & 1) * 8;
}

// c[MW][NT] (MW*16 x NT*8) += A (MW*16 rows of sA at a_off, k = D) * B^T (NT*8 rows of sB at
// b_off, k = D). Each B fragment loaded from shared memory feeds MW MMAs: a warp that owns several
// 16-row tiles needs less shared-memory bandwidth per MMA.
template <typename T, int D, int MW, int NT, int kPitch>
__device__ __forceinline__ void gemm_abt_mw(float (&c)[MW][NT][4], const T* sA, const T* sB,
                                            int lane) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[MW][4];
#pragma unroll
    for (int mw = 0; mw < MW; ++mw)
      ldsm_x4(a[mw], sA + mw * 16 * kPitch + a_off<kPitch>(lane) + kk * 16);
#pragma unroll
    for (int nn = 0; nn < NT / 2; ++nn) {
      uint32_t b[4];
      ldsm_x4(b, sB + nn * 16 * kPitch + b_off<kPitch>(lane) + kk * 16);
#pragma unroll
      for (int mw = 0; mw < MW; ++mw) {
        mma16816<T>(c[mw][2 * nn], a[mw], b[0], b[1]);
        mma16816<T>(c[mw][2 * nn + 1], a[mw], b[2], b[3]);
      }
    }
  }
}

// acc[MW][D/8] (MW*16 x D) += P (MW*16 x K, accumulator layout p[MW][K/8]) * sB (K rows x D cols,
// row-major).
template <typename T, int D, int MW, int KT, int kPitch>
__device__ __forceinline__ void gemm_pb_mw(float (&acc)[MW][D / 8][4], const float (&p)[MW][KT][4],
                                           const T* sB, int lane) {
#pragma unroll
  for (int kk = 0; kk < KT / 2; ++kk) {
    uint32_t a[MW][4];
#pragma unroll
    for (int mw = 0; mw < MW; ++mw) acc_to_a<T>(a[mw], p[mw], kk);
#pragma unroll
    for (int dd = 0; dd < D / 16; ++dd) {
      uint32_t b[4];
      ldsm_x4_trans(b, sB + kk * 16 * kPitch + a_off<kPitch>(lane) + dd * 16);
#pragma unroll
      for (int mw = 0; mw < MW; ++mw) {
        mma16816<T>(acc[mw][2 * dd], a[mw], b[0], b[1]);
        mma16816<T>(acc[mw][2 * dd + 1], a[mw], b[2], b[3]);
      }
    }
  }
}

// The one-tile forms the backward kernels use (a warp owns 16 rows there).
template <typename T, int D, int NT, int kPitch>
__device__ __forceinline__ void gemm_abt(float (&c)[NT][4], const T* sA, const T* sB, int lane) {
  gemm_abt_mw<T, D, 1, NT, kPitch>(reinterpret_cast<float(&)[1][NT][4]>(c), sA, sB, lane);
}
template <typename T, int D, int KT, int kPitch>
__device__ __forceinline__ void gemm_pb(float (&acc)[D / 8][4], const float (&p)[KT][4],
                                        const T* sB, int lane) {
  gemm_pb_mw<T, D, 1, KT, kPitch>(reinterpret_cast<float(&)[1][D / 8][4]>(acc),
                                  reinterpret_cast<const float(&)[1][KT][4]>(p), sB, lane);
}

// acc (16 x DW) += A (16 x K) * B (K x DW), with A stored transposed in smem (sAt: K rows, A's 16
// rows as columns, pitch kPitchA) and B row-major (K rows, pitch kPitchB). ldmatrix.trans of the
// transposed storage at b_off's lane addresses yields A's fragment (matrices (k 0-7|8-15) x (m
// 0-7|8-15), m fastest, as a0..a3 need); B is read like V in gemm_pb.
template <typename T, int DW, int K, int kPitchA, int kPitchB>
__device__ __forceinline__ void gemm_tb(float (&acc)[DW / 8][4], const T* sAt, const T* sB,
                                        int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    ldsm_x4_trans(a, sAt + kk * 16 * kPitchA + b_off<kPitchA>(lane));
#pragma unroll
    for (int dd = 0; dd < DW / 16; ++dd) {
      uint32_t b[4];
      ldsm_x4_trans(b, sB + kk * 16 * kPitchB + a_off<kPitchB>(lane) + dd * 16);
      mma16816<T>(acc[2 * dd], a, b[0], b[1]);
      mma16816<T>(acc[2 * dd + 1], a, b[2], b[3]);
    }
  }
}

// Copies rows [0, ROWS) of a (rows, D) slice starting at `src` (element row stride `stride`) into
// smem (pitch D + 8); rows >= n_valid are zero-filled and their addresses never formed (`base`, a
// valid pointer, stands in). kPerRow threads share a row (the largest power of two dividing its
// D / 8 16-byte chunks: 8, 4, 16 at D = 64, 96, 128); thread t copies chunks t % kPerRow + j *
// kPerRow of rows t / kPerRow + i * kRowsPerPass. Its offsets are the same every call (the
// kernels' loops keep them) and each chunk is a cp.async at a fixed offset from them. Only a tile
// that crosses the end of the sequence (n_valid < ROWS, the same for every thread) checks rows.
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t stride, int64_t n_valid,
                                          const T* base) {
  constexpr int kChunks = D / 8, kPerRow = kChunks & -kChunks, kRowsPerPass = THREADS / kPerRow;
  constexpr int kPasses = (ROWS + kRowsPerPass - 1) / kRowsPerPass;
  // Whole passes, but for 32 rows of D = 96 with 256 threads: half of them then copy nothing.
  constexpr bool kEven = ROWS % kRowsPerPass == 0;
  const int row = threadIdx.x / kPerRow, col = threadIdx.x % kPerRow * 8;
  const int r0 = kEven || row < ROWS ? row : 0;  // a row of the tile, for the addresses
  dst += r0 * (D + 8) + col;
  if (n_valid >= ROWS) {
    src += r0 * stride + col;
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      if (!kEven && row + i * kRowsPerPass >= ROWS) continue;
#pragma unroll
      for (int j = 0; j < kChunks / kPerRow; ++j) {
        cp_async16(dst + i * kRowsPerPass * (D + 8) + j * kPerRow * 8,
                   src + i * kRowsPerPass * stride + j * kPerRow * 8, true);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int r = row + i * kRowsPerPass;
      if (!kEven && r >= ROWS) continue;
      const bool ok = r < n_valid;
#pragma unroll
      for (int j = 0; j < kChunks / kPerRow; ++j) {
        cp_async16(dst + i * kRowsPerPass * (D + 8) + j * kPerRow * 8,
                   ok ? src + r * stride + col + j * kPerRow * 8 : base, ok);
      }
    }
  }
}

}  // namespace
}  // namespace fmcore
