// Rotary position embedding (RoPE): framework-free parameters and launcher.
//
// One launch rotates q and k together. Tensors are addressed as (batch, seq, head, dim) through
// element strides, so (B, S, H, D), (B, H, S, D) and slices of a fused qkv projection all work
// without a copy; only the last dim must be contiguous.
//
// rotate-half (GPT-NeoX / Llama / HF): pairs (i, i + R/2) for i < R/2
// interleaved (GPT-J):                 pairs (2i, 2i + 1)  for i < R/2
//   out_a = x_a * cos_i - x_b * sin_i
//   out_b = x_b * cos_i + x_a * sin_i
// With `conjugate` the rotation runs backwards (sin -> -sin): that is the backward pass, because a
// rotation's transpose is its inverse. Features R..D-1 pass through unchanged.
#pragma once

#include <cstdint>

#include "dtype.h"

namespace fmcore {

struct RopeTensor {
  const void* in = nullptr;  // read from here
  void* out = nullptr;       // written here; may equal `in` (in-place)
  int64_t heads = 0;
  // element strides of the input and output for the batch, seq and head dims (dim stride is 1)
  int64_t in_stride_b = 0, in_stride_s = 0, in_stride_h = 0;
  int64_t out_stride_b = 0, out_stride_s = 0, out_stride_h = 0;
};

struct RopeParams {
  RopeTensor q, k;
  const void* cos = nullptr;  // (B or 1, S, R/2): row (b, s) at b * cs_stride_b + s * cs_stride_s
  const void* sin = nullptr;
  int64_t cs_stride_b = 0;  // 0 when cos/sin are shared across the batch
  int64_t cs_stride_s = 0;
  int64_t batch = 0, seqlen = 0;
  int64_t head_dim = 0;     // D
  int64_t rotary_dim = 0;   // R, even, <= D
  DType x_dtype = DType::kFloat32;   // q, k and outputs
  DType cs_dtype = DType::kFloat32;  // cos and sin: float32 or x_dtype
  bool interleaved = false;
  bool conjugate = false;
};

// The CUDA kernel's limit, refused beyond (by the binding with a message, by rope_fwd with an
// error): it counts a row's items of q and k together in int, so (q heads + k heads) * D and the
// loop's last step past it must stay below 2^31.
inline constexpr int64_t kRopeMaxHeadsTimesDim = INT32_MAX - 1024;

#ifdef FMCORE_CUDA_API
// Enqueues the rotation on `stream`. Returns the launch error (cudaSuccess when it went in).
cudaError_t rope_fwd(const RopeParams& p, cudaStream_t stream);
#endif

}  // namespace fmcore
