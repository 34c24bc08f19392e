// Flash attention, part 4 of 4 (the overview is attention.cu's): the Hopper kernels on wgmma (tile
// configurations 3 to 6): the forward, and dk/dv with the atomic dq.
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

// ---- the forward
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

// This thread's warpgroup, as a value the compiler knows to be the same in every lane of a warp (a
// shuffle from lane 0; threadIdx.x / 128 is not one to it): the descriptors built from it then live
// in uniform registers, where wgmma reads them. From threadIdx.x / 128, the A descriptor of the
// forward's S was in ordinary registers, moved into uniform ones before every wgmma: 7 instructions
// each, ~60 of a step.
__device__ __forceinline__ int warpgroup_index() {
  return __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x / 128), 0);
}

// Copies rows [0, ROWS) of a (rows, D) slice into a swizzled [D / 64][ROWS][64] tile; rows >=
// n_valid are zero-filled and their addresses never formed (`base` stands in). Thread t copies
// chunk t % (D / 8) of rows t / (D / 8) + i * kRowsPerPass: its swizzled column is the same on
// every pass (kRowsPerPass is a multiple of 8). Only a tile that crosses the end of the sequence
// (n_valid < ROWS, the same for every thread) checks rows: the others step one pointer by a pass's
// rows, a 64-bit add a copy instead of a row check, a select and a 64-bit multiply (their SASS had
// ~10 instructions a copy; the loads of K and V took ~270 of the D = 128 forward's ~1090 a
// step).
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
  if (n_valid >= ROWS) {
    src += row * stride;
    const int64_t pass = kRowsPerPass * stride;
#pragma unroll
    for (int i = 0; i < ROWS / kRowsPerPass; ++i, src += pass) {
      cp_async16(dst + i * kRowsPerPass * 64, src, true);
    }
    return;
  }
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
  // (no windowed instantiation: attention.cu runs windowed calls on tile configuration 0)
  const KeyBlocks kb = key_blocks<false, kBlockM, kBlockN>(p, m0, s);  // nb0 + nb, nb < n_blocks
  const int nb0 = kb.first, n_blocks = kb.count;

  const T* k_base = static_cast<const T*>(p.k.ptr);
  const T* v_base = static_cast<const T*>(p.v.ptr);
  const T* k_seq = row_ptr<T>(p.k, b, s.k_start, hk);
  const T* v_seq = row_ptr<T>(p.v, b, s.k_start, hk);
  auto load_k = [&](int nb, int stage) {
    const int64_t n0 = int64_t(nb0 + nb) * kBlockN;
    load_tile_sw<T, D, kBlockN, kThreads>(sK + stage * kTileKV, k_seq + n0 * p.k.stride_s,
                                          p.k.stride_s, s.k_len - n0, k_base);
  };
  auto load_v = [&](int nb, int stage) {
    const int64_t n0 = int64_t(nb0 + nb) * kBlockN;
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
  const uint64_t q_desc = sw128_desc(sQ + warpgroup_index() * 64 * 64, 16, 1024);
  const uint64_t k_desc = sw128_desc(sK, 16, 1024);
  const uint64_t v_desc = sw128_desc(sV, kBlockN * 128, 1024);

  float o[1][D / 8][4] = {};
  float m_run[1][2] = {{-INFINITY, -INFINITY}}, l_run[1][2] = {{0.f, 0.f}};
  float sc[1][NT][4];  // S, then P in place
  uint32_t pa[KN][4];  // P as A fragments (read by the P V wgmmas until their wait)
  float alpha[1][2];   // the factor o's rows owe the last softmax, when it returned true
  // Issues S = Q K^T against the K tile of `stage` (D / 16 wgmmas, one commit); not waited for.
  auto issue_s = [&](int stage) {
    fence_regs(sc[0]);  // the last tile's softmax and P packing accessed sc: done before the fence
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
  // Key block nb's S (waited for) masked and turned into P; whether o needs rescaling by alpha.
  auto softmax_block = [&](int nb) -> bool {
    fence_regs(sc[0]);
    mask_block<false, 16, kBlockN>(sc, -INFINITY, p, m0 + warp * 16, int64_t(nb0 + nb) * kBlockN, s,
                            lane);
    return softmax_scores(sc, m_run, l_run, scale_log2, alpha);
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
      if (softmax_block(nb)) rescale_rows(o, alpha);
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
      const bool rescale = softmax_block(nb + 1);
      // The softmax must stay above the P V's wait. fence_regs keeps nvcc from sinking it; ptxas
      // schedules within basic blocks and hoisted the wait to the top of the softmax's block (no
      // overlap left), so a branch it cannot fold ends that block here. It is never taken:
      // dispatch refuses heads_k <= 0.
      fence_regs(sc[0]);
      if (p.heads_k <= 0) __trap();
      wgmma_wait<0>();
      fence_regs(o[0]);
      fence_regs(pa);
      if (rescale) rescale_rows(o, alpha);
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
// (247 / 204 registers at D = 128 / 64, no spills, fit twice in the register file), so that one's
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
  const int wg = warpgroup_index();
  const float scale_log2 = p.scale * kLog2e;
  QueryWalk<false, kBlockM> walk(p, s, n0, n0 + kBlockN < s.k_len ? n0 + kBlockN : s.k_len, hk);

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

    pt_from_st<false, kBlockM, kBlockN>(pt, sL, scale_log2, p, n0, warp, i0, s, lane);
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

    // Where this lane adds to dQ: its warp's query rows g and g + 8 of the slab (null past the
    // end), computed once for the passes below, each atomic at a constant offset from them.
    float* dq_rows[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int64_t row = i0 + warp % 4 * 16 + g + hh * 8;
      dq_rows[hh] = nullptr;
      if (row < s.q_len) {
        dq_rows[hh] = opaque(row_ptr_mut<float>(p.dq_accum, b, s.q_start + row, h));
        dq_rows[hh] += dq_c0 + 2 * tq;
      }
    }
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
      for (int hh = 0; hh < 2; ++hh) {
        if (dq_rows[hh] == nullptr) continue;
#pragma unroll
        for (int dt = 0; dt < 8; ++dt) {
          atomic_add2(dq_rows[hh] + 64 * pass + dt * 8, dq[dt][2 * hh], dq[dt][2 * hh + 1]);
        }
      }
    }
  }
  cp_async_wait<0>();  // no query saw this key block: the K/V copies were never waited for

  const float one[2] = {1.f, 1.f}, scale[2] = {p.scale, p.scale};
  store_rows<T, D>(p.dv, b, s.k_start, n0 + warp * 16, s.k_len, hk, dv, one, lane);
  store_rows<T, D>(p.dk, b, s.k_start, n0 + warp * 16, s.k_len, hk, dk, scale, lane);
}

}  // namespace
}  // namespace fmcore
