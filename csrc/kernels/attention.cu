// Flash attention CUDA kernels (FlashAttention-2 structure on mma.sync tensor cores, sm_80+;
// built for sm_90a).
//
// Forward: one CTA per (block of kBlockM queries, query head, sequence); each warp owns kMW tiles
// of 16 query rows (two by default: every K/V fragment read from shared memory then feeds two MMAs;
// the tile shapes are Tiles, below, per head dim and configuration). K/V tiles of kBlockN keys
// stream through double-buffered shared memory with cp.async while the previous tile is in use.
// S = Q K^T and O += P V run on m16n8k16 MMAs with fp32 accumulation; the online softmax works on
// the S accumulators in registers (their layout is fixed by the PTX ISA), and P is re-packed from the
// accumulator layout into A fragments without touching shared memory. The running max m is kept
// on raw scores and the scale folded into the exponent, P = 2^(s * c - m * c) with c = scale *
// log2(e): one FFMA and one ex2.approx a score. Causal CTAs stop at the last key block their last
// query sees (tiles above the diagonal are never loaded); only a warp whose rows straddle the
// diagonal, or a tile that crosses the sequence end, is masked (a warp-uniform branch).
//
// The kernels are bound by instruction issue more than by the tensor cores (the forward runs eight
// warps an SM at the default tiles), so the main loops keep other work small: each thread's load
// offsets are fixed (load_tile), rows are checked only in a tile that crosses the sequence end, and
// the masking's index arithmetic is 32-bit.
//
// Backward:
//   attn_bwd_delta_kernel  delta = rowsum(dO * O) - dlse, one warp per query row
//   attn_bwd_dkdv_kernel   one CTA per (key block, kv head, sequence) loops over the query blocks
//                          of every query head of its GQA group: dV += P^T dO, dK += dS^T Q
//   then dq, one of two ways:
//   - deterministic: attn_bwd_dq_kernel, one CTA per (query block, query head, sequence), loops
//     over the key blocks its queries see: dQ += dS K. Every output is owned by one CTA, so the
//     gradients are bitwise reproducible whatever the scheduling; the price is computing S and dP
//     twice (7 matmuls, ~1.4x the tensor-core work of 5).
//   - default (kAtomicDq): the dk/dv kernel stages dS^T in shared memory and each warp adds a
//     16-row slab of dS K into an fp32 dq buffer with atomics (FlashAttention-2's 5 matmuls);
//     attn_bwd_dq_convert_kernel then writes dq = scale * buffer. Memory traffic per dq element:
//     up to 18 bytes (zeroing 4, the atomics' first read and last write-back 8 when the buffer
//     leaves L2, conversion 4 + 2) against 2 for a direct write; the float additions land in
//     varying order.
// P = 2^(s * c - lse * log2(e)) is recomputed from lse (one FFMA and one ex2.approx a score);
// dS = P * (dP - delta) with dP = dO V^T.
//
// Shared-memory tiles are row-major with a pitch of D + 8 elements: the 16-byte pad puts the 8 rows
// an ldmatrix reads in 8 different bank groups (no conflicts) and keeps every row 16-byte aligned
// for cp.async. Rows past the sequence end are zero-filled (cp.async with src-size 0), so no
// garbage (possibly NaN) ever enters an MMA, and their scores are masked.
//
// The step to FlashAttention-3 (wgmma + TMA + warp specialization) keeps this file's structure:
//  1. load_tile -> TMA loads (cp.async.bulk.tensor) issued by one producer warp into a ring of
//     stages guarded by mbarriers, shared memory 128-byte swizzled instead of padded;
//  2. gemm_abt / gemm_pb -> wgmma.mma_async on 64-row warpgroup tiles: S = Q K^T with both operands
//     in shared memory, O += P V with P from registers (the RS form, as acc_to_a does here); done
//     for the forward in attn_fwd_wgmma_kernel (tile configurations 3 to 6, opt-in until a GPU
//     run has checked them);
//  3. two consumer warpgroups ping-pong so one's softmax overlaps the other's GEMMs, and within a
//     warpgroup the softmax of tile n overlaps the QK^T of tile n + 1 (intra-warpgroup pipelining);
//  4. the softmax and masking code stays: the wgmma accumulator has the same row-per-quad layout.
//  The backward moves the same way (attn_bwd_dkdv_wgmma_kernel: the dk/dv kernel with the atomic
//  dq, its five matmuls on wgmma); keeping determinism at 5 matmuls needs FA3's semaphore-ordered
//  dq accumulation (dq blocks added in key-block order) instead of the separate dq kernel.
//
// Without a GPU: tests/cudasim runs this file on a CPU simulator (the hardware-dependent
// instructions, in ptx.cuh, swapped for models of them); scripts/sanitize_cpu.sh sim-tsan adds a
// shared-memory racecheck.
#include <cfloat>
#include <cmath>
#include <cstdint>

#include "attention.h"
#include "common.cuh"
#include "ptx.cuh"

namespace fmcore {

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- device helpers

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

template <typename T>
__device__ __forceinline__ const T* row_ptr(const AttnTensor& t, int64_t b, int64_t row,
                                            int64_t h) {
  return static_cast<const T*>(t.ptr) + b * t.stride_b + row * t.stride_s + h * t.stride_h;
}
template <typename T>
__device__ __forceinline__ T* row_ptr_mut(const AttnTensor& t, int64_t b, int64_t row, int64_t h) {
  return static_cast<T*>(t.ptr) + b * t.stride_b + row * t.stride_s + h * t.stride_h;
}

// Where the rows r0 + i (0 <= i < kRows) of a query block stop seeing the keys of the kBlockN-key
// block at n0: row r0 + i sees its keys below (i), relative to n0 (key_end's clamps, in 32 bits).
template <int kRows, int kBlockN>
struct BlockKeyEnd {
  int e0, kv;  // (i) = min(max(e0 + i, 0), kv); kv: the block's keys before the sequence end
  __device__ __forceinline__ BlockKeyEnd(bool causal, int64_t r0, int64_t n0, const SeqInfo& s) {
    const int64_t valid = s.k_len - n0, e = causal ? r0 + s.k_len - s.q_len + 1 - n0 : kBlockN;
    kv = valid < 0 ? 0 : (valid < kBlockN ? static_cast<int>(valid) : kBlockN);
    e0 = e < -kRows ? -kRows : (e > kBlockN ? kBlockN : static_cast<int>(e));
  }
  __device__ __forceinline__ int operator()(int i) const {
    const int e = e0 + i;
    return e < 0 ? 0 : (e < kv ? e : kv);
  }
};

// In a block of kBlockN keys from n0 that crosses the sequence end or this warp's part of the
// diagonal (its rows from r0), sets acc (a warp's kMW 16-row tiles of scores, or of P) to `fill`
// for the keys a row does not see. Other blocks need no mask: the branch is warp-uniform.
template <int kRows, int kBlockN, int kMW, int NT>
__device__ __forceinline__ void mask_block(float (&acc)[kMW][NT][4], float fill, bool causal,
                                           int64_t r0, int64_t n0, const SeqInfo& s, int lane) {
  if (n0 + kBlockN <= s.k_len && !(causal && n0 + kBlockN > r0 + s.k_len - s.q_len + 1)) return;
  const BlockKeyEnd<kRows, kBlockN> key_end_of(causal, r0, n0, s);
  const int g = lane / 4, tq = lane % 4;
#pragma unroll
  for (int r2 = 0; r2 < 2 * kMW; ++r2) {  // this lane's rows: tile mw, half hh
    const int mw = r2 / 2, hh = r2 % 2;
    const int ke = key_end_of(mw * 16 + g + hh * 8);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        if (nt * 8 + 2 * tq + e >= ke) acc[mw][nt][2 * hh + e] = fill;
      }
    }
  }
}

// Writes the 16 x D accumulator of a warp (rows row0 + g, row0 + g + 8) times `mul` to rows <
// n_rows.
template <typename T, int D>
__device__ __forceinline__ void store_rows(const AttnTensor& t, int64_t b, int64_t seq_start,
                                           int64_t row0, int64_t n_rows, int64_t h,
                                           const float (&acc)[D / 8][4], const float (&mul)[2],
                                           int lane) {
  const int g = lane / 4, tq = lane % 4;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int64_t row = row0 + g + hh * 8;
    if (row >= n_rows) continue;
    T* out = row_ptr_mut<T>(t, b, seq_start + row, h);
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<uint32_t*>(out + dt * 8 + 2 * tq) =
          pack2<T>(acc[dt][2 * hh] * mul[hh], acc[dt][2 * hh + 1] * mul[hh]);
    }
  }
}

// One key block of the online softmax for a warp's kMW 16-row tiles, but for the output: turns the
// scores sc (raw, masked to -inf) into P in place, updates each row's running max (of raw scores)
// and this lane's partial sum, and sets alpha to the factor o's rows need for the change of the
// max (rescale_rows).
template <int kMW, int NT>
__device__ __forceinline__ void softmax_scores(float (&sc)[kMW][NT][4], float (&m_run)[kMW][2],
                                               float (&l_run)[kMW][2], float scale_log2,
                                               float (&alpha)[kMW][2]) {
#pragma unroll
  for (int r2 = 0; r2 < 2 * kMW; ++r2) {
    const int mw = r2 / 2, hh = r2 % 2;
    float mx = m_run[mw][hh];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      mx = fmaxf(mx, fmaxf(sc[mw][nt][2 * hh], sc[mw][nt][2 * hh + 1]));
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    // p = 2^(s * scale_log2 - m_off), one FFMA and one MUFU.EX2. A row that has seen only masked
    // keys keeps max -inf; an offset of 0 then keeps p = 2^-inf = 0 (and alpha, from -inf, 0).
    const float m_off = mx == -INFINITY ? 0.f : mx * scale_log2;
    alpha[mw][hh] = ex2_approx(m_run[mw][hh] * scale_log2 - m_off);
    m_run[mw][hh] = mx;
    float rs = 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float pv = ex2_approx(sc[mw][nt][2 * hh + e] * scale_log2 - m_off);
        sc[mw][nt][2 * hh + e] = pv;
        rs += pv;
      }
    }
    l_run[mw][hh] = l_run[mw][hh] * alpha[mw][hh] + rs;  // the quad adds its partial sums at the end
  }
}

