// RoPE CUDA kernel: one block per (batch, seq) row rotates every head of q and k.
//
// Why this shape: the cos/sin row is shared by all heads of both tensors, so a block stages it in
// shared memory once (as fp32) and then streams the heads with 16-byte accesses. The op is pure
// memory traffic (read q, k; write q, k), so the only goal is full-width coalesced accesses.
#include <algorithm>

#include "common.cuh"
#include "rope.h"

namespace fmcore {

// ---- kernels

// Rotates (or copies, for the pass-through features) one tensor of one row. VEC elements per access.
template <typename T, int VEC>
__device__ __forceinline__ void rope_row(const RopeTensor& t, int64_t b, int64_t s, int head_dim,
                                         int rotary_dim, bool interleaved, float sign,
                                         const float* cos_s, const float* sin_s) {
  using V = Vec<T, VEC>;
  const T* in_row = static_cast<const T*>(t.in) + b * t.in_stride_b + s * t.in_stride_s;
  T* out_row = static_cast<T*>(t.out) + b * t.out_stride_b + s * t.out_stride_s;
  const int half = rotary_dim / 2;
  // rotate-half: an item is VEC pairs (x[i..], x[i+R/2..]); interleaved: VEC/2 adjacent pairs
  // (one pair, read as two scalars, when VEC == 1).
  const int rot_items = (interleaved && VEC > 1) ? rotary_dim / VEC : half / VEC;
  // Out-of-place calls must also copy the features past the rotary dim.
  const int pass_items = (t.in == t.out) ? 0 : (head_dim - rotary_dim) / VEC;
  const int items = rot_items + pass_items;
  const int total = static_cast<int>(t.heads) * items;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int h = idx / items;
    const int j = idx - h * items;
    const T* x = in_row + h * t.in_stride_h;
    T* y = out_row + h * t.out_stride_h;
    if (j >= rot_items) {  // pass-through copy
      const int off = rotary_dim + (j - rot_items) * VEC;
      *reinterpret_cast<V*>(y + off) = *reinterpret_cast<const V*>(x + off);
    } else if (!interleaved) {
      const int i0 = j * VEC;
      const V a = *reinterpret_cast<const V*>(x + i0);
      const V c = *reinterpret_cast<const V*>(x + i0 + half);
      V ra, rc;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float xa = to_float(a.v[e]), xb = to_float(c.v[e]);
        const float co = cos_s[i0 + e], si = sign * sin_s[i0 + e];
        ra.v[e] = from_float<T>(xa * co - xb * si);
        rc.v[e] = from_float<T>(xb * co + xa * si);
      }
      *reinterpret_cast<V*>(y + i0) = ra;
      *reinterpret_cast<V*>(y + i0 + half) = rc;
    } else if constexpr (VEC == 1) {
      const float xa = to_float(x[2 * j]), xb = to_float(x[2 * j + 1]);
      const float co = cos_s[j], si = sign * sin_s[j];
      y[2 * j] = from_float<T>(xa * co - xb * si);
      y[2 * j + 1] = from_float<T>(xb * co + xa * si);
    } else {
      const int i0 = j * VEC;  // even, so pairs never straddle two accesses
      const V a = *reinterpret_cast<const V*>(x + i0);
      V r;
#pragma unroll
      for (int e = 0; e < VEC; e += 2) {
        const float xa = to_float(a.v[e]), xb = to_float(a.v[e + 1]);
        const int f = (i0 + e) / 2;
        const float co = cos_s[f], si = sign * sin_s[f];
        r.v[e] = from_float<T>(xa * co - xb * si);
        r.v[e + 1] = from_float<T>(xb * co + xa * si);
      }
      *reinterpret_cast<V*>(y + i0) = r;
    }
  }
}

template <typename T, typename CS, int VEC>
__global__ void rope_fwd_kernel(const RopeParams p) {
  extern __shared__ float cs_smem[];  // [R/2 cos | R/2 sin], fp32
  const int half = static_cast<int>(p.rotary_dim / 2);
  const int64_t row = blockIdx.x;
  const int64_t b = row / p.seqlen;
  const int64_t s = row - b * p.seqlen;
  const CS* cos_row = static_cast<const CS*>(p.cos) + b * p.cs_stride_b + s * p.cs_stride_s;
  const CS* sin_row = static_cast<const CS*>(p.sin) + b * p.cs_stride_b + s * p.cs_stride_s;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    cs_smem[i] = to_float(cos_row[i]);
    cs_smem[half + i] = to_float(sin_row[i]);
  }
  __syncthreads();
  const float sign = p.conjugate ? -1.f : 1.f;
  const int d = static_cast<int>(p.head_dim), r = static_cast<int>(p.rotary_dim);
  rope_row<T, VEC>(p.q, b, s, d, r, p.interleaved, sign, cs_smem, cs_smem + half);
  rope_row<T, VEC>(p.k, b, s, d, r, p.interleaved, sign, cs_smem, cs_smem + half);
}

// ---- launchers

namespace {

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

// 16-byte accesses need every address the kernel forms to be a multiple of 16 bytes.
bool tensor_allows_vec(const RopeTensor& t, int64_t vec) {
  return aligned16(t.in) && aligned16(t.out) && t.in_stride_b % vec == 0 &&
         t.in_stride_s % vec == 0 && t.in_stride_h % vec == 0 && t.out_stride_b % vec == 0 &&
         t.out_stride_s % vec == 0 && t.out_stride_h % vec == 0;
}

template <typename T, typename CS>
cudaError_t launch(const RopeParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t unit = p.interleaved ? p.rotary_dim : p.rotary_dim / 2;
  const bool vec_ok = unit % kVec == 0 && (p.head_dim - p.rotary_dim) % kVec == 0 &&
                      tensor_allows_vec(p.q, kVec) && tensor_allows_vec(p.k, kVec);
  const dim3 grid(static_cast<unsigned>(p.batch * p.seqlen));
  const int threads = 128;
  const size_t smem = sizeof(float) * p.rotary_dim;
  if (vec_ok) {
    rope_fwd_kernel<T, CS, kVec><<<grid, threads, smem, stream>>>(p);
  } else {
    // Unaligned pointers, odd strides or rotary dims that are not a multiple of the vector.
    rope_fwd_kernel<T, CS, 1><<<grid, threads, smem, stream>>>(p);
  }
  return cudaGetLastError();
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
  // Past these rope_row's int count wraps (heads unrotated/unwritten) or cos/sin overflow the smem.
  if (std::max(p.q.heads, p.k.heads) * p.head_dim > kRopeMaxHeadsTimesDim) return cudaErrorInvalidValue;
  if (p.rotary_dim > kRopeMaxRotaryDim) return cudaErrorInvalidValue;
  switch (p.x_dtype) {
    case DType::kFloat32: return dispatch_cs<float>(p, stream);
    case DType::kBFloat16: return dispatch_cs<__nv_bfloat16>(p, stream);
    case DType::kFloat16: return dispatch_cs<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fmcore
