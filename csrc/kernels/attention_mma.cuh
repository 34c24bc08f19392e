// Flash attention, part 3 of 4 (the overview is attention.cu's): the FlashAttention-2 kernels on
// mma.sync (every tile configuration's default, and the backward's delta and dq conversion, which
// the wgmma backward shares).
#pragma once

#include <cmath>
#include <cstdint>

#include "attention.h"
#include "attention_fragments.cuh"
#include "attention_softmax.cuh"
#include "common.cuh"
#include "ptx.cuh"

namespace fmcore {
namespace {

// Each warp owns kMW 16-row tiles (kMW * 16 query rows). Eight-warp CTAs at D <= 96 fit two an SM
// in 128 registers a thread, which the bound holds ptxas to (left free it took 134 at D = 96, one
// CTA an SM; held, it spills 12 bytes). A minimum of 0 CTAs is no bound: nvcc then emits none, and
// ptxas allocates as it would without the second argument.
//
// kWindow: the instantiation for sliding windows (attention.cu launches it for windowed calls
// only), whose masks and block ranges read p.window_left / window_right; the others have none.
template <typename T, int D, int kWarps, int kMW, int kBlockN, bool kWindow>
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
  // key blocks nb0 + nb for nb in [0, n_blocks)
  const KeyBlocks kb = key_blocks<kWindow, kBlockM, kBlockN>(p, m0, s);
  const int nb0 = kb.first, n_blocks = kb.count;

  const T* q_base = static_cast<const T*>(p.q.ptr);
  const T* k_base = static_cast<const T*>(p.k.ptr);
  const T* v_base = static_cast<const T*>(p.v.ptr);
  const T* k_seq = row_ptr<T>(p.k, b, s.k_start, hk);
  const T* v_seq = row_ptr<T>(p.v, b, s.k_start, hk);
  auto load_kv = [&](int nb, int stage) {
    const int64_t n0 = int64_t(nb0 + nb) * kBlockN;
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

    const int64_t n0 = int64_t(nb0 + nb) * kBlockN;
    // -inf for the keys a row does not see (the scores become exponents).
    mask_block<kWindow, kRowsW, kBlockN>(sc, -INFINITY, p, m0 + warp * kRowsW, n0, s, lane);
    softmax_step(sc, o, m_run, l_run, scale_log2);

    gemm_pb_mw<T, D, kMW, NT, kPitch>(o, sc, sVs, lane);
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  cp_async_wait<0>();  // a CTA whose rows see no key never waited for its Q tile

  write_rows<T, D>(p, b, h, s, m0 + warp * kRowsW, o, m_run, l_run, scale_log2, lane);
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
// dim columns [kDW * (w / kRowTiles), + kDW). kWindow as in attn_fwd_kernel.
template <typename T, int D, int kWarps, int kBlockM, bool kAtomicDq, bool kWindow>
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
  QueryWalk<kWindow, kBlockM> walk(p, s, n0, n0 + kBlockN < s.k_len ? n0 + kBlockN : s.k_len, hk);

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
    pt_from_st<kWindow, kBlockM, kBlockN>(pt, sL, scale_log2, p, n0, warp, i0, s, lane);
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
// queries see and accumulates dQ = sum dS K. kWindow as in attn_fwd_kernel.
template <typename T, int D, int kWarps, int kMW, int kBlockN, bool kWindow>
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

  const KeyBlocks kb = key_blocks<kWindow, kBlockM, kBlockN>(p, m0, s);  // nb0 + nb, nb < n_blocks
  const int nb0 = kb.first, n_blocks = kb.count;

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
    const int64_t n0 = int64_t(nb0 + nb) * kBlockN;
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
    const int64_t n0 = int64_t(nb0 + nb) * kBlockN;

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
    mask_block<kWindow, kRowsW, kBlockN>(pr, 0.f, p, m0 + warp * kRowsW, n0, s, lane);
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

}  // namespace
}  // namespace fmcore
