// Bias + GELU and SwiGLU on CUDA: the bindings validate (activation.cpp), the framework-free
// kernels (kernels/activation.cu) run on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "activation_op.h"
#include "checks.h"
#include "cuda_check.h"

namespace fmcore {

namespace {

at::Tensor bias_gelu_cuda(const at::Tensor& x, const std::optional<at::Tensor>& bias, bool tanh) {
  const c10::cuda::CUDAGuard guard(x.device());
  BiasGelu g = prepare_bias_gelu_fwd(x, bias, tanh);
  check_cuda_error(bias_gelu_fwd(g.p, sm_count(x), c10::cuda::getCurrentCUDAStream()), "bias_gelu");
  return g.out;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cuda(const at::Tensor& grad_out,
                                                      const at::Tensor& x,
                                                      const std::optional<at::Tensor>& bias,
                                                      bool tanh, bool grad_bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  BiasGelu g = prepare_bias_gelu_bwd(grad_out, x, bias, tanh, grad_bias);
  g.p.partial_rows = bias_gelu_partial_rows(g.p, sm_count(x));
  // (partial_rows, D) fp32: each row block's column sums, added up in order by a second kernel.
  const bool sums = g.p.grad_bias != nullptr;
  const at::Tensor workspace =
      at::empty({sums ? g.p.partial_rows * g.p.dim : 0}, x.options().dtype(at::kFloat));
  g.p.workspace = sums ? workspace.data_ptr<float>() : nullptr;
  check_cuda_error(bias_gelu_bwd(g.p, c10::cuda::getCurrentCUDAStream()), "bias_gelu_bwd");
  return {g.grad_x, g.grad_bias};
}

at::Tensor swiglu_cuda(const at::Tensor& gate, const std::optional<at::Tensor>& up) {
  const c10::cuda::CUDAGuard guard(gate.device());
  Swiglu w = prepare_swiglu_fwd(gate, up);
  check_cuda_error(swiglu_fwd(w.p, sm_count(gate), c10::cuda::getCurrentCUDAStream()), "swiglu");
  return w.out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cuda(const at::Tensor& grad_out,
                                                   const at::Tensor& gate,
                                                   const std::optional<at::Tensor>& up) {
  const c10::cuda::CUDAGuard guard(gate.device());
  Swiglu w = prepare_swiglu_bwd(grad_out, gate, up);
  check_cuda_error(swiglu_bwd(w.p, sm_count(gate), c10::cuda::getCurrentCUDAStream()),
                   "swiglu_bwd");
  return {w.grad_gate, w.grad_up};
}

}  // namespace

TORCH_LIBRARY_IMPL(fmcore, CUDA, m) {
  m.impl("bias_gelu", &bias_gelu_cuda);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd_cuda);
  m.impl("swiglu", &swiglu_cuda);
  m.impl("swiglu_bwd", &swiglu_bwd_cuda);
}

}  // namespace fmcore
