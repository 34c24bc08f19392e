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
// Sliding windows (AttnParams::window_left / window_right) run separate instantiations of the
// mma.sync kernels (kWindow), of tile configuration 0 only, whatever p.tiles asks: every kernel
// gets the window in its per-row masks (a two-sided mask only in the blocks the window's start
// crosses) and in its block ranges: the forward and the dq kernel start at the key block of their
// first row's window start, the dk/dv kernel stops at the last query block that sees its keys, so
// blocks wholly outside every window of a CTA are never loaded. The unwindowed instantiations
// have no trace of the window (the same registers and instructions as before windows existed);
// windowed ones for the other configurations would double the kernels' compile time.
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
// Files, in the order they build on each other (this one is their one translation unit):
//  - attention_fragments.cuh: mma.sync fragments, the warp GEMMs, the padded tile loader;
//  - attention_softmax.cuh: masks, the online softmax and epilogue, the backward's P and dS;
//  - attention_mma.cuh: the kernels above on mma.sync, and the backward's delta and dq conversion;
//  - attention_wgmma.cuh: the Hopper forward and dk/dv on wgmma;
//  - here: the tile configurations and the launchers.
//
// Without a GPU: tests/cudasim runs these files on a CPU simulator (the hardware-dependent
// instructions, in ptx.cuh, swapped for models of them); scripts/sanitize_cpu.sh sim-tsan adds a
// shared-memory racecheck.
#include <cstdint>

#include "attention.h"
#include "attention_mma.cuh"
#include "attention_wgmma.cuh"
#include "common.cuh"

namespace fmcore {

namespace {

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
// spills per kernel (nvcc 13.0 -Xptxas -v, sm_90a, bf16, D = 64 / 96 / 128) are noted for each.
// Only timings can rank them: `python -m fmcore.bench attention` times 1 and 2 beside 0.
template <int D, int kConfig>
struct Tiles;

// 0, the default: the largest tiles whose accumulators stay in registers (fwd 229 / 167 / 228
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
// barriers and loop trips; FlashAttention-2's 128 x 64 forward tile at D = 128), at 255
// registers in the forward at D = 128 (no spills since the lazy rescale; 72 bytes before).
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
// config 0's otherwise. Forward registers (D = 64 / 128): 3 takes 150 / 167 (one CTA an SM); 4 is
// held to 128 for two CTAs an SM (96 / 128, spilling 36 bytes at 128).
// Each names all four wgmma fields, so that config 0's may change (to run the fastest of these
// on Hopper once measured) without changing them.
template <int D>
struct Tiles<D, 3> : Tiles<D, 0> {
  static constexpr int kFwdWgmmaN = D == 96 ? 0 : 128, kFwdWgmmaGroups = 2;
  static constexpr bool kFwdOverlap = false;
  static constexpr int kBwdWgmmaGroups = D == 96 ? 0 : 2;
};
template <int D>
struct Tiles<D, 4> : Tiles<D, 0> {
  static constexpr int kFwdWgmmaN = D == 96 ? 0 : 64, kFwdWgmmaGroups = 2;
  static constexpr bool kFwdOverlap = false;
  static constexpr int kBwdWgmmaGroups = D == 96 ? 0 : 1;
};

// 5, Hopper: configuration 3 with the forward's softmax overlapping its P V (attn_fwd_wgmma_kernel's
// kOverlap): 165 / 202 registers at D = 64 / 128, no spills, one CTA an SM.
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

// kWindow: the windowed kernels (kConfig 0 only, see the header).
template <typename T, int D, int kConfig, bool kWindow>
cudaError_t fwd(const AttnParams& p, cudaStream_t stream) {
  using C = Tiles<D, kConfig>;
  static_assert(C::kFwdWgmmaN > 0 || (!C::kFwdOverlap && C::kFwdWgmmaGroups == 2),
                "the overlap and one-warpgroup CTAs are the wgmma forward's options");
  static_assert(!kWindow || (C::kFwdWgmmaN == 0 && C::kBwdWgmmaGroups == 0),
                "the wgmma kernels have no windowed instantiation");
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
  return launch<attn_fwd_kernel<T, D, C::kFwdWarps, C::kFwdMW, C::kFwdBlockN, kWindow>>(
      grid, 32 * C::kFwdWarps, smem, p, stream);
}

template <typename T, int D, int kConfig, bool kWindow>
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
    return launch<attn_bwd_dq_kernel<T, D, C::kDqWarps, C::kDqMW, C::kDqBlockN, kWindow>>(
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
    err = launch<attn_bwd_dkdv_kernel<T, D, C::kDkdvWarps, kBlockMq, true, kWindow>>(
        kv_grid, 32 * C::kDkdvWarps, kv_smem + ds_smem, p, stream);
    if (err != cudaSuccess) return err;
    return launch<attn_bwd_dq_convert_kernel<T>>(cgrid, 256, 0, p, stream, rows);
  }
  err = launch<attn_bwd_dkdv_kernel<T, D, C::kDkdvWarps, kBlockMq, false, kWindow>>(
      kv_grid, 32 * C::kDkdvWarps, kv_smem, p, stream);
  if (err != cudaSuccess) return err;
  return dq_kernel();
}

template <template <typename, int, int, bool> class Fn, typename T, int D>
cudaError_t with_tiles(const AttnParams& p, cudaStream_t stream) {
  static_assert(kAttnTileConfigs == 7, "one case per configuration");
  // Windowed calls: configuration 0's windowed kernels, whatever the tiles (see the header).
  if (attn_windowed(p)) return Fn<T, D, 0, true>::run(p, stream);
  switch (p.tiles) {
    case 0:
      return Fn<T, D, 0, false>::run(p, stream);
    case 1:
      return Fn<T, D, 1, false>::run(p, stream);
    case 2:
      return Fn<T, D, 2, false>::run(p, stream);
    case 3:
      return Fn<T, D, 3, false>::run(p, stream);
    case 4:
      return Fn<T, D, 4, false>::run(p, stream);
    case 5:
      return Fn<T, D, 5, false>::run(p, stream);
    case 6:
      return Fn<T, D, 6, false>::run(p, stream);
  }
  return cudaErrorInvalidValue;
}

template <template <typename, int, int, bool> class Fn>
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

template <typename T, int D, int kConfig, bool kWindow>
struct Fwd {
  static cudaError_t run(const AttnParams& p, cudaStream_t stream) {
    return fwd<T, D, kConfig, kWindow>(p, stream);
  }
};
template <typename T, int D, int kConfig, bool kWindow>
struct Bwd {
  static cudaError_t run(const AttnParams& p, cudaStream_t stream) {
    return bwd<T, D, kConfig, kWindow>(p, stream);
  }
};

}  // namespace

cudaError_t attn_fwd(const AttnParams& p, cudaStream_t stream) { return dispatch<Fwd>(p, stream); }

cudaError_t attn_bwd(const AttnParams& p, cudaStream_t stream) { return dispatch<Bwd>(p, stream); }

}  // namespace fmcore
