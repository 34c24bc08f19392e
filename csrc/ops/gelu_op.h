// Bias + GELU binding shared by the CPU and CUDA implementations: validates the arguments,
// allocates the outputs and fills the kernel's parameter struct.
#pragma once

#include <optional>

#include <torch/types.h>

#include "kernels/gelu.h"

namespace fmcore {

// Contiguous copies of the inputs (the same tensors when they already are), kept alive while the
// kernel runs, and the outputs. Forward: out. Backward: grad_x, and grad_bias when asked for
// ((0,) otherwise; its pointer in p null). The workspace is the CUDA binding's.
struct BiasGelu {
  at::Tensor x, bias, grad_out;
  at::Tensor out, grad_x, grad_bias;
  BiasGeluParams p;
};

BiasGelu prepare_bias_gelu_fwd(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                               bool tanh);
BiasGelu prepare_bias_gelu_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                               const std::optional<at::Tensor>& bias, bool tanh, bool grad_bias);

}  // namespace fmcore