// o's rows times softmax_scores' alpha.
template <int kMW, int DT>
__device__ __forceinline__ void rescale_rows(float (&o)[kMW][DT][4], const float (&alpha)[kMW][2]) {
#pragma unroll
  for (int mw = 0; mw < kMW; ++mw) {
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mw][dt][e] *= alpha[mw][e / 2];
    }
  }
}

// softmax_scores, and o rescaled at once.
template <int kMW, int NT, int DT>
__device__ __forceinline__ void softmax_step(float (&sc)[kMW][NT][4], float (&o)[kMW][DT][4],
                                             float (&m_run)[kMW][2], float (&l_run)[kMW][2],
                                             float scale_log2) {
  float alpha[kMW][2];
  softmax_scores(sc, m_run, l_run, scale_log2, alpha);
  rescale_rows(o, alpha);
}

// The forward's epilogue for a warp's kMW 16-row tiles from query row0 (of sequence b, head h):
// lse, and out = o / l.
template <typename T, int D, int kMW>
__device__ __forceinline__ void write_rows(const AttnParams& p, int64_t b, int64_t h,
                                           const SeqInfo& s, int64_t row0,
                                           const float (&o)[kMW][D / 8][4],
                                           const float (&m_run)[kMW][2],
                                           const float (&l_run)[kMW][2], float scale_log2,
                                           int lane) {
  float* lse = static_cast<float*>(p.lse);
  const int g = lane / 4, tq = lane % 4;
#pragma unroll
  for (int mw = 0; mw < kMW; ++mw) {
    float inv_l[2];
    const int64_t r0 = row0 + mw * 16;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float l = l_run[mw][hh];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      inv_l[hh] = l > 0.f ? 1.f / l : 0.f;
      const int64_t row = r0 + g + hh * 8;
      if (tq == 0 && row < s.q_len) {
        lse[b * p.lse_stride_b + h * p.lse_stride_h + s.q_start + row] =
            l > 0.f ? (m_run[mw][hh] * scale_log2 + log2f(l)) * kLn2 : -INFINITY;
      }
    }
    store_rows<T, D>(p.out, b, s.q_start, r0, s.q_len, h, o[mw], inv_l, lane);
  }
}

// The dk/dv kernels' P^T from S^T in place, for a warp's 16 keys (rows, from n0 + 16 * warp) by
// MT * 8 queries (columns, from i0, whose lse in log2 units is sL): P^T = 2^(S^T * scale_log2 -
// lse), and 0 where a query does not see a key (keys past the sequence end, and, causal, keys past
// a query's diagonal). Only a warp whose keys cross either is masked (a warp-uniform branch).
template <int kBlockM, int kBlockN, int MT>
__device__ __forceinline__ void pt_from_st(float (&pt)[MT][4], const float* sL, float scale_log2,
                                           bool causal, int64_t n0, int warp, int64_t i0,
                                           const SeqInfo& s, int lane) {
  const int g = lane / 4, tq = lane % 4;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      pt[mt][r] = ex2_approx(pt[mt][r] * scale_log2 - sL[mt * 8 + 2 * tq + (r & 1)]);
    }
  }
  const int64_t j0 = n0 + warp * 16;             // this warp's first key
  const int64_t diag = s.k_len - s.q_len;        // key j is visible to query i iff j <= i + diag
  if (j0 + 16 <= s.k_len && !(causal && j0 + 15 > i0 + diag)) return;
  // P = 0 where key jr (relative to n0) is past the end or, causal, jr - c > i0 + diag - n0 for
  // query c (relative to i0).
  const int64_t off64 = causal ? i0 + diag - n0 : kBlockN;
  const int off =
      off64 < -kBlockM ? -kBlockM : (off64 > kBlockN ? kBlockN : static_cast<int>(off64));
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int jr = warp * 16 + g + hh * 8;
    const bool past_end = n0 + jr >= s.k_len;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        if (past_end || jr - (mt * 8 + 2 * tq + e) > off) pt[mt][2 * hh + e] = 0.f;
      }
    }
  }
}

// The dk/dv kernels' dS^T = P^T * (dP^T - delta) in place of dP^T (delta of the query columns, as
// pt_from_st's lse, in sD).
template <int MT>
__device__ __forceinline__ void ds_from_dp(float (&dst)[MT][4], const float (&pt)[MT][4],
                                           const float* sD, int lane) {
  const int tq = lane % 4;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      dst[mt][r] = pt[mt][r] * (dst[mt][r] - sD[mt * 8 + 2 * tq + (r & 1)]);
    }
  }
}

// The query blocks a dk/dv CTA (keys from n0, kv head hk) works through: in every query head of
// its GQA group, the blocks of kBlockM rows from the first that sees key n0. Trip `it` works on
// query head hk * group + it / per_head, rows from (m_first + it % per_head) * kBlockM; step()
// moves (h, i0) through that order (no 64-bit division a trip).
template <int kBlockM>
struct QueryWalk {
  int64_t m_first, m_count, iters, h, i0;
  __device__ __forceinline__ QueryWalk(const AttnParams& p, const SeqInfo& s, int64_t n0,
                                       int64_t hk) {
    const int64_t group = p.heads_q / p.heads_k;
    m_first = query_begin(p.causal, n0, s.q_len, s.k_len) / kBlockM;
    m_count = (s.q_len + kBlockM - 1) / kBlockM;
    iters = group * (m_count > m_first ? m_count - m_first : 0);
    h = hk * group;
    i0 = m_first * kBlockM;
  }
  // The last block of this head: the next trip starts the next head.
  __device__ __forceinline__ bool head_done() const { return i0 + kBlockM >= m_count * kBlockM; }
  __device__ __forceinline__ int64_t next_h() const { return head_done() ? h + 1 : h; }
  __device__ __forceinline__ int64_t next_i0() const {
    return head_done() ? m_first * kBlockM : i0 + kBlockM;
  }
  __device__ __forceinline__ void step() {
    const int64_t nh = next_h(), ni = next_i0();
    h = nh;
    i0 = ni;
  }
};

// The dk/dv kernels' lse and delta of query row i0 + threadIdx.x (of sequence b, head h) into sL
// and sD by cp.async (zeros past the end), one thread a row; lse_to_log2 converts lse once landed.
template <int kBlockM>
__device__ __forceinline__ void load_lse_delta(const AttnParams& p, int64_t b, int64_t h,
                                               const SeqInfo& s, int64_t i0, float* sL, float* sD) {
  if (threadIdx.x < kBlockM) {
    const float* lse = static_cast<const float*>(p.lse);
    const int64_t row = i0 + threadIdx.x;
    const bool ok = row < s.q_len;
    const int64_t idx = b * p.lse_stride_b + h * p.lse_stride_h + s.q_start + row;
    cp_async4(sL + threadIdx.x, ok ? lse + idx : lse, ok);
    cp_async4(sD + threadIdx.x, ok ? p.delta + idx : p.delta, ok);
  }
}

// The dk/dv kernels' lse of query row i0 + threadIdx.x, which this thread copied into sL and has
// waited for: to log2 units, +inf for rows past the end or rows that saw no key (-inf), so that
// P = 0 there.
template <int kBlockM>
__device__ __forceinline__ void lse_to_log2(float* sL, int64_t i0, int64_t q_len) {
  if (threadIdx.x < kBlockM) {
    float& l = sL[threadIdx.x];
    l = i0 + threadIdx.x >= q_len || l == -INFINITY ? INFINITY : l * kLog2e;
  }
}

// The forwards' exponent scale: the running max is taken over raw scores and the scale applied
// inside each exponent's FFMA, so raw scores must rank as scaled ones do: a negative scale negates
// Q instead (negate8) and scales by its magnitude. A zero scale becomes the smallest normal float,
// so that a masked score (-inf) still gives 2^-inf = 0 (not 0 * -inf = NaN) while visible ones
// give 2^(+-tiny) = 1, as with 0.
__device__ __forceinline__ float fwd_scale_log2(float scale) {
  return fmaxf(fabsf(scale), FLT_MIN) * kLog2e;
}

// Flips the sign bit of the 8 bf16 or fp16 values in v (bit 15 of each half): Q for a negative
// scale.
__device__ __forceinline__ void negate8(uint4& v) {
  v.x ^= 0x80008000u;
  v.y ^= 0x80008000u;
  v.z ^= 0x80008000u;
  v.w ^= 0x80008000u;
}

// How many blocks of kBlockN keys the query rows [m0, m0 + kBlockM) see: up to the last key their
// last row sees.
template <int kBlockM, int kBlockN>
__device__ __forceinline__ int key_blocks(bool causal, int64_t m0, const SeqInfo& s) {
  const int64_t last_row = (m0 + kBlockM < s.q_len ? m0 + kBlockM : s.q_len) - 1;
  return static_cast<int>((key_end(causal, last_row, s.q_len, s.k_len) + kBlockN - 1) / kBlockN);
}

// ---- kernels

