// RoPE CUDA kernel: one block per (batch, seq) row, one thread per 16-byte item of every head of q
// and k in it.
//
// Why this shape: the op is pure memory traffic (read q, k; write q, k), so the goal is full-width
// coalesced accesses with as many bytes in flight as possible. A thread issues its item's loads and
// its cos/sin loads at once and stores the result: no barrier, no loop in the common case (the bar's
// row is 256 q items + 64 k items, a 320-thread block). cos/sin are read from global memory: the
// row's 2 x R/2 values are shared by every head, so after the first warp they hit L1. (They used to
// be staged in shared memory behind a __syncthreads, which held every block's first q/k loads back
// by one cos/sin round trip.)
#include <algorithm>

#include "common.cuh"
#include "rope.h"

namespace fmcore {

// ---- kernels

// N consecutive cos (or sin) values as fp32. Aligned path (kVecCs): one N * sizeof(CS)-byte access
// (the launcher checked the alignment); otherwise one element at a time.
template <typename CS, int N, bool kVecCs>
__device__ __forceinline__ void load_cs(const CS* p, float (&out)[N]) {
  if constexpr (kVecCs) {
    const Vec<CS, N> v = *reinterpret_cast<const Vec<CS, N>*>(p);
#pragma unroll
    for (int e = 0; e < N; ++e) out[e] = to_float(v.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) out[e] = to_float(p[e]);
  }
}

// Items of one head: rotate-half, VEC pairs (x[i..], x[i+R/2..]); interleaved, VEC/2 adjacent pairs
// (one pair, read as two scalars, when VEC == 1); then, out of place, the pass-through features
// past the rotary dim, VEC at a time. The launcher sizes the block with the same count, in int64;
// the kernel counts in int (in int64 its divisions took the 16-byte kernels from 32 to 56
// registers).
template <int VEC, typename I>
__host__ __device__ inline I rot_items(I rotary_dim, bool interleaved) {
  return (interleaved && VEC > 1) ? rotary_dim / VEC : rotary_dim / 2 / VEC;
}
template <int VEC, typename I>
__host__ __device__ inline I head_items(const RopeTensor& t, I head_dim, I rotary_dim,
                                        bool interleaved) {
  const I pass_items = t.in == t.out ? 0 : (head_dim - rotary_dim) / VEC;
  return rot_items<VEC>(rotary_dim, interleaved) + pass_items;
}

// Rotates (or copies) item `idx` of tensor t's row (b, s): head idx / items, item idx % items.
template <typename T, typename CS, int VEC, bool kVecCs>
__device__ __forceinline__ void rope_item(const RopeTensor& t, int64_t b, int64_t s, int idx,
                                          int items, int head_dim, int rotary_dim, bool interleaved,
                                          float sign, const CS* cos_row, const CS* sin_row) {
  using V = Vec<T, VEC>;
  const int h = idx / items;
  const int j = idx - h * items;
  const T* x = static_cast<const T*>(t.in) + b * t.in_stride_b + s * t.in_stride_s + h * t.in_stride_h;
  T* y = static_cast<T*>(t.out) + b * t.out_stride_b + s * t.out_stride_s + h * t.out_stride_h;
  const int half = rotary_dim / 2;
  const int n_rot = rot_items<VEC>(rotary_dim, interleaved);
  if (j >= n_rot) {  // pass-through copy
    const int off = rotary_dim + (j - n_rot) * VEC;
    *reinterpret_cast<V*>(y + off) = *reinterpret_cast<const V*>(x + off);
  } else if (!interleaved) {
    const int i0 = j * VEC;
    const V a = *reinterpret_cast<const V*>(x + i0);
    const V c = *reinterpret_cast<const V*>(x + i0 + half);
    float co[VEC], si[VEC];
    load_cs<CS, VEC, kVecCs>(cos_row + i0, co);
    load_cs<CS, VEC, kVecCs>(sin_row + i0, si);
    V ra, rc;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float xa = to_float(a.v[e]), xb = to_float(c.v[e]), sn = sign * si[e];
      ra.v[e] = from_float<T>(xa * co[e] - xb * sn);
      rc.v[e] = from_float<T>(xb * co[e] + xa * sn);
    }
    *reinterpret_cast<V*>(y + i0) = ra;
    *reinterpret_cast<V*>(y + i0 + half) = rc;
  } else if constexpr (VEC == 1) {
    const float xa = to_float(x[2 * j]), xb = to_float(x[2 * j + 1]);
    const float co = to_float(cos_row[j]), sn = sign * to_float(sin_row[j]);
    y[2 * j] = from_float<T>(xa * co - xb * sn);
    y[2 * j + 1] = from_float<T>(xb * co + xa * sn);
  } else {
    const int i0 = j * VEC;  // even, so pairs never straddle two accesses
    const V a = *reinterpret_cast<const V*>(x + i0);
    float co[VEC / 2], si[VEC / 2];
    load_cs<CS, VEC / 2, kVecCs>(cos_row + i0 / 2, co);
    load_cs<CS, VEC / 2, kVecCs>(sin_row + i0 / 2, si);
    V r;
#pragma unroll
    for (int e = 0; e < VEC; e += 2) {
      const float xa = to_float(a.v[e]), xb = to_float(a.v[e + 1]), sn = sign * si[e / 2];
      r.v[e] = from_float<T>(xa * co[e / 2] - xb * sn);
      r.v[e + 1] = from_float<T>(xb * co[e / 2] + xa * sn);
    }
    *reinterpret_cast<V*>(y + i0) = r;
  }
}

