// Fused residual add + norm binding shared by the CPU and CUDA implementations: validates the
// arguments, allocates the outputs and fills the kernel's parameter struct.
#pragma once

#include <optional>

#include <torch/types.h>

#include "kernels/norm.h"

namespace fmcore {

// The forward's tensors: contiguous copies of the inputs (the same tensors when they already are),
// kept alive while the kernel runs, and the outputs it writes.
struct AddNormFwd {
  at::Tensor x, residual, weight, bias;
  at::Tensor out;           // x's shape, out_dtype
  at::Tensor residual_out;  // x's shape, promote(x, residual); (0,) without a residual
  at::Tensor mean;          // (rows,) fp32 (fp64 for fp64 x); (0,) for RMSNorm
  at::Tensor rstd;          // (rows,)
  AddNormParams p;
};

AddNormFwd prepare_add_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                double eps, bool rms, at::ScalarType out_dtype);

// Every gradient not asked for is (0,) and its pointer in p is null (the kernels skip its work).
struct AddNormBwd {
  at::Tensor grad_out, grad_residual_out, s, weight, mean, rstd;  // contiguous inputs
  at::Tensor grad_x;         // s's shape, x_dtype (grad_input)
  at::Tensor grad_residual;  // s's shape, residual_dtype (grad_input and residual_dtype given)
  at::Tensor grad_weight;    // (D,), weight's dtype (grad_weight)
  at::Tensor grad_bias;      // (D,), weight's dtype (has_bias)
  AddNormParams p;           // workspace not set (the CUDA binding allocates it)
};

// s is the forward's residual_out, or x itself when has_residual is false.
AddNormBwd prepare_add_norm_bwd(const at::Tensor& grad_out,
                                const std::optional<at::Tensor>& grad_residual_out,
                                const at::Tensor& s, const at::Tensor& weight,
                                const at::Tensor& mean, const at::Tensor& rstd, bool rms,
                                bool has_residual, bool has_bias, at::ScalarType x_dtype,
                                std::optional<at::ScalarType> residual_dtype, bool grad_input,
                                bool grad_weight);

}  // namespace fmcore