// Each warp owns kMW 16-row tiles (kMW * 16 query rows). Eight-warp CTAs at D <= 96 fit two an SM
// in 128 registers a thread, which the bound holds ptxas to (left free it took 134 at D = 96, one
// CTA an SM; held, it spills 12 bytes). A minimum of 0 CTAs is no bound: nvcc then emits none, and
// ptxas allocates as it would without the second argument.
template <typename T, int D, int kWarps, int kMW, int kBlockN>
__global__ void __launch_bounds__(kWarps * 32, kWarps == 8 && D <= 96 ? 2 : 0)
    attn_fwd_kernel(const AttnParams p) {
  constexpr int kRowsW = 16 * kMW, kBlockM = kRowsW * kWarps, kPitch = D + 8;
  constexpr int kThreads = 32 * kWarps, NT = kBlockN / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kBlockM * kPitch;      // two stages
  T* sV = sK + 2 * kBlockN * kPitch;  // two stages

  const int64_t b = blockIdx.z, h = blockIdx.y;
  const SeqInfo s = seq_info(p, b);
  // Causal: the CTAs with the most key blocks start first.
  const int64_t m0 = int64_t(p.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x) * kBlockM;
  if (m0 >= s.q_len) return;
  const int64_t hk = h / (p.heads_q / p.heads_k);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float scale_log2 = fwd_scale_log2(p.scale);
  const int n_blocks = key_blocks<kBlockM, kBlockN>(p.causal, m0, s);

  const T* q_base = static_cast<const T*>(p.q.ptr);
  const T* k_base = static_cast<const T*>(p.k.ptr);
  const T* v_base = static_cast<const T*>(p.v.ptr);
  const T* k_seq = row_ptr<T>(p.k, b, s.k_start, hk);
  const T* v_seq = row_ptr<T>(p.v, b, s.k_start, hk);
  auto load_kv = [&](int nb, int stage) {
    const int64_t n0 = int64_t(nb) * kBlockN;
    load_tile<T, D, kBlockN, kThreads>(sK + stage * kBlockN * kPitch, k_seq + n0 * p.k.stride_s,
                                       p.k.stride_s, s.k_len - n0, k_base);
    load_tile<T, D, kBlockN, kThreads>(sV + stage * kBlockN * kPitch, v_seq + n0 * p.v.stride_s,
                                       p.v.stride_s, s.k_len - n0, v_base);
  };

  load_tile<T, D, kBlockM, kThreads>(sQ, row_ptr<T>(p.q, b, s.q_start + m0, h), p.q.stride_s,
                                     s.q_len - m0, q_base);
  cp_async_commit();
  if (n_blocks > 0) load_kv(0, 0);
  cp_async_commit();
  if (p.scale < 0.f) {  // flip the sign bit of every Q element (bf16 and fp16 alike: bit 15)
    cp_async_wait<1>();
    __syncthreads();  // the Q tile has landed; the loop's first barrier publishes the flip
    for (int c = threadIdx.x; c < kBlockM * D / 8; c += kThreads) {
      negate8(*reinterpret_cast<uint4*>(sQ + c / (D / 8) * kPitch + c % (D / 8) * 8));
    }
  }

  float o[kMW][D / 8][4] = {};
  float m_run[kMW][2], l_run[kMW][2];  // per row: running max (raw score) and this lane's sum
#pragma unroll
  for (int mw = 0; mw < kMW; ++mw) {
    m_run[mw][0] = m_run[mw][1] = -INFINITY;
    l_run[mw][0] = l_run[mw][1] = 0.f;
  }
  const T* sQw = sQ + warp * kRowsW * kPitch;

  for (int nb = 0; nb < n_blocks; ++nb) {
    const int stage = nb & 1;
    if (nb + 1 < n_blocks) {
      load_kv(nb + 1, stage ^ 1);  // the stage every warp finished reading before the last barrier
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* sKs = sK + stage * kBlockN * kPitch;
    const T* sVs = sV + stage * kBlockN * kPitch;

    float sc[kMW][NT][4] = {};
    gemm_abt_mw<T, D, kMW, NT, kPitch>(sc, sQw, sKs, lane);

    const int64_t n0 = int64_t(nb) * kBlockN;
    // -inf for the keys a row does not see (the scores become exponents).
    mask_block<kRowsW, kBlockN>(sc, -INFINITY, p.causal, m0 + warp * kRowsW, n0, s, lane);
    softmax_step(sc, o, m_run, l_run, scale_log2);

    gemm_pb_mw<T, D, kMW, NT, kPitch>(o, sc, sVs, lane);
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  cp_async_wait<0>();  // a CTA whose rows see no key never waited for its Q tile

  write_rows<T, D>(p, b, h, s, m0 + warp * kRowsW, o, m_run, l_run, scale_log2, lane);
}

// ---- the Hopper forward (tile configurations 3 and 4): wgmma
//
// attn_fwd_kernel with its two matmuls on warpgroup MMAs. A CTA of two warpgroups owns 128 queries
// (64 a warpgroup, 16 a warp, as before); per key block, S = Q K^T is D / 16 wgmmas with Q and K
// read from shared memory, and O += P V is kBlockN / 16 wgmmas with P from registers (acc_to_a
// re-packs S as before: a warp's rows of a wgmma accumulator have mma16816's c layout). Masking,
// softmax and epilogue are attn_fwd_kernel's. Loads stay cp.async by every thread, double-buffered,
// one barrier a step; the step to FlashAttention-3 (TMA, a producer warp, ping-pong) is the
// header's.
//
// Shared-memory tiles: [D / 64][rows][64] elements, 16-byte chunk c of a 128-byte row r stored at
// chunk c ^ (r % 8) (the 128-byte swizzle, whose pattern repeats every 1024 bytes of the shared
// address space, so the tiles start 1024-byte aligned). Descriptors:
//  - Q (A) and K (B), K-major, 16 columns a wgmma: start at atom kk / 4, byte 32 (kk % 4) of the
//    row; 8-row groups SBO = 1024 bytes apart.
//  - V (B of P V, MN-major: 16 keys by D): start at key 16 kk; 8-key groups SBO = 1024 bytes apart,
//    64-column atoms LBO = kBlockN * 128 bytes apart.

// The descriptor of a 128-byte-swizzled shared-memory operand at p (see ptx.cuh).
__device__ __forceinline__ uint64_t sw128_desc(const void* p, uint32_t lbo, uint32_t sbo) {
  return uint64_t((smem_addr(p) & 0x3FFFF) >> 4) | uint64_t(lbo >> 4) << 16 |
         uint64_t(sbo >> 4) << 32 | uint64_t(1) << 62;
}
// A descriptor moved on by `bytes` (a multiple of 16; the start address stays below 256 KiB).
__device__ __forceinline__ uint64_t desc_plus(uint64_t desc, uint32_t bytes) {
  return desc + (bytes >> 4);
}

// reg_fence (ptx.cuh) on every register of a fragment array. Placed right before wgmma_fence, it
// keeps the instructions that wrote the registers a wgmma reads (accumulators, register A) from
// sinking past the fence; right after a wgmma_wait, it keeps accesses to the registers an in-flight
// wgmma used from rising above the wait (and their registers allocated until then).
template <typename R, int M, int N>
__device__ __forceinline__ void fence_regs(R (&r)[M][N]) {
#pragma unroll
  for (int i = 0; i < M; ++i)
#pragma unroll
    for (int j = 0; j < N; ++j) reg_fence(r[i][j]);
}

// Copies rows [0, ROWS) of a (rows, D) slice into a swizzled [D / 64][ROWS][64] tile; rows >=
// n_valid are zero-filled and their addresses never formed (`base` stands in). Thread t copies
// chunk t % (D / 8) of rows t / (D / 8) + i * kRowsPerPass: its swizzled column is the same on
// every pass (kRowsPerPass is a multiple of 8).
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile_sw(T* dst, const T* src, int64_t stride, int64_t n_valid,
                                             const T* base) {
  constexpr int kChunks = D / 8, kRowsPerPass = THREADS / kChunks;
  static_assert(D % 64 == 0 && THREADS % kChunks == 0 && ROWS % kRowsPerPass == 0 &&
                    kRowsPerPass % 8 == 0,
                "whole passes of whole 8-row swizzle groups");
  const int row = threadIdx.x / kChunks, c = threadIdx.x % kChunks;
  dst += c / 8 * ROWS * 64 + row * 64 + (c % 8 ^ row % 8) * 8;
  src += c * 8;
#pragma unroll
  for (int i = 0; i < ROWS / kRowsPerPass; ++i) {
    const int r = row + i * kRowsPerPass;
    const bool ok = r < n_valid;
    cp_async16(dst + i * kRowsPerPass * 64, ok ? src + r * stride : base, ok);
  }
}

// Two-warpgroup CTAs: 128-key steps take one CTA an SM (see Tiles<D, 3> for registers); 64-key
// steps are held to two (128 registers), so that one CTA's barrier and softmax can overlap the
// other's wgmmas. One-warpgroup CTAs take two an SM at any step, with registers to spare.
//
// kOverlap (tile configuration 5), FlashAttention-3's intra-warpgroup pipelining: step nb issues
// S of key block nb + 1, then o += P V of block nb, and runs block nb + 1's softmax while that P V
// is on the tensor cores. Without it, the tensor cores of a warpgroup idle through every softmax.
// K is needed a step ahead of V, so a step loads V nb + 1 and K nb + 2 (the prologue K 0, then
// V 0 and K 1), each in a two-stage ring of its own. Both wgmma groups are waited for within the
// step: nothing in flight crosses the loop's back-edge.
//
// kGroups: warpgroups a CTA, 64 queries each. Two (3 to 5) load each K / V tile for 128 queries
// but meet at a barrier every step; one (6) runs two CTAs an SM that drift apart, so one's softmax
// can run under the other's wgmmas (what FlashAttention-3's ping-pong schedules with named
// barriers), at twice the K / V loads.
template <typename T, int D, int kBlockN, bool kOverlap, int kGroups>
__global__ void __launch_bounds__(128 * kGroups,
                                  kGroups == 1 || (kBlockN == 64 && !kOverlap) ? 2 : 1)
    attn_fwd_wgmma_kernel(const AttnParams p) {
  static_assert(kGroups == 1 || kGroups == 2, "one or two warpgroups a CTA");
  constexpr int kBlockM = 64 * kGroups, kThreads = 128 * kGroups, NT = kBlockN / 8;
  constexpr int KN = kBlockN / 16;
  constexpr int kTileKV = kBlockN * D;  // elements
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023));
  T* sK = sQ + kBlockM * D;    // two stages
  T* sV = sK + 2 * kTileKV;    // two stages

  const int64_t b = blockIdx.z, h = blockIdx.y;
  const SeqInfo s = seq_info(p, b);
  const int64_t m0 = int64_t(p.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x) * kBlockM;
  if (m0 >= s.q_len) return;
  const int64_t hk = h / (p.heads_q / p.heads_k);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float scale_log2 = fwd_scale_log2(p.scale);
  const int n_blocks = key_blocks<kBlockM, kBlockN>(p.causal, m0, s);

  const T* k_base = static_cast<const T*>(p.k.ptr);
  const T* v_base = static_cast<const T*>(p.v.ptr);
  const T* k_seq = row_ptr<T>(p.k, b, s.k_start, hk);
  const T* v_seq = row_ptr<T>(p.v, b, s.k_start, hk);
  auto load_k = [&](int nb, int stage) {
    const int64_t n0 = int64_t(nb) * kBlockN;
    load_tile_sw<T, D, kBlockN, kThreads>(sK + stage * kTileKV, k_seq + n0 * p.k.stride_s,
                                          p.k.stride_s, s.k_len - n0, k_base);
  };
  auto load_v = [&](int nb, int stage) {
    const int64_t n0 = int64_t(nb) * kBlockN;
    load_tile_sw<T, D, kBlockN, kThreads>(sV + stage * kTileKV, v_seq + n0 * p.v.stride_s,
                                          p.v.stride_s, s.k_len - n0, v_base);
  };
  // Copy groups, in order: Q; K 0 and V 0 (kOverlap: K 0; then V 0 and K 1).
  load_tile_sw<T, D, kBlockM, kThreads>(sQ, row_ptr<T>(p.q, b, s.q_start + m0, h), p.q.stride_s,
                                        s.q_len - m0, static_cast<const T*>(p.q.ptr));
  cp_async_commit();
  if (n_blocks > 0) load_k(0, 0);
  if (!kOverlap && n_blocks > 0) load_v(0, 0);
  cp_async_commit();
  if constexpr (kOverlap) {
    if (n_blocks > 0) load_v(0, 0);
    if (n_blocks > 1) load_k(1, 1);
    cp_async_commit();
  }
  if (p.scale < 0.f) {  // negate Q (every element's sign bit), as attn_fwd_kernel does
    cp_async_wait<kOverlap ? 2 : 1>();
    __syncthreads();
    for (int c = threadIdx.x; c < kBlockM * D / 8; c += kThreads) {
      negate8(reinterpret_cast<uint4*>(sQ)[c]);
    }
  }

  // This warpgroup's 64 rows of Q; K and V of stage 0 (stage 1 is kTileKV elements on).
  const uint64_t q_desc = sw128_desc(sQ + warp / 4 * 64 * 64, 16, 1024);
  const uint64_t k_desc = sw128_desc(sK, 16, 1024);
  const uint64_t v_desc = sw128_desc(sV, kBlockN * 128, 1024);

  float o[1][D / 8][4] = {};
  float m_run[1][2] = {{-INFINITY, -INFINITY}}, l_run[1][2] = {{0.f, 0.f}};
  float sc[1][NT][4];  // S, then P in place
  uint32_t pa[KN][4];  // P as A fragments (read by the P V wgmmas until their wait)
  float alpha[1][2];   // the factor o's rows owe the last softmax
  // Issues S = Q K^T against the K tile of `stage` (D / 16 wgmmas, one commit); not waited for.
  auto issue_s = [&](int stage) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      // Columns 16 kk..: 64-column atom kk / 4 (a whole tile of 128-byte rows on), 32 bytes a step
      // within it.
      const uint32_t in_atom = kk % 4 * 32;
      const uint32_t k_off = (stage * kTileKV + kk / 4 * kBlockN * 64) * 2 + in_atom;
      wgmma_ss<T, kBlockN, 0, 0>(sc[0], desc_plus(q_desc, kk / 4 * kBlockM * 128 + in_atom),
                                 desc_plus(k_desc, k_off), kk > 0);
    }
    wgmma_commit();
  };
  // Key block nb's S (waited for) masked and turned into P; alpha for o.
  auto softmax_block = [&](int nb) {
    fence_regs(sc[0]);
    mask_block<16, kBlockN>(sc, -INFINITY, p.causal, m0 + warp * 16, int64_t(nb) * kBlockN, s,
                            lane);
    softmax_scores(sc, m_run, l_run, scale_log2, alpha);
  };
  auto pack_p = [&] {
#pragma unroll
    for (int kk = 0; kk < KN; ++kk) acc_to_a<T>(pa[kk], sc[0], kk);
  };
  // Issues o += P V against the V tile of `stage` (one commit): P from pa, o rescaled before.
  auto issue_pv = [&](int stage) {
    fence_regs(o[0]);  // the rescale of o, and P's packing, done before the fence
    fence_regs(pa);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KN; ++kk) {
      wgmma_rs<T, D>(o[0], pa[kk], desc_plus(v_desc, stage * kTileKV * 2 + kk * 16 * 128));
    }
    wgmma_commit();
  };

  if constexpr (!kOverlap) {
    for (int nb = 0; nb < n_blocks; ++nb) {
      const int stage = nb & 1;
      cp_async_wait<0>();
      fence_proxy_async();  // this thread's copies (and Q's sign flip), visible to wgmma
      __syncthreads();  // every warpgroup: this stage has landed, the other one is free
      if (nb + 1 < n_blocks) {
        load_k(nb + 1, stage ^ 1);
        load_v(nb + 1, stage ^ 1);
      }
      cp_async_commit();

      issue_s(stage);
      wgmma_wait<0>();
      softmax_block(nb);
      rescale_rows(o, alpha);
      pack_p();
      issue_pv(stage);
      // Waited for here, not at the next step's barrier: deferred, the next step's rescale of o
      // made ptxas serialize every wgmma of the kernel (C7515).
      wgmma_wait<0>();
      fence_regs(o[0]);
      fence_regs(pa);
    }
  } else {
    // A step starts with block nb's P packed into pa and o rescaled for it; sc is free for the S
    // of block nb + 1. o is rescaled for block nb + 1, and its P packed, after the P V's wait: the
    // softmax that yields the factor runs under that P V, which accumulates into o and reads pa.
    if (n_blocks > 0) {
      cp_async_wait<1>();  // Q and K 0
      fence_proxy_async();
      __syncthreads();
      issue_s(0);
      wgmma_wait<0>();
      softmax_block(0);  // o is still 0: nothing to rescale
      pack_p();
    }
    // Every step but the last has a next block; the last one's P V is issued after the loop. (With
    // the next S issued and waited for under a condition, ptxas could not tell which group the
    // wait retires and serialized every wgmma: C7514.)
    for (int nb = 0; nb + 1 < n_blocks; ++nb) {
      cp_async_wait<0>();  // V nb and K nb + 1
      fence_proxy_async();
      // Every warpgroup is past step nb - 1: K nb (its S was waited for there) and V nb - 1 are free.
      __syncthreads();
      load_v(nb + 1, (nb + 1) & 1);
      if (nb + 2 < n_blocks) load_k(nb + 2, nb & 1);
      cp_async_commit();
      issue_s((nb + 1) & 1);
      issue_pv(nb & 1);
      wgmma_wait<1>();  // the S (the older group); the P V runs on under the softmax
      softmax_block(nb + 1);
      // The softmax must stay above the P V's wait. fence_regs keeps nvcc from sinking it; ptxas
      // schedules within basic blocks and hoisted the wait to the top of the softmax's block (no
      // overlap left), so a branch it cannot fold ends that block here. It is never taken:
      // dispatch refuses heads_k <= 0.
      fence_regs(sc[0]);
      if (p.heads_k <= 0) __trap();
      wgmma_wait<0>();
      fence_regs(o[0]);
      fence_regs(pa);
      rescale_rows(o, alpha);
      pack_p();
    }
    if (n_blocks > 0) {
      cp_async_wait<0>();  // the last V
      fence_proxy_async();
      __syncthreads();
      issue_pv((n_blocks - 1) & 1);
      wgmma_wait<0>();
      fence_regs(o[0]);
      fence_regs(pa);
    }
  }
  cp_async_wait<0>();  // a CTA whose rows see no key never waited for its Q tile

  write_rows<T, D>(p, b, h, s, m0 + warp * 16, o, m_run, l_run, scale_log2, lane);
}

