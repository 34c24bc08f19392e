// The MLP activations, fused with what eager PyTorch runs around them: framework-free parameters
// and launchers.
//
// Bias + GELU (GPT-2's and BERT's first projection). For x (rows, D) and bias (D,) (or none),
// z = x + bias (fp32):
//   exact: out = z Phi(z)                              = 0.5 z (1 + erf(z / sqrt 2))
//   tanh:  out = 0.5 z (1 + tanh(u)), u = sqrt(2 / pi) (z + 0.044715 z^3)
// Backward, with g = grad_out:
//   exact: grad_x = g (Phi(z) + z phi(z)),  phi(z) = exp(-z^2 / 2) / sqrt(2 pi)
//   tanh:  grad_x = g (0.5 (1 + t) + 0.5 z (1 - t^2) sqrt(2 / pi) (1 + 3 * 0.044715 z^2)),
//          t = tanh(u)
//   grad_bias = the sum over rows of grad_x (fp32, before grad_x is rounded to x's dtype)
// The formulas and constants are torch's F.gelu / gelu_backward (approximate "none" / "tanh").
// Why fused: eagerly, `F.linear(x, w, b)` adds the bias inside the matmul for free, but its
// backward then reduces the gradient over the rows in a kernel of its own (a full read of the
// (rows, D) gradient, D = 3072 for GPT-2 124M: 100 MB a layer at B16 T1024), after gelu_backward
// wrote it. Here the backward's one pass over (grad_out, x) writes grad_x and adds each block's
// rows into a partial row; the partial rows are summed in a fixed order (bitwise reproducible).
//
// SwiGLU (Llama's MLP). For gate and up (rows, F), s = sigmoid(gate) (fp32):
//   out = gate s up;  grad_up = g gate s;  grad_gate = g up s (1 + gate (1 - s))
// (torch's silu and silu_backward). gate and up may be the two halves of one (rows, 2F) tensor
// (a fused gate/up projection): their rows are then 2F elements apart, and so are the gradients',
// written into one (rows, 2F) tensor. Why fused: eagerly, silu writes silu(gate), the product
// reads it back, and the backward's three products and the packing of the two gradients into the
// projection's gradient move 26 bytes an element (bf16) where this moves 10; with the forward's 10
// against 6, about 2.7 GB a layer less at Llama-3.2-1B's F = 8192 over 16384 tokens.
#pragma once

#include <cstdint>

#include "dtype.h"

namespace fmcore {

struct BiasGeluParams {
  const void* x = nullptr;         // (rows, D), x_dtype
  const void* bias = nullptr;      // (D,), bias_dtype, or null
  void* out = nullptr;             // forward: (rows, D), x_dtype
  const void* grad_out = nullptr;  // backward: (rows, D), x_dtype
  void* grad_x = nullptr;          // backward: (rows, D), x_dtype
  void* grad_bias = nullptr;       // backward: (D,), bias_dtype, or null (not wanted)
  float* workspace = nullptr;      // backward with grad_bias: (partial_rows, D) fp32
  int64_t partial_rows = 0;        // bias_gelu_partial_rows(p, sm_count) (the backward's)
  int64_t rows = 0, dim = 0;
  bool tanh = false;
  DType x_dtype = DType::kFloat32;
  DType bias_dtype = DType::kFloat32;
};

// Every tensor of one dtype; row r of each starts r * its stride elements past its pointer.
struct SwigluParams {
  const void* gate = nullptr;       // (rows, F)
  const void* up = nullptr;         // (rows, F)
  int64_t in_stride = 0;            // gate's and up's rows: F, or 2F for the halves of one tensor
  void* out = nullptr;              // forward: (rows, F), rows F apart
  const void* grad_out = nullptr;   // backward: (rows, F), rows F apart
  void* grad_gate = nullptr;        // backward: (rows, F)
  void* grad_up = nullptr;          // backward: (rows, F)
  int64_t grad_stride = 0;          // grad_gate's and grad_up's rows: F, or 2F
  int64_t rows = 0, dim = 0;        // dim = F
  DType dtype = DType::kFloat32;
};

#ifdef FMCORE_CUDA_API
// Enqueues the forward on `stream`; returns the launch error.
cudaError_t bias_gelu_fwd(const BiasGeluParams& p, int sm_count, cudaStream_t stream);
// Row blocks of the backward, each writing one partial row of the workspace (at least 1).
int64_t bias_gelu_partial_rows(const BiasGeluParams& p, int sm_count);
// Enqueues the backward (and, with grad_bias, the partial rows' sum) on `stream`.
cudaError_t bias_gelu_bwd(const BiasGeluParams& p, cudaStream_t stream);

cudaError_t swiglu_fwd(const SwigluParams& p, int sm_count, cudaStream_t stream);
cudaError_t swiglu_bwd(const SwigluParams& p, int sm_count, cudaStream_t stream);
#endif

}  // namespace fmcore
