// Flash attention: framework-free parameters, the sequence/mask arithmetic shared by the CPU
// reference and the CUDA kernels, and the CUDA launchers.
//
// Layouts. Batched: q (B, Sq, Hq, D), k/v (B, Sk, Hk, D). Varlen (packed documents): q (Tq, Hq, D),
// k/v (Tk, Hk, D) with int32 cumulative lengths cu_seqlens_q/k of B + 1 entries; sequence b owns
// rows [cu[b], cu[b+1]). Both are addressed as (batch, seq, head, dim) through element strides
// (stride_b = 0 for varlen, where the row offset comes from cu_seqlens), so slices of a fused qkv
// projection need no copy; only the last dim must be contiguous.
//
// lse (log-sum-exp of the scaled scores, natural log) is (B, Hq, Sq) batched and (Hq, Tq) varlen,
// contiguous in the sequence. Query head h reads kv head h / (Hq / Hk) (GQA/MQA).
//
// Causal masks are aligned to the bottom-right corner (FlashAttention 2.1+): query i of a sequence
// with lengths (Sq, Sk) sees keys j <= i + Sk - Sq. A query that sees no key (i < Sq - Sk, or
// Sk == 0) gets out = 0 and lse = -inf (log of an empty sum); its gradients are 0.
//
// Sliding windows (FlashAttention-2's window_size = (left, right)): query i sits at key position
// p = i + Sk - Sq and sees keys j with p - left <= j <= p + right. The binding keeps
// the right bound in `causal` (set for any right >= 0; causal=True is right = 0) and window_right,
// the left one in window_left (-1: unbounded), so that an unwindowed call's masks are the causal /
// full ones they were. Rows whose window holds no key are as the empty causal rows above.
#pragma once

#include <cstdint>

#include "dtype.h"

#if defined(__CUDACC__)
#define FMCORE_HD __host__ __device__ __forceinline__
#else
#define FMCORE_HD inline
#endif

