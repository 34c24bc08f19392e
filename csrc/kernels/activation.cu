// Bias + GELU and SwiGLU CUDA kernels (see activation.h for the math).
//
// Why this shape: both ops are pure memory traffic, and bias + GELU has a per-column bias and, in
// its backward, a per-column sum. So a thread owns 8 consecutive columns (16-byte accesses) and
// walks down a block of rows: it loads its bias once and, in the backward, keeps its 8 column sums
// in registers, so the bias gradient costs one partial row per block instead of a second pass over
// the gradient. A 128-thread block covers 1024 columns; the rows are split into enough blocks to
// fill the GPU (8 blocks an SM). Columns that are not a multiple of 8, or rows and pointers that
// are not 16-byte aligned, take the scalar path (one column a thread).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "activation.h"
#include "common.cuh"

namespace fmcore {

namespace {

constexpr int kThreads = 128;
constexpr int kVec = 8;  // columns a thread on the vector path (16 bytes of a 16-bit dtype)
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

// GELU's tanh form is computed as z sigmoid(2u), u = sqrt(2 / pi) (z + 0.044715 z^3), which is
// torch's 0.5 z (1 + tanh(u)) (1 + tanh(u) = 2 sigmoid(2u)), as the CPU reference does: 1 + tanh(u)
// cancels where tanh(u) ~ -1, and gave GELU(-5) 30% off (-2.98e-7 for -2.29e-7, bf16 keeps the
// difference), GELU(-7) 0 for -2.3e-15, and their gradients as far off. s = sigmoid(2u) and 1 - s
// (computed as 1 / (1 + 1/e): exact where s ~ 1) from e = e^-2u.
struct SigmoidTwoU {
  float s, one_minus_s;
  __device__ __forceinline__ explicit SigmoidTwoU(float z) {
    constexpr float k1 = 2.f * kSqrt2OverPi, k3 = 2.f * kSqrt2OverPi * kCubic;
    const float e = expf(-z * (k1 + k3 * z * z));
    s = 1.f / (1.f + e);
    one_minus_s = 1.f / (1.f + 1.f / e);
  }
};

__device__ __forceinline__ float gelu(float z, bool tanh_form) {
  if (tanh_form) return z * SigmoidTwoU(z).s;
  return 0.5f * z * (1.f + erff(z * kInvSqrt2));
}

// d gelu(z) / dz; the tanh form's s + 2 z s (1 - s) sqrt(2 / pi) (1 + 3 * 0.044715 z^2) is torch's
// 0.5 (1 + t) + 0.5 z (1 - t^2) sqrt(2 / pi) (1 + 3 * 0.044715 z^2) with t = tanh(u) = 2s - 1.
__device__ __forceinline__ float gelu_grad(float z, bool tanh_form) {
  const float z2 = z * z;
  if (tanh_form) {
    constexpr float k1 = 2.f * kSqrt2OverPi, k3 = 2.f * 3.f * kSqrt2OverPi * kCubic;
    const SigmoidTwoU sg(z);
    return sg.s + z * sg.s * sg.one_minus_s * (k1 + k3 * z2);
  }
  return 0.5f * (1.f + erff(z * kInvSqrt2)) + z * kInvSqrt2Pi * expf(-0.5f * z2);
}

// Block (blockIdx.x, blockIdx.y): columns [1024 x, +1024) (VEC 8; 128 on the scalar path) of rows
// [rows_per_block y, +rows_per_block). The backward writes its column sums into workspace row y
// (zeros for a block past the last row).
template <typename T, int VEC, bool kBwd>
__global__ void __launch_bounds__(kThreads) bias_gelu_kernel(const BiasGeluParams p,
                                                             int64_t rows_per_block) {
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  if (c >= p.dim) return;  // VEC divides D on the vector path: a thread's columns are all in
  float b[VEC] = {};
  if (p.bias != nullptr) load<VEC>(p.bias, p.bias_dtype, c, b);
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t r1 = std::min(p.rows, r0 + rows_per_block);
  float sum[VEC] = {};
#pragma unroll 4
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t at = r * p.dim + c;
    float z[VEC];
    load_t<T, VEC>(static_cast<const T*>(p.x) + at, z);
    if constexpr (kBwd) {
      float g[VEC];
      load_t<T, VEC>(static_cast<const T*>(p.grad_out) + at, g);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        g[e] *= gelu_grad(z[e] + b[e], p.tanh);
        sum[e] += g[e];
      }
      store_t<T, VEC>(static_cast<T*>(p.grad_x) + at, g);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) z[e] = gelu(z[e] + b[e], p.tanh);
      store_t<T, VEC>(static_cast<T*>(p.out) + at, z);
    }
  }
  if constexpr (kBwd) {
    if (p.grad_bias != nullptr) store_t<float, VEC>(p.workspace + blockIdx.y * p.dim + c, sum);
  }
}

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// Same tiling as bias_gelu_kernel, no sums.
template <typename T, int VEC, bool kBwd>
__global__ void __launch_bounds__(kThreads) swiglu_kernel(const SwigluParams p,
                                                          int64_t rows_per_block) {
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  if (c >= p.dim) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t r1 = std::min(p.rows, r0 + rows_per_block);
#pragma unroll 4
  for (int64_t r = r0; r < r1; ++r) {
    float g[VEC], u[VEC];
    load_t<T, VEC>(static_cast<const T*>(p.gate) + r * p.in_stride + c, g);
    load_t<T, VEC>(static_cast<const T*>(p.up) + r * p.in_stride + c, u);
    if constexpr (kBwd) {
      float d[VEC];
      load_t<T, VEC>(static_cast<const T*>(p.grad_out) + r * p.dim + c, d);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float sg = sigmoid(g[e]);
        const float dg = d[e] * u[e] * sg * (1.f + g[e] * (1.f - sg));
        u[e] = d[e] * g[e] * sg;  // grad_up
        g[e] = dg;
      }
      store_t<T, VEC>(static_cast<T*>(p.grad_gate) + r * p.grad_stride + c, g);
      store_t<T, VEC>(static_cast<T*>(p.grad_up) + r * p.grad_stride + c, u);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) g[e] = g[e] * sigmoid(g[e]) * u[e];
      store_t<T, VEC>(static_cast<T*>(p.out) + r * p.dim + c, g);
    }
  }
}

