// Fused residual add + LayerNorm / RMSNorm (the "pre-norm" block boundary): framework-free
// parameters and launchers.
//
// Forward, per row r of D features (all tensors are row-major (rows, D), rows contiguous):
//   s         = x[r] + residual[r]     rounded to the residual stream's dtype and written to
//                                      residual_out (skipped without a residual: then s = x[r])
//   LayerNorm: mean = sum(s) / D, var = sum((s - mean)^2) / D, xhat = (s - mean) * rstd
//   RMSNorm:   mean = 0,          var = sum(s^2) / D,          xhat = s * rstd
//   rstd      = 1 / sqrt(var + eps)
//   out[r]    = xhat * weight (+ bias)
// mean and rstd (fp32, one per row) are saved for the backward. The statistics are taken from the
// rounded s, exactly what a separate `x + residual` followed by a norm would read.
//
// Backward, per row, with dy = grad_out[r] and g = dy * weight (fp32):
//   ds = rstd * (g - mean(g) - xhat * mean(g * xhat)) + grad_residual_out[r]   (LayerNorm)
//   ds = rstd * (g - xhat * mean(g * xhat))           + grad_residual_out[r]   (RMSNorm)
//   grad_x[r] = ds (x's dtype), grad_residual[r] = ds (the residual's dtype, when asked for)
//   grad_weight = sum over rows of dy * xhat, grad_bias = sum over rows of dy
// The weight and bias gradients are reduced without atomics: each block accumulates its rows into
// one fp32 partial row of a workspace (partial_rows x D), and a second kernel sums the partial
// rows in a fixed order, so the result is bitwise reproducible run to run on a given GPU.
//
// Every tensor has its own dtype (fp32, bf16 or fp16), read at run time: the kernels are memory
// bound, a uniform branch per 8-element access costs nothing, and it keeps the mixed cases the
// trainer produces (bf16 branch outputs added to an fp32 residual stream under autocast, a bf16
// normed output for the next matmul) to one instantiation per row layout.
#pragma once

#include <cstdint>

#include "dtype.h"

namespace fmcore {

// The largest D the CUDA kernels take (every row is held in registers between its two passes).
constexpr int64_t kAddNormMaxDim = 16384;

struct AddNormParams {
  // forward inputs
  const void* x = nullptr;         // (rows, D)
  const void* residual = nullptr;  // (rows, D) or null
  const void* weight = nullptr;    // (D,)
  const void* bias = nullptr;      // (D,) or null (LayerNorm only)
  // forward outputs
  void* out = nullptr;           // (rows, D) normed
  void* residual_out = nullptr;  // (rows, D) s; null exactly when residual is null
  float* mean = nullptr;         // (rows,) LayerNorm only (null for RMSNorm)
  float* rstd = nullptr;         // (rows,)

  // backward inputs: s is read from `residual_out` (the forward's) or, when that is null (no
  // residual: s was x itself), from `x`; `residual` is not read
  const void* grad_out = nullptr;           // (rows, D), out's dtype
  const void* grad_residual_out = nullptr;  // (rows, D), residual_out's dtype, or null
  // backward outputs, each null when not wanted (its work is skipped; grad_residual needs grad_x)
  void* grad_x = nullptr;         // (rows, D), x's dtype
  void* grad_residual = nullptr;  // (rows, D), residual's dtype (only when its dtype is not x's)
  void* grad_weight = nullptr;    // (D,), weight's dtype
  void* grad_bias = nullptr;      // (D,), weight's dtype
  float* workspace = nullptr;     // (2, partial_rows, D) fp32: dweight then dbias partial sums
                                  // (null when neither grad_weight nor grad_bias is wanted)
  int64_t partial_rows = 0;       // add_norm_bwd_partial_rows(p, sm_count)

  int64_t rows = 0, dim = 0;
  float eps = 1e-5f;
  bool rms = false;
  DType x_dtype = DType::kFloat32;
  DType residual_dtype = DType::kFloat32;      // residual's (forward input, grad_residual)
  DType residual_out_dtype = DType::kFloat32;  // the stream: residual_out, grad_residual_out
  DType out_dtype = DType::kFloat32;           // out, grad_out
  DType weight_dtype = DType::kFloat32;        // weight, bias, grad_weight, grad_bias
};

// Whether the backward reduces dweight/dbias partial sums (and needs the workspace): either asked for.
inline bool add_norm_bwd_sums(const AddNormParams& p) {
  return p.grad_weight != nullptr || p.grad_bias != nullptr;
}

#ifdef FMCORE_CUDA_API
// Enqueues the forward on `stream`. Returns the launch error (cudaSuccess when it went in).
cudaError_t add_norm_fwd(const AddNormParams& p, cudaStream_t stream);
// Rows of the workspace the backward needs (it depends on the layout and the device's SM count).
int64_t add_norm_bwd_partial_rows(const AddNormParams& p, int sm_count);
// Enqueues the backward (row kernel, then the weight/bias reduction) on `stream`.
cudaError_t add_norm_bwd(const AddNormParams& p, cudaStream_t stream);
#endif

}  // namespace fmcore