namespace fmcore {

struct AttnTensor {
  void* ptr = nullptr;
  int64_t stride_b = 0, stride_s = 0, stride_h = 0;  // elements; the dim stride is 1
};

struct AttnParams {
  AttnTensor q, k, v;     // inputs (read only)
  AttnTensor out;         // forward: written; backward: read (for delta)
  AttnTensor dout;        // backward: gradient of out (read)
  AttnTensor dq, dk, dv;  // backward: written, every element
  // Backward, non-deterministic path when set: fp32 scratch of dq's shape, zero on entry, that the
  // dk/dv kernel adds its share of dq into with atomics (see attn_bwd).
  AttnTensor dq_accum;
  // fp32 (fp64 only in the CPU reference for fp64 inputs); layout above. Forward writes, backward
  // reads.
  void* lse = nullptr;
  int64_t lse_stride_b = 0, lse_stride_h = 0;  // the sequence stride is 1
  const float* dlse = nullptr;  // backward: optional gradient of lse (layout of lse); nullptr = 0
  float* delta = nullptr;       // backward scratch (layout of lse): rowsum(dout * out) - dlse
  const int32_t* cu_seqlens_q = nullptr;  // varlen when set (both set together), B + 1 entries
  const int32_t* cu_seqlens_k = nullptr;
  int64_t batch = 0, heads_q = 0, heads_k = 0, head_dim = 0;
  // batched: Sq, Sk; varlen: max_seqlen_q/k clamped to total_q/k (the grid extent)
  int64_t seqlen_q = 0, seqlen_k = 0;
  int64_t total_q = 0, total_k = 0;    // varlen: Tq, Tk; every cu_seqlens entry is clamped to them
  float scale = 1.f;                   // softmax scale (1/sqrt(D) by default)
  bool causal = false;       // keys past i + Sk - Sq + window_right are hidden from query i
  int64_t window_right = 0;  // >= 0; only read with causal
  int64_t window_left = -1;  // >= 0: keys before i + Sk - Sq - window_left are hidden too
  DType dtype = DType::kBFloat16;
  // The CUDA kernels' tile configuration, in [0, kAttnTileConfigs): 0 is the default, the others
  // the alternatives the attention benchmark times beside it (attention.cu's Tiles). The CPU
  // reference ignores it, and so do windowed calls (attn_windowed), which run configuration 0.
  int tiles = 0;
};

constexpr int kAttnTileConfigs = 7;

// Where sequence b lives: its first row in the packed tensors (0 for batched inputs) and its
// lengths.
struct SeqInfo {
  int64_t q_start, q_len, k_start, k_len;
};

// Clamps every cu_seqlens entry into [0, total] and lengths to >= 0, so that a malformed cu_seqlens
// can never make a kernel read or write out of bounds (the binding validates it separately).
FMCORE_HD SeqInfo seq_info(const AttnParams& p, int64_t b) {
  if (p.cu_seqlens_q == nullptr) return {0, p.seqlen_q, 0, p.seqlen_k};
  auto clamp = [](int64_t x, int64_t hi) { return x < 0 ? 0 : (x > hi ? hi : x); };
  const int64_t q0 = clamp(p.cu_seqlens_q[b], p.total_q);
  const int64_t q1 = clamp(p.cu_seqlens_q[b + 1], p.total_q);
  const int64_t k0 = clamp(p.cu_seqlens_k[b], p.total_k);
  const int64_t k1 = clamp(p.cu_seqlens_k[b + 1], p.total_k);
  return {q0, q1 > q0 ? q1 - q0 : 0, k0, k1 > k0 ? k1 - k0 : 0};
}

// Keys [key_begin(i), key_end(i)) are visible to query i (of a sequence with lengths q_len,
// k_len); none when key_begin(i) >= key_end(i). `right` is window_right, read only when causal;
// `left` window_left, -1 for none.
FMCORE_HD int64_t key_end(bool causal, int64_t right, int64_t i, int64_t q_len, int64_t k_len) {
  if (!causal) return k_len;
  const int64_t e = i + k_len - q_len + right + 1;
  return e < 0 ? 0 : (e > k_len ? k_len : e);
}
FMCORE_HD int64_t key_begin(int64_t left, int64_t i, int64_t q_len, int64_t k_len) {
  if (left < 0) return 0;
  const int64_t b = i + k_len - q_len - left;
  return b < 0 ? 0 : (b > k_len ? k_len : b);
}

// Queries [query_begin(j), query_end(j)) see key j; none when query_begin(j) >= query_end(j).
FMCORE_HD int64_t query_begin(bool causal, int64_t right, int64_t j, int64_t q_len,
                              int64_t k_len) {
  if (!causal) return 0;
  const int64_t b = j - (k_len - q_len) - right;
  return b < 0 ? 0 : b;
}
FMCORE_HD int64_t query_end(int64_t left, int64_t j, int64_t q_len, int64_t k_len) {
  if (left < 0) return q_len;
  const int64_t e = j - (k_len - q_len) + left + 1;
  return e < 0 ? 0 : (e > q_len ? q_len : e);
}

// Whether the call has a sliding window: a left bound, or a right one past the diagonal.
FMCORE_HD bool attn_windowed(const AttnParams& p) {
  return p.window_left >= 0 || (p.causal && p.window_right > 0);
}

#ifdef FMCORE_CUDA_API
// Head dims with a CUDA kernel; the binding checks before launching.
constexpr bool attn_cuda_supports_head_dim(int64_t d) { return d == 64 || d == 96 || d == 128; }

// Forward: writes out and lse. Needs bf16/fp16, a supported head dim, 16-byte aligned base pointers
// and strides that are multiples of 8 elements (the binding copies anything else).
cudaError_t attn_fwd(const AttnParams& p, cudaStream_t stream);
// Backward: writes delta, dq, dk, dv. dk/dv come from a kernel that owns a key block and loops over
// the query blocks of every query head of its GQA group. dq:
//  - p.dq_accum unset (deterministic): from a second kernel that owns a query block and loops over
//    the key blocks, recomputing P and dP (7 matmuls in all), so run-to-run bitwise reproducible;
//  - p.dq_accum set: the dk/dv kernel also adds dS K for its keys into dq_accum with fp32 atomics
//    (5 matmuls, FlashAttention-2's backward; the order of the additions varies run to run), and a
//    last pass writes dq = scale * dq_accum.
cudaError_t attn_bwd(const AttnParams& p, cudaStream_t stream);
#endif

}  // namespace fmcore