// The backward's dk/dv on wgmma (tile configurations 3 to 6), with the atomic dq (kAtomicDq) or
// without it (deterministic calls, whose dq attn_bwd_dq_kernel computes): attn_bwd_dkdv_kernel's
// algorithm with its five (four) matmuls on warpgroup MMAs. A CTA of kGroups warpgroups owns
// 64 kGroups keys (64 a warpgroup, 16 a warp, as there) and steps through query blocks of 64 rows
// (those of every query head of its GQA group):
//   S^T = K Q^T, dP^T = V dO^T  wgmma_ss, both K-major (keys x D by queries x D);
//   dV += P^T dO, dK += dS^T Q  wgmma_rs: P^T and dS^T from registers (acc_to_a), dO and Q MN-major
//                               (queries x D: the V of the forward's P V);
//   dQ += dS K                  wgmma_ss, both MN-major: dS^T through shared memory (sdS: the
//                               CTA's keys x 64 queries, swizzled like the other tiles) and K as
//                               stored. Each warpgroup computes a 64-query slab and adds it into
//                               dq_accum with float2 atomics: two warpgroups at D = 128 take half
//                               the columns each over all 128 keys; otherwise a warpgroup takes
//                               every column over its own 64 keys.
// Tiles and descriptors as in attn_fwd_wgmma_kernel.
//
// kGroups = 2 (tile configurations 3 and 5): each Q / dO tile loaded serves 128 keys, but the two
// warpgroups meet at two barriers a step, so their softmax phases coincide and the tensor cores
// idle through both. kGroups = 1 (4 and 6): a CTA is one warpgroup and two CTAs share an SM
// (255 / 205 registers at D = 128 / 64, no spills, fit twice in the register file), so that one's
// softmax, dS stores and atomics can run under the other's wgmmas; Q and dO are loaded twice as
// often.
template <typename T, int D, int kGroups, bool kAtomicDq>
__global__ void __launch_bounds__(128 * kGroups, 3 - kGroups)
    attn_bwd_dkdv_wgmma_kernel(const AttnParams p) {
  static_assert(kGroups == 1 || kGroups == 2, "one or two warpgroups a CTA");
  constexpr int kBlockN = 64 * kGroups, kBlockM = 64, kThreads = 128 * kGroups;
  constexpr int MT = kBlockM / 8, KM = kBlockM / 16;
  constexpr int kTileQ = kBlockM * D;  // elements of a Q or dO stage
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023));
  T* sV = sK + kBlockN * D;
  T* sQ = sV + kBlockN * D;    // two stages
  T* sdO = sQ + 2 * kTileQ;    // two stages
  T* sdS = sdO + 2 * kTileQ;   // [kBlockN keys][64 queries]
  float* sLse = reinterpret_cast<float*>(sdS + kBlockN * 64);  // two stages
  float* sDelta = sLse + 2 * kBlockM;                           // two stages

  const int64_t b = blockIdx.z, hk = blockIdx.y;
  const SeqInfo s = seq_info(p, b);
  const int64_t n0 = int64_t(blockIdx.x) * kBlockN;
  if (n0 >= s.k_len) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
  const int wg = warp / 4;
  const float scale_log2 = p.scale * kLog2e;
  QueryWalk<kBlockM> walk(p, s, n0, hk);

  const T* q_base = static_cast<const T*>(p.q.ptr);
  const T* do_base = static_cast<const T*>(p.dout.ptr);
  auto load_q = [&](int64_t h, int64_t i0, int stage) {
    load_tile_sw<T, D, kBlockM, kThreads>(sQ + stage * kTileQ,
                                          row_ptr<T>(p.q, b, s.q_start + i0, h), p.q.stride_s,
                                          s.q_len - i0, q_base);
    load_tile_sw<T, D, kBlockM, kThreads>(sdO + stage * kTileQ,
                                          row_ptr<T>(p.dout, b, s.q_start + i0, h),
                                          p.dout.stride_s, s.q_len - i0, do_base);
    load_lse_delta<kBlockM>(p, b, h, s, i0, sLse + stage * kBlockM, sDelta + stage * kBlockM);
  };
  load_tile_sw<T, D, kBlockN, kThreads>(sK, row_ptr<T>(p.k, b, s.k_start + n0, hk), p.k.stride_s,
                                        s.k_len - n0, static_cast<const T*>(p.k.ptr));
  load_tile_sw<T, D, kBlockN, kThreads>(sV, row_ptr<T>(p.v, b, s.k_start + n0, hk), p.v.stride_s,
                                        s.k_len - n0, static_cast<const T*>(p.v.ptr));
  if (walk.iters > 0) load_q(walk.h, walk.i0, 0);
  cp_async_commit();

  // S^T and dP^T: this warpgroup's 64 keys of K and V (A), stage 0 of Q and dO (B), K-major.
  const uint64_t k_desc = sw128_desc(sK + wg * 64 * 64, 16, 1024);
  const uint64_t v_desc = sw128_desc(sV + wg * 64 * 64, 16, 1024);
  const uint64_t q_desc = sw128_desc(sQ, 16, 1024);
  const uint64_t do_desc = sw128_desc(sdO, 16, 1024);
  // dK and dV: Q and dO (B) MN-major, 64-column atoms kBlockM rows apart.
  const uint64_t q_mn_desc = sw128_desc(sQ, kBlockM * 128, 1024);
  const uint64_t do_mn_desc = sw128_desc(sdO, kBlockM * 128, 1024);
  // dQ, in kDqPasses passes of 64 columns: keys [dq_k0, + kDqKeys) of dS (A) and of K's columns
  // [dq_c0, + 64) (B, the next pass one 64-column atom on), both MN-major (one atom each: LBO
  // unused). One warpgroup at D = 128 takes its 128 columns in two passes: as one N = 128 wgmma
  // its accumulators spill.
  constexpr bool kSplitCols = kGroups == 2 && D == 128;
  constexpr int kDqKeys = kSplitCols ? kBlockN : 64, kDqPasses = kSplitCols ? 1 : D / 64;
  const int dq_c0 = kSplitCols ? 64 * wg : 0, dq_k0 = kSplitCols ? 0 : 64 * wg;
  const uint64_t ds_desc = sw128_desc(sdS + dq_k0 * 64, kBlockN * 128, 1024);
  const uint64_t kt_desc =
      sw128_desc(sK + dq_c0 / 64 * kBlockN * 64 + dq_k0 * 64, kBlockN * 128, 1024);

  float dk[D / 8][4] = {}, dv[D / 8][4] = {};
  for (int64_t it = 0; it < walk.iters; ++it, walk.step()) {
    const int stage = it & 1;
    const int64_t h = walk.h, i0 = walk.i0;
    cp_async_wait<0>();
    lse_to_log2<kBlockM>(sLse + stage * kBlockM, i0, s.q_len);
    fence_proxy_async();  // this thread's copies, visible to wgmma
    // This stage has landed; every warpgroup is done with the other one and with sdS.
    __syncthreads();
    if (it + 1 < walk.iters) load_q(walk.next_h(), walk.next_i0(), stage ^ 1);
    cp_async_commit();
    const float* sL = sLse + stage * kBlockM;
    const float* sD = sDelta + stage * kBlockM;

    float pt[MT][4], dst[MT][4];  // P^T, and dP^T then dS^T: rows = keys, columns = queries
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t in_atom = kk % 4 * 32;
      const uint32_t kv_off = kk / 4 * kBlockN * 128 + in_atom;
      const uint32_t q_off = (stage * kTileQ + kk / 4 * kBlockM * 64) * 2 + in_atom;
      wgmma_ss<T, kBlockM, 0, 0>(pt, desc_plus(k_desc, kv_off), desc_plus(q_desc, q_off), kk > 0);
      wgmma_ss<T, kBlockM, 0, 0>(dst, desc_plus(v_desc, kv_off), desc_plus(do_desc, q_off),
                                 kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(pt);
    fence_regs(dst);

    pt_from_st<kBlockM, kBlockN>(pt, sL, scale_log2, p.causal, n0, warp, i0, s, lane);
    ds_from_dp(dst, pt, sD, lane);
    // dS^T into sdS (the dQ wgmma's A): key row 16 warp + g (+ 8), queries 8 mt + 2 tq.. in
    // 16-byte chunk mt, swizzled.
    if constexpr (kAtomicDq) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int key = warp * 16 + g + hh * 8;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          *reinterpret_cast<uint32_t*>(sdS + key * 64 + (mt ^ key % 8) * 8 + 2 * tq) =
              pack2<T>(dst[mt][2 * hh], dst[mt][2 * hh + 1]);
        }
      }
    }
    uint32_t pa[KM][4], dsa[KM][4];  // P^T and dS^T as A fragments (read until the wait below)