// Threads 0.. take q's items (head by head), the rest k's; a row with more items than threads
// loops.
template <typename T, typename CS, int VEC, bool kVecCs>
__global__ void rope_fwd_kernel(const RopeParams p) {
  const int64_t row = blockIdx.x;
  const int64_t b = row / p.seqlen;
  const int64_t s = row - b * p.seqlen;
  const CS* cos_row = static_cast<const CS*>(p.cos) + b * p.cs_stride_b + s * p.cs_stride_s;
  const CS* sin_row = static_cast<const CS*>(p.sin) + b * p.cs_stride_b + s * p.cs_stride_s;
  const float sign = p.conjugate ? -1.f : 1.f;
  const int d = static_cast<int>(p.head_dim), r = static_cast<int>(p.rotary_dim);
  const int q_items = head_items<VEC>(p.q, d, r, p.interleaved);
  const int k_items = head_items<VEC>(p.k, d, r, p.interleaved);
  const int q_total = static_cast<int>(p.q.heads) * q_items;
  const int total = q_total + static_cast<int>(p.k.heads) * k_items;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    if (idx < q_total) {
      rope_item<T, CS, VEC, kVecCs>(p.q, b, s, idx, q_items, d, r, p.interleaved, sign, cos_row,
                                    sin_row);
    } else {
      rope_item<T, CS, VEC, kVecCs>(p.k, b, s, idx - q_total, k_items, d, r, p.interleaved, sign,
                                    cos_row, sin_row);
    }
  }
}

// ---- launchers

namespace {

// 16-byte q/k accesses (and N-value cos/sin accesses) need every address formed to be a multiple
// of the access size.
bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

bool tensor_allows_vec(const RopeTensor& t, int64_t vec, int64_t elem) {
  return aligned(t.in, vec * elem) && aligned(t.out, vec * elem) && t.in_stride_b % vec == 0 &&
         t.in_stride_s % vec == 0 && t.in_stride_h % vec == 0 && t.out_stride_b % vec == 0 &&
         t.out_stride_s % vec == 0 && t.out_stride_h % vec == 0;
}

template <typename T, typename CS, int VEC>
cudaError_t launch_vec(const RopeParams& p, cudaStream_t stream) {
  // A warp-multiple block that covers the row in one pass, up to 512 threads.
  const int64_t items = p.q.heads * head_items<VEC>(p.q, p.head_dim, p.rotary_dim, p.interleaved) +
                        p.k.heads * head_items<VEC>(p.k, p.head_dim, p.rotary_dim, p.interleaved);
  const int threads = static_cast<int>(std::min<int64_t>(512, std::max<int64_t>(32, (items + 31) / 32 * 32)));
  const dim3 grid(static_cast<unsigned>(p.batch * p.seqlen));
  // cos/sin values per access: VEC for rotate-half, VEC / 2 for interleaved pairs.
  const int64_t n_cs = (p.interleaved && VEC > 1) ? VEC / 2 : VEC;
  const bool cs_vec = aligned(p.cos, n_cs * sizeof(CS)) && aligned(p.sin, n_cs * sizeof(CS)) &&
                      p.cs_stride_b % n_cs == 0 && p.cs_stride_s % n_cs == 0;
  if (cs_vec) {
    rope_fwd_kernel<T, CS, VEC, true><<<grid, threads, 0, stream>>>(p);
  } else {
    rope_fwd_kernel<T, CS, VEC, false><<<grid, threads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T, typename CS>
cudaError_t launch(const RopeParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t unit = p.interleaved ? p.rotary_dim : p.rotary_dim / 2;
  const bool vec_ok = unit % kVec == 0 && (p.head_dim - p.rotary_dim) % kVec == 0 &&
                      tensor_allows_vec(p.q, kVec, sizeof(T)) &&
                      tensor_allows_vec(p.k, kVec, sizeof(T));
  if (vec_ok) return launch_vec<T, CS, kVec>(p, stream);
  // Unaligned pointers, odd strides or rotary dims that are not a multiple of the vector.
  return launch_vec<T, CS, 1>(p, stream);
}

template <typename T>
cudaError_t dispatch_cs(const RopeParams& p, cudaStream_t stream) {
  if (p.cs_dtype == DType::kFloat32) return launch<T, float>(p, stream);
  return launch<T, T>(p, stream);  // the binding guarantees cos/sin are fp32 or x's dtype
}

}  // namespace

cudaError_t rope_fwd(const RopeParams& p, cudaStream_t stream) {
  if (p.batch * p.seqlen == 0) return cudaSuccess;
  // One block per (b, s) row: the grid's x dimension holds at most 2^31 - 1 blocks.
  if (p.batch * p.seqlen > INT32_MAX) return cudaErrorInvalidConfiguration;
  // Past this the kernel's int count of a row's items wraps (heads unrotated/unwritten).
  if ((p.q.heads + p.k.heads) * p.head_dim > kRopeMaxHeadsTimesDim) return cudaErrorInvalidValue;
  switch (p.x_dtype) {
    case DType::kFloat32: return dispatch_cs<float>(p, stream);
    case DType::kBFloat16: return dispatch_cs<__nv_bfloat16>(p, stream);
    case DType::kFloat16: return dispatch_cs<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fmcore