// Row blocks for (rows, dim): 8 blocks an SM over the 1024-column tiles (at least one block, at
// most one a row and grid.y's limit).
int64_t row_blocks(int64_t rows, int64_t dim, int sm_count) {
  const int64_t tiles = std::max<int64_t>(1, (dim + kThreads * kVec - 1) / (kThreads * kVec));
  const int64_t want = (8 * int64_t{std::max(1, sm_count)} + tiles - 1) / tiles;
  return std::clamp<int64_t>(std::min(want, rows), 1, 65535);
}

// Launches kernel<T, VEC>(p, rows_per_block) for T = dtype over the (column tiles, row_blocks)
// grid, VEC = kVec when `vec`, else 1 (kernel: a generic lambda taking the two as constants).
template <typename Launch>
cudaError_t launch_tiled(DType dtype, int64_t rows, int64_t dim, int64_t blocks, bool vec,
                         Launch&& kernel) {
  if (blocks < 1 || blocks > 65535) return cudaErrorInvalidValue;
  const int64_t cols = kThreads * (vec ? kVec : 1);
  const dim3 grid(static_cast<unsigned>((dim + cols - 1) / cols), static_cast<unsigned>(blocks));
  const int64_t rows_per_block = (rows + blocks - 1) / blocks;
  auto go = [&](auto t) {
    using T = decltype(t);
    if (vec) {
      kernel(t, std::integral_constant<int, kVec>(), grid, rows_per_block);
    } else {
      kernel(t, std::integral_constant<int, 1>(), grid, rows_per_block);
    }
    return cudaGetLastError();
  };
  switch (dtype) {
    case DType::kBFloat16: return go(__nv_bfloat16());
    case DType::kFloat16: return go(__half());
    default: return go(0.f);
  }
}

template <bool kBwd>
cudaError_t launch_bias_gelu(const BiasGeluParams& p, int64_t blocks, cudaStream_t stream) {
  const bool vec = p.dim % kVec == 0 &&
                   all_aligned({p.x, p.bias, p.out, p.grad_out, p.grad_x, p.workspace});
  return launch_tiled(p.x_dtype, p.rows, p.dim, blocks, vec,
                      [&](auto t, auto v, dim3 grid, int64_t rows_per_block) {
                        bias_gelu_kernel<decltype(t), decltype(v)::value, kBwd>
                            <<<grid, kThreads, 0, stream>>>(p, rows_per_block);
                      });
}

template <bool kBwd>
cudaError_t launch_swiglu(const SwigluParams& p, int sm_count, cudaStream_t stream) {
  if (p.rows == 0 || p.dim == 0) return cudaSuccess;
  const bool vec = p.dim % kVec == 0 && p.in_stride % kVec == 0 && p.grad_stride % kVec == 0 &&
                   all_aligned({p.gate, p.up, p.out, p.grad_out, p.grad_gate, p.grad_up});
  return launch_tiled(p.dtype, p.rows, p.dim, row_blocks(p.rows, p.dim, sm_count), vec,
                      [&](auto t, auto v, dim3 grid, int64_t rows_per_block) {
                        swiglu_kernel<decltype(t), decltype(v)::value, kBwd>
                            <<<grid, kThreads, 0, stream>>>(p, rows_per_block);
                      });
}

}  // namespace

int64_t bias_gelu_partial_rows(const BiasGeluParams& p, int sm_count) {
  return row_blocks(p.rows, p.dim, sm_count);
}

cudaError_t bias_gelu_fwd(const BiasGeluParams& p, int sm_count, cudaStream_t stream) {
  if (p.rows == 0 || p.dim == 0) return cudaSuccess;
  return launch_bias_gelu<false>(p, row_blocks(p.rows, p.dim, sm_count), stream);
}

cudaError_t bias_gelu_bwd(const BiasGeluParams& p, cudaStream_t stream) {
  if (p.dim == 0) return cudaSuccess;
  if (p.grad_bias != nullptr && p.workspace == nullptr) return cudaErrorInvalidValue;
  // Launched with no rows too: its blocks then write the zero partial rows the sum reads.
  if (const cudaError_t err = launch_bias_gelu<true>(p, p.partial_rows, stream);
      err != cudaSuccess) {
    return err;
  }
  if (p.grad_bias == nullptr) return cudaSuccess;
  PartialRowSums<1> sums;
  sums.part[0] = p.workspace;
  sums.out[0] = p.grad_bias;
  sums.rows = p.partial_rows;
  sums.dim = p.dim;
  sums.dtype = p.bias_dtype;
  return sum_partial_rows(sums, stream);
}

cudaError_t swiglu_fwd(const SwigluParams& p, int sm_count, cudaStream_t stream) {
  return launch_swiglu<false>(p, sm_count, stream);
}

cudaError_t swiglu_bwd(const SwigluParams& p, int sm_count, cudaStream_t stream) {
  return launch_swiglu<true>(p, sm_count, stream);
}

}  // namespace fmcore