#pragma unroll
    for (int kk = 0; kk < KM; ++kk) {
      acc_to_a<T>(pa[kk], pt, kk);
      acc_to_a<T>(dsa[kk], dst, kk);
    }
    fence_regs(pa);
    fence_regs(dsa);
    fence_regs(dv);
    fence_regs(dk);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KM; ++kk) {
      const uint32_t off = stage * kTileQ * 2 + kk * 16 * 128;
      wgmma_rs<T, D>(dv, pa[kk], desc_plus(do_mn_desc, off));
      wgmma_rs<T, D>(dk, dsa[kk], desc_plus(q_mn_desc, off));
    }
    wgmma_commit();
    if constexpr (!kAtomicDq) {
      wgmma_wait<0>();  // dV and dK
      fence_regs(dv);
      fence_regs(dk);
      fence_regs(pa);
      fence_regs(dsa);
      continue;
    }
    fence_proxy_async();  // this thread's dS^T stores, visible to wgmma
    __syncthreads();      // sdS holds every warpgroup's keys

    float dq[8][4];
#pragma unroll
    for (int pass = 0; pass < kDqPasses; ++pass) {
      if (pass > 0) fence_regs(dq);  // the last pass's atomics read dq before this pass writes it
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kDqKeys / 16; ++kk) {
        const uint32_t off = kk * 16 * 128;  // 16 keys a step
        wgmma_ss<T, 64, 1, 1>(dq, desc_plus(ds_desc, off),
                              desc_plus(kt_desc, pass * kBlockN * 128 + off), kk > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();  // dQ (the first pass: dV and dK too)
      fence_regs(dq);
      if (pass == 0) {
        fence_regs(dv);
        fence_regs(dk);
        fence_regs(pa);
        fence_regs(dsa);
      }
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {  // this warp's 16 query rows of the slab
        const int64_t row = i0 + warp % 4 * 16 + g + hh * 8;
        if (row >= s.q_len) continue;
        float* acc =
            row_ptr_mut<float>(p.dq_accum, b, s.q_start + row, h) + dq_c0 + 64 * pass + 2 * tq;
#pragma unroll
        for (int dt = 0; dt < 8; ++dt) {
          atomic_add2(acc + dt * 8, dq[dt][2 * hh], dq[dt][2 * hh + 1]);
        }
      }
    }
  }
  cp_async_wait<0>();  // no query saw this key block: the K/V copies were never waited for

  const float one[2] = {1.f, 1.f}, scale[2] = {p.scale, p.scale};
  store_rows<T, D>(p.dv, b, s.k_start, n0 + warp * 16, s.k_len, hk, dv, one, lane);
  store_rows<T, D>(p.dk, b, s.k_start, n0 + warp * 16, s.k_len, hk, dk, scale, lane);
}

