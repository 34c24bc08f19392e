// Bias + GELU and SwiGLU bindings shared by the CPU and CUDA implementations: validate the
// arguments, allocate the outputs and fill the kernels' parameter structs.
#pragma once

#include <optional>

#include <torch/types.h>

#include "kernels/activation.h"

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

// gate and up (..., F) each, or up absent and gate (..., 2F) holding both (gate the first half).
// Forward: out (..., F). Backward: grad_gate and grad_up, or, packed, grad_gate (..., 2F) holding
// both and grad_up (0,).
struct Swiglu {
  at::Tensor gate, up, grad_out;  // contiguous inputs (up undefined when packed)
  at::Tensor out, grad_gate, grad_up;
  SwigluParams p;
};

Swiglu prepare_swiglu_fwd(const at::Tensor& gate, const std::optional<at::Tensor>& up);
Swiglu prepare_swiglu_bwd(const at::Tensor& grad_out, const at::Tensor& gate,
                          const std::optional<at::Tensor>& up);

}  // namespace fmcore