// delta = rowsum(dout * out) - dlse for every query row; one warp per row.
template <typename T>
__global__ void attn_bwd_delta_kernel(const AttnParams p) {
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const SeqInfo s = seq_info(p, b);
  if (row >= s.q_len) return;
  const T* o = row_ptr<T>(p.out, b, s.q_start + row, h);
  const T* d = row_ptr<T>(p.dout, b, s.q_start + row, h);
  float acc = 0.f;
  for (int c = lane; c < p.head_dim; c += 32) acc += to_float(o[c]) * to_float(d[c]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) {
    const int64_t idx = b * p.lse_stride_b + h * p.lse_stride_h + s.q_start + row;
    p.delta[idx] = acc - (p.dlse != nullptr ? p.dlse[idx] : 0.f);
  }
}

// One CTA per (block of 16 * kWarps keys, kv head, sequence); warp w owns keys 16w..16w+15 and
// accumulates their dK and dV over the query blocks (kBlockM rows) of every query head of the
// group. Works on transposed tiles: S^T = K Q^T, dP^T = V dO^T (keys are the MMA rows).
// kAtomicDq: also adds this key block's share of dQ, dS K, into p.dq_accum. dS^T goes through
// shared memory (sdS, kBlockN x kBlockM, pitch kBlockM + 8) because a dQ row sums over all the
// CTA's keys, which four warps hold; warp w then computes query rows 16 * (w % kRowTiles) and head-
// dim columns [kDW * (w / kRowTiles), + kDW).
template <typename T, int D, int kWarps, int kBlockM, bool kAtomicDq>
__global__ void __launch_bounds__(kWarps * 32) attn_bwd_dkdv_kernel(const AttnParams p) {
  constexpr int kBlockN = 16 * kWarps, kPitch = D + 8, kThreads = 32 * kWarps, MT = kBlockM / 8;
  constexpr int kPitchS = kBlockM + 8, kRowTiles = kBlockM / 16;
  constexpr int kDW = D * kRowTiles / kWarps;  // dQ columns per warp
  static_assert(!kAtomicDq || (kWarps % kRowTiles == 0 && kDW % 16 == 0),
                "the dQ slab of a warp must be 16 rows by a multiple of 16 columns");
  extern __shared__ __align__(16) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kBlockN * kPitch;
  T* sQ = sV + kBlockN * kPitch;                                       // two stages
  T* sdO = sQ + 2 * kBlockM * kPitch;                                  // two stages
  float* sLse = reinterpret_cast<float*>(sdO + 2 * kBlockM * kPitch);  // two stages (see the loop)
  float* sDelta = sLse + 2 * kBlockM;                                  // two stages
  T* sdS = reinterpret_cast<T*>(sDelta + 2 * kBlockM);                 // kAtomicDq only

  const int64_t b = blockIdx.z, hk = blockIdx.y;
  const SeqInfo s = seq_info(p, b);
  const int64_t n0 = int64_t(blockIdx.x) * kBlockN;
  if (n0 >= s.k_len) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
  const float scale_log2 = p.scale * kLog2e;
  static_assert(kBlockM <= kThreads, "a thread per query row loads its lse and delta");
  QueryWalk<kBlockM> walk(p, s, n0, hk);

  const T* q_base = static_cast<const T*>(p.q.ptr);
  const T* do_base = static_cast<const T*>(p.dout.ptr);
  auto load_q = [&](int64_t h, int64_t i0, int stage) {
    load_tile<T, D, kBlockM, kThreads>(sQ + stage * kBlockM * kPitch,
                                       row_ptr<T>(p.q, b, s.q_start + i0, h), p.q.stride_s,
                                       s.q_len - i0, q_base);
    load_tile<T, D, kBlockM, kThreads>(sdO + stage * kBlockM * kPitch,
                                       row_ptr<T>(p.dout, b, s.q_start + i0, h), p.dout.stride_s,
                                       s.q_len - i0, do_base);
    load_lse_delta<kBlockM>(p, b, h, s, i0, sLse + stage * kBlockM, sDelta + stage * kBlockM);
  };

  load_tile<T, D, kBlockN, kThreads>(sK, row_ptr<T>(p.k, b, s.k_start + n0, hk), p.k.stride_s,
                                     s.k_len - n0, static_cast<const T*>(p.k.ptr));
  load_tile<T, D, kBlockN, kThreads>(sV, row_ptr<T>(p.v, b, s.k_start + n0, hk), p.v.stride_s,
                                     s.k_len - n0, static_cast<const T*>(p.v.ptr));
  if (walk.iters > 0) load_q(walk.h, walk.i0, 0);
  cp_async_commit();

  float dk[D / 8][4] = {}, dv[D / 8][4] = {};
  const T* sKw = sK + warp * 16 * kPitch;
  const T* sVw = sV + warp * 16 * kPitch;

  for (int64_t it = 0; it < walk.iters; ++it, walk.step()) {
    const int stage = it & 1;
    const int64_t h = walk.h, i0 = walk.i0;
    if (it + 1 < walk.iters) {
      load_q(walk.next_h(), walk.next_i0(), stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    lse_to_log2<kBlockM>(sLse + stage * kBlockM, i0, s.q_len);
    __syncthreads();
    const T* sQs = sQ + stage * kBlockM * kPitch;
    const T* sdOs = sdO + stage * kBlockM * kPitch;
    const float* sL = sLse + stage * kBlockM;
    const float* sD = sDelta + stage * kBlockM;

    float pt[MT][4] = {};  // P^T: rows = this warp's 16 keys, cols = kBlockM queries
    gemm_abt<T, D, MT, kPitch>(pt, sKw, sQs, lane);
    pt_from_st<kBlockM, kBlockN>(pt, sL, scale_log2, p.causal, n0, warp, i0, s, lane);
    float dst[MT][4] = {};  // dP^T, then dS^T
    gemm_abt<T, D, MT, kPitch>(dst, sVw, sdOs, lane);
    ds_from_dp(dst, pt, sD, lane);
    gemm_pb<T, D, MT, kPitch>(dv, pt, sdOs, lane);
    gemm_pb<T, D, MT, kPitch>(dk, dst, sQs, lane);
    if constexpr (kAtomicDq) {
      T* sdSw = sdS + warp * 16 * kPitchS;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          *reinterpret_cast<uint32_t*>(sdSw + (g + hh * 8) * kPitchS + mt * 8 + 2 * tq) =
              pack2<T>(dst[mt][2 * hh], dst[mt][2 * hh + 1]);
        }
      }
    }
    // Every warp is done with this Q/dO stage before it is refilled (and, kAtomicDq, sdS is
    // complete: the next iteration's first barrier orders its rewrite after the reads below).
    __syncthreads();
    if constexpr (kAtomicDq) {
      const int rt = warp % kRowTiles, c0 = (warp / kRowTiles) * kDW;
      float dq[kDW / 8][4] = {};
      gemm_tb<T, kDW, kBlockN, kPitchS, kPitch>(dq, sdS + rt * 16, sK + c0, lane);
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int64_t row = i0 + rt * 16 + g + hh * 8;
        if (row >= s.q_len) continue;
        float* acc = row_ptr_mut<float>(p.dq_accum, b, s.q_start + row, h) + c0 + 2 * tq;
#pragma unroll
        for (int dt = 0; dt < kDW / 8; ++dt) {
          atomic_add2(acc + dt * 8, dq[dt][2 * hh], dq[dt][2 * hh + 1]);
        }
      }
    }
  }
  cp_async_wait<0>();  // no query saw this key block: the K/V copies were never waited for

  const float one[2] = {1.f, 1.f}, scale[2] = {p.scale, p.scale};
  store_rows<T, D>(p.dv, b, s.k_start, n0 + warp * 16, s.k_len, hk, dv, one, lane);
  store_rows<T, D>(p.dk, b, s.k_start, n0 + warp * 16, s.k_len, hk, dk, scale, lane);
}

// One CTA per (block of 16 * kWarps queries, query head, sequence); loops over the key blocks its
// queries see and accumulates dQ = sum dS K.
template <typename T, int D, int kWarps, int kMW, int kBlockN>
__global__ void __launch_bounds__(kWarps * 32) attn_bwd_dq_kernel(const AttnParams p) {
  constexpr int kRowsW = 16 * kMW, kBlockM = kRowsW * kWarps, kPitch = D + 8;
  constexpr int kThreads = 32 * kWarps, NT = kBlockN / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + kBlockM * kPitch;
  T* sK = sdO + kBlockM * kPitch;     // two stages
  T* sV = sK + 2 * kBlockN * kPitch;  // two stages

  const int64_t b = blockIdx.z, h = blockIdx.y;
  const SeqInfo s = seq_info(p, b);
  const int64_t m0 = int64_t(p.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x) * kBlockM;
  if (m0 >= s.q_len) return;
  const int64_t hk = h / (p.heads_q / p.heads_k);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4;
  const float scale_log2 = p.scale * kLog2e;

  const int n_blocks = key_blocks<kBlockM, kBlockN>(p.causal, m0, s);

  // This lane's rows (tile mw, half hh): lse in log2 units (+inf past the end or for rows that saw
  // no key, so P = 0 there) and delta.
  float row_lse[kMW][2], row_delta[kMW][2];
  const float* lse = static_cast<const float*>(p.lse);
#pragma unroll
  for (int r2 = 0; r2 < 2 * kMW; ++r2) {
    const int mw = r2 / 2, hh = r2 % 2;
    const int64_t row = m0 + warp * kRowsW + mw * 16 + g + hh * 8;
    row_lse[mw][hh] = INFINITY;
    row_delta[mw][hh] = 0.f;
    if (row < s.q_len) {
      const int64_t idx = b * p.lse_stride_b + h * p.lse_stride_h + s.q_start + row;
      const float lv = lse[idx];
      row_lse[mw][hh] = lv == -INFINITY ? INFINITY : lv * kLog2e;
      row_delta[mw][hh] = p.delta[idx];
    }
  }

  const T* k_seq = row_ptr<T>(p.k, b, s.k_start, hk);
  const T* v_seq = row_ptr<T>(p.v, b, s.k_start, hk);
  auto load_kv = [&](int nb, int stage) {
    const int64_t n0 = int64_t(nb) * kBlockN;
    load_tile<T, D, kBlockN, kThreads>(sK + stage * kBlockN * kPitch, k_seq + n0 * p.k.stride_s,
                                       p.k.stride_s, s.k_len - n0, static_cast<const T*>(p.k.ptr));
    load_tile<T, D, kBlockN, kThreads>(sV + stage * kBlockN * kPitch, v_seq + n0 * p.v.stride_s,
                                       p.v.stride_s, s.k_len - n0, static_cast<const T*>(p.v.ptr));
  };
  load_tile<T, D, kBlockM, kThreads>(sQ, row_ptr<T>(p.q, b, s.q_start + m0, h), p.q.stride_s,
                                     s.q_len - m0, static_cast<const T*>(p.q.ptr));
  load_tile<T, D, kBlockM, kThreads>(sdO, row_ptr<T>(p.dout, b, s.q_start + m0, h), p.dout.stride_s,
                                     s.q_len - m0, static_cast<const T*>(p.dout.ptr));
  if (n_blocks > 0) load_kv(0, 0);
  cp_async_commit();

  float dq[kMW][D / 8][4] = {};
  const T* sQw = sQ + warp * kRowsW * kPitch;
  const T* sdOw = sdO + warp * kRowsW * kPitch;

  for (int nb = 0; nb < n_blocks; ++nb) {
    const int stage = nb & 1;
    if (nb + 1 < n_blocks) {
      load_kv(nb + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* sKs = sK + stage * kBlockN * kPitch;
    const T* sVs = sV + stage * kBlockN * kPitch;
    const int64_t n0 = int64_t(nb) * kBlockN;

    float pr[kMW][NT][4] = {};
    gemm_abt_mw<T, D, kMW, NT, kPitch>(pr, sQw, sKs, lane);
#pragma unroll
    for (int mw = 0; mw < kMW; ++mw) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          pr[mw][nt][r] = ex2_approx(pr[mw][nt][r] * scale_log2 - row_lse[mw][r / 2]);
        }
      }
    }
    // P = 0 for the keys a row does not see.
    mask_block<kRowsW, kBlockN>(pr, 0.f, p.causal, m0 + warp * kRowsW, n0, s, lane);
    float ds[kMW][NT][4] = {};  // dP = dO V^T, then dS
    gemm_abt_mw<T, D, kMW, NT, kPitch>(ds, sdOw, sVs, lane);
#pragma unroll
    for (int mw = 0; mw < kMW; ++mw) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          ds[mw][nt][r] = pr[mw][nt][r] * (ds[mw][nt][r] - row_delta[mw][r / 2]);
        }
      }
    }
    gemm_pb_mw<T, D, kMW, NT, kPitch>(dq, ds, sKs, lane);
    __syncthreads();
  }
  cp_async_wait<0>();  // rows that see no key: the Q/dO copies were never waited for

  const float scale[2] = {p.scale, p.scale};
#pragma unroll
  for (int mw = 0; mw < kMW; ++mw) {
    store_rows<T, D>(p.dq, b, s.q_start, m0 + warp * kRowsW + mw * 16, s.q_len, h, dq[mw], scale,
                     lane);
  }
}

// dq = scale * dq_accum, 8 elements (one 16-byte store) per thread over `rows` (B * Sq batched,
// Tq varlen) x heads_q x D.
template <typename T>
__global__ void attn_bwd_dq_convert_kernel(const AttnParams p, int64_t rows) {
  const int64_t chunks = p.head_dim / 8;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * p.heads_q * chunks) return;
  const int64_t c = i % chunks * 8, h = i / chunks % p.heads_q, r = i / chunks / p.heads_q;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t b = varlen ? 0 : r / p.seqlen_q, row = varlen ? r : r % p.seqlen_q;
  const float* a = row_ptr<float>(p.dq_accum, b, row, h) + c;
  const float4 lo = *reinterpret_cast<const float4*>(a);
  const float4 hi = *reinterpret_cast<const float4*>(a + 4);
  const float sc = p.scale;
  const uint4 out = {pack2<T>(lo.x * sc, lo.y * sc), pack2<T>(lo.z * sc, lo.w * sc),
                     pack2<T>(hi.x * sc, hi.y * sc), pack2<T>(hi.z * sc, hi.w * sc)};
  *reinterpret_cast<uint4*>(row_ptr_mut<T>(p.dq, b, row, h) + c) = out;
}

// ---- launchers

// The kernel is a template argument (not a function-pointer argument) for allow_dynamic_smem, which
// keeps limits per kernel: most kernels here have the same type, void(AttnParams).
template <auto kKernel, typename... Args>
cudaError_t launch(dim3 grid, int threads, size_t smem, const AttnParams& p, cudaStream_t stream,
                   Args... args) {
  // An empty grid is no work (and would fail with cudaErrorInvalidConfiguration).
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  const cudaError_t err = allow_dynamic_smem<kKernel>(smem);
  if (err != cudaSuccess) return err;
  kKernel<<<grid, threads, smem, stream>>>(p, args...);
  return cudaGetLastError();
}

unsigned blocks(int64_t n, int64_t per) { return static_cast<unsigned>((n + per - 1) / per); }

// Tile shapes per head dim and configuration (AttnParams::tiles). The forward runs kFwdWarps warps
// of kFwdMW 16-query tiles against kFwdBlockN keys per step; dk/dv (with the atomic path's share of
// dq) 16 * kDkdvWarps keys per CTA against kDkdvBlockM queries per step; the deterministic dq
// kernel kDqWarps warps of kDqMW 16-query tiles against kDqBlockN keys per step. Registers and
// spills per kernel (nvcc -Xptxas -v, sm_90a, bf16, D = 64 / 96 / 128) are noted for each.
// Only timings can rank them: `python -m fmcore.bench attention` times 1 and 2 beside 0.
template <int D, int kConfig>
struct Tiles;

// 0, the default: the largest tiles whose accumulators stay in registers (fwd 228 / 168 / 242
// registers; dk/dv 164 / 167 / 244, with the atomic dq 168 / 168 / 250; dq 226 / 125 / 168; two dq
// tiles per warp spill at D = 96 and 128).
template <int D>
struct Tiles<D, 0> {
  static constexpr int kFwdWgmmaN = 0;  // keys a step of the wgmma forward; 0: not used
  static constexpr int kFwdWgmmaGroups = 2;  // its warpgroups a CTA (64 queries each)
  static constexpr bool kFwdOverlap = false;  // the wgmma forward's softmax under its P V
  // dk/dv and the atomic dq on wgmma (attn_bwd_dkdv_wgmma_kernel) with this many warpgroups a
  // CTA; 0: not used
  static constexpr int kBwdWgmmaGroups = 0;
  static constexpr int kFwdWarps = 4, kFwdMW = 2, kFwdBlockN = D <= 64 ? 64 : 32;
  static constexpr int kDkdvWarps = 4, kDkdvBlockM = D <= 64 ? 64 : 32;
  static constexpr int kDqWarps = 4, kDqMW = D <= 64 ? 2 : 1, kDqBlockN = 32;
};

// 1, longer steps: twice the keys per forward and dq step and 64 queries per dk/dv step (half the
// barriers and loop trips; FlashAttention-2's 128 x 64 forward tile at D = 128), paid for with a
// few spilled registers in the forward at D = 128 (56 bytes).
template <int D>
struct Tiles<D, 1> {
  static constexpr int kFwdWgmmaN = 0, kFwdWgmmaGroups = 2;
  static constexpr bool kFwdOverlap = false;
  static constexpr int kBwdWgmmaGroups = 0;
  static constexpr int kFwdWarps = 4, kFwdMW = 2, kFwdBlockN = D <= 64 ? 128 : 64;
  static constexpr int kDkdvWarps = 4, kDkdvBlockM = 64;
  static constexpr int kDqWarps = 4, kDqMW = D <= 64 ? 2 : 1, kDqBlockN = 64;
};

// 2, eight warps: one 16-query tile per warp in the forward and dq (128 queries per CTA), 128 keys
// per dk/dv CTA (each Q/dO tile loaded once per 128 keys instead of 64). No spills (the forward at
// D = 96 is held to two CTAs an SM, see attn_fwd_kernel); the forward reads each K/V
// fragment from shared memory once per 16 queries instead of once per 32. (D = 96 dk/dv takes 64
// queries per step: a warp's dq slab must be a multiple of 16 columns.)
template <int D>
struct Tiles<D, 2> {
  static constexpr int kFwdWgmmaN = 0, kFwdWgmmaGroups = 2;
  static constexpr bool kFwdOverlap = false;
  static constexpr int kBwdWgmmaGroups = 0;
  static constexpr int kFwdWarps = 8, kFwdMW = 1, kFwdBlockN = 64;
  static constexpr int kDkdvWarps = 8, kDkdvBlockM = D == 128 ? 32 : 64;
  static constexpr int kDqWarps = 8, kDqMW = 1, kDqBlockN = 32;
};

// 3 and 4, Hopper: the forward on wgmma (attn_fwd_wgmma_kernel) against 128 (3) or 64 (4) keys a
// step, at D = 64 and 128 on sm_90 devices when sm_90a code is compiled in; anywhere else, and at
// D = 96, config 0's forward. Their backward runs dk/dv with the atomic dq on wgmma
// (attn_bwd_dkdv_wgmma_kernel: 3 with two warpgroups a CTA, 4 with one and two CTAs an SM; for
// deterministic calls without the dq, then config 0's dq kernel) under the same conditions, and
// config 0's otherwise. Forward registers (D = 64 / 128): 3 takes 187 / 202 (one CTA an SM); 4 is
// held to 128 for two CTAs an SM (112 / 128, spilling 80 bytes at 128).
template <int D>
struct Tiles<D, 3> : Tiles<D, 0> {
  static constexpr int kFwdWgmmaN = D == 96 ? 0 : 128;
  static constexpr int kBwdWgmmaGroups = D == 96 ? 0 : 2;
};
template <int D>
struct Tiles<D, 4> : Tiles<D, 0> {
  static constexpr int kFwdWgmmaN = D == 96 ? 0 : 64;
  static constexpr int kBwdWgmmaGroups = D == 96 ? 0 : 1;
};

// 5, Hopper: configuration 3 with the forward's softmax overlapping its P V (attn_fwd_wgmma_kernel's
// kOverlap): 162 / 196 registers at D = 64 / 128, no spills, one CTA an SM.
template <int D>
struct Tiles<D, 5> : Tiles<D, 3> {
  static constexpr bool kFwdOverlap = D != 96;
};

// 6, Hopper: one warpgroup a CTA, two CTAs an SM, forward and backward: 5's overlapped forward on
// 64 queries against 128 keys a step (D = 64) or 64 (D = 128, so that two CTAs' K / V rings fit
// in shared memory), and 4's backward.
template <int D>
struct Tiles<D, 6> : Tiles<D, 5> {
  static constexpr int kFwdWgmmaN = D == 96 ? 0 : D == 64 ? 128 : 64;
  static constexpr int kFwdWgmmaGroups = D == 96 ? 2 : 1;
  static constexpr int kBwdWgmmaGroups = Tiles<D, 4>::kBwdWgmmaGroups;
};

// Whether the wgmma forward can run here: its sm_90a code compiled in and a 9.x device current.
bool wgmma_device() {
#if defined(FMCORE_SM90A)
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return major == 9;
#else
  return false;
#endif
}

template <typename T, int D, int kConfig>
cudaError_t fwd(const AttnParams& p, cudaStream_t stream) {
  using C = Tiles<D, kConfig>;
  static_assert(C::kFwdWgmmaN > 0 || (!C::kFwdOverlap && C::kFwdWgmmaGroups == 2),
                "the overlap and one-warpgroup CTAs are the wgmma forward's options");
  if constexpr (C::kFwdWgmmaN > 0) {
    if (wgmma_device()) {
      // Two stages of K and V, one Q tile, and room to align them to 1024 bytes.
      constexpr int kGroups = C::kFwdWgmmaGroups, kQueries = 64 * kGroups;
      const size_t smem = size_t(kQueries + 4 * C::kFwdWgmmaN) * D * sizeof(T) + 1024;
      const dim3 grid(blocks(p.seqlen_q, kQueries), static_cast<unsigned>(p.heads_q),
                      static_cast<unsigned>(p.batch));
      return launch<attn_fwd_wgmma_kernel<T, D, C::kFwdWgmmaN, C::kFwdOverlap, kGroups>>(
          grid, 128 * kGroups, smem, p, stream);
    }
  }
  constexpr int kBlockM = 16 * C::kFwdMW * C::kFwdWarps;
  const size_t smem = size_t(kBlockM + 4 * C::kFwdBlockN) * (D + 8) * sizeof(T);
  const dim3 grid(blocks(p.seqlen_q, kBlockM), static_cast<unsigned>(p.heads_q),
                  static_cast<unsigned>(p.batch));
  return launch<attn_fwd_kernel<T, D, C::kFwdWarps, C::kFwdMW, C::kFwdBlockN>>(
      grid, 32 * C::kFwdWarps, smem, p, stream);
}

template <typename T, int D, int kConfig>
cudaError_t bwd(const AttnParams& p, cudaStream_t stream) {
  using C = Tiles<D, kConfig>;
  const dim3 dgrid(blocks(p.seqlen_q, 8), static_cast<unsigned>(p.heads_q),
                   static_cast<unsigned>(p.batch));
  cudaError_t err = launch<attn_bwd_delta_kernel<T>>(dgrid, 256, 0, p, stream);
  if (err != cudaSuccess) return err;

  const int64_t rows = p.cu_seqlens_q != nullptr ? p.total_q : p.batch * p.seqlen_q;
  const dim3 cgrid(blocks(rows * p.heads_q * (D / 8), 256));
  // The deterministic dq: its own kernel, after dk/dv (which then adds nothing to dq).
  const auto dq_kernel = [&] {
    constexpr int kBlockM = 16 * C::kDqMW * C::kDqWarps;
    const size_t q_smem = size_t(2 * kBlockM + 4 * C::kDqBlockN) * (D + 8) * sizeof(T);
    const dim3 q_grid(blocks(p.seqlen_q, kBlockM), static_cast<unsigned>(p.heads_q),
                      static_cast<unsigned>(p.batch));
    return launch<attn_bwd_dq_kernel<T, D, C::kDqWarps, C::kDqMW, C::kDqBlockN>>(
        q_grid, 32 * C::kDqWarps, q_smem, p, stream);
  };
  const bool atomic_dq = p.dq_accum.ptr != nullptr;
  if constexpr (C::kBwdWgmmaGroups > 0) {
    if (wgmma_device()) {
      constexpr int kGroups = C::kBwdWgmmaGroups, kKeys = 64 * kGroups;
      // K, V, two stages of Q and dO, dS^T, two of lse and delta, and the 1024-byte alignment.
      const size_t smem = size_t(2 * kKeys + 4 * 64 + kKeys * 64 / D) * D * sizeof(T) +
                          4 * 64 * sizeof(float) + 1024;
      const dim3 grid(blocks(p.seqlen_k, kKeys), static_cast<unsigned>(p.heads_k),
                      static_cast<unsigned>(p.batch));
      err = atomic_dq
                ? launch<attn_bwd_dkdv_wgmma_kernel<T, D, kGroups, true>>(grid, 128 * kGroups,
                                                                           smem, p, stream)
                : launch<attn_bwd_dkdv_wgmma_kernel<T, D, kGroups, false>>(grid, 128 * kGroups,
                                                                            smem, p, stream);
      if (err != cudaSuccess) return err;
      return atomic_dq ? launch<attn_bwd_dq_convert_kernel<T>>(cgrid, 256, 0, p, stream, rows)
                       : dq_kernel();
    }
  }

  constexpr int kBlockN = 16 * C::kDkdvWarps, kBlockMq = C::kDkdvBlockM;
  const size_t kv_smem =
      size_t(2 * kBlockN + 4 * kBlockMq) * (D + 8) * sizeof(T) + 4 * kBlockMq * sizeof(float);
  const dim3 kv_grid(blocks(p.seqlen_k, kBlockN), static_cast<unsigned>(p.heads_k),
                     static_cast<unsigned>(p.batch));
  if (atomic_dq) {
    const size_t ds_smem = size_t(kBlockN) * (kBlockMq + 8) * sizeof(T);
    err = launch<attn_bwd_dkdv_kernel<T, D, C::kDkdvWarps, kBlockMq, true>>(
        kv_grid, 32 * C::kDkdvWarps, kv_smem + ds_smem, p, stream);
    if (err != cudaSuccess) return err;
    return launch<attn_bwd_dq_convert_kernel<T>>(cgrid, 256, 0, p, stream, rows);
  }
  err = launch<attn_bwd_dkdv_kernel<T, D, C::kDkdvWarps, kBlockMq, false>>(
      kv_grid, 32 * C::kDkdvWarps, kv_smem, p, stream);
  if (err != cudaSuccess) return err;
  return dq_kernel();
}

template <template <typename, int, int> class Fn, typename T, int D>
cudaError_t with_tiles(const AttnParams& p, cudaStream_t stream) {
  static_assert(kAttnTileConfigs == 7, "one case per configuration");
  switch (p.tiles) {
    case 0:
      return Fn<T, D, 0>::run(p, stream);
    case 1:
      return Fn<T, D, 1>::run(p, stream);
    case 2:
      return Fn<T, D, 2>::run(p, stream);
    case 3:
      return Fn<T, D, 3>::run(p, stream);
    case 4:
      return Fn<T, D, 4>::run(p, stream);
    case 5:
      return Fn<T, D, 5>::run(p, stream);
    case 6:
      return Fn<T, D, 6>::run(p, stream);
  }
  return cudaErrorInvalidValue;
}

template <template <typename, int, int> class Fn>
cudaError_t dispatch(const AttnParams& p, cudaStream_t stream) {
  // The binding guarantees these; anything else is refused rather than run out of bounds.
  if (p.heads_k <= 0 || p.heads_q % p.heads_k != 0 || p.heads_q > 65535 || p.heads_k > 65535 ||
      p.batch > 65535) {
    return cudaErrorInvalidValue;
  }
  // Empty grids are skipped launch by launch, so that every non-empty output is still written: dk/dv
  // of an Sq = 0 or Hq = 0 call (k/v may have Hk > 0 heads while q has none) are zeros from the
  // dk/dv kernel. Skipping the whole call when Hq == 0 left them unwritten.
  if (p.batch == 0) return cudaSuccess;
  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16) return cudaErrorInvalidValue;
  switch (p.head_dim) {
    case 64:
      return bf16 ? with_tiles<Fn, __nv_bfloat16, 64>(p, stream)
                  : with_tiles<Fn, __half, 64>(p, stream);
    case 96:
      return bf16 ? with_tiles<Fn, __nv_bfloat16, 96>(p, stream)
                  : with_tiles<Fn, __half, 96>(p, stream);
    case 128:
      return bf16 ? with_tiles<Fn, __nv_bfloat16, 128>(p, stream)
                  : with_tiles<Fn, __half, 128>(p, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T, int D, int kConfig>
struct Fwd {
  static cudaError_t run(const AttnParams& p, cudaStream_t stream) {
    return fwd<T, D, kConfig>(p, stream);
  }
};
template <typename T, int D, int kConfig>
struct Bwd {
  static cudaError_t run(const AttnParams& p, cudaStream_t stream) {
    return bwd<T, D, kConfig>(p, stream);
  }
};

}  // namespace

cudaError_t attn_fwd(const AttnParams& p, cudaStream_t stream) { return dispatch<Fwd>(p, stream); }

cudaError_t attn_bwd(const AttnParams& p, cudaStream_t stream) { return dispatch<Bwd>(p, stream); }

}  // namespace fmcore
