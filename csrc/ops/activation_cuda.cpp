// Bias + GELU and SwiGLU on CUDA: the bindings validate (activation.cpp), the framework-free
// kernels (kernels/activation.cu) run on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "activation_op.h"

namespace fmcore {

namespace {

void check_launch(cudaError_t err, const char* op, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fmcore ", op, ": CUDA ", what, " failed: ",
              cudaGetErrorString(err));
}

int sm_count(const at::Tensor& t) {
  int n = 0;
  check_launch(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, t.get_device()),
               "activation", "SM count query");
  return n;
}

at::Tensor bias_gelu_cuda(const at::Tensor& x, const std::optional<at::Tensor>& bias, bool tanh) {
  const c10::cuda::CUDAGuard guard(x.device());
  BiasGelu g = prepare_bias_gelu_fwd(x, bias, tanh);
  check_launch(bias_gelu_fwd(g.p, sm_count(x), c10::cuda::getCurrentCUDAStream()), "bias_gelu",
               "forward launch");
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
  check_launch(bias_gelu_bwd(g.p, c10::cuda::getCurrentCUDAStream()), "bias_gelu",
               "backward launch");
  return {g.grad_x, g.grad_bias};
}

at::Tensor swiglu_cuda(const at::Tensor& gate, const std::optional<at::Tensor>& up) {
  const c10::cuda::CUDAGuard guard(gate.device());
  Swiglu w = prepare_swiglu_fwd(gate, up);
  check_launch(swiglu_fwd(w.p, sm_count(gate), c10::cuda::getCurrentCUDAStream()), "swiglu",
               "forward launch");
  return w.out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cuda(const at::Tensor& grad_out,
                                                   const at::Tensor& gate,
                                                   const std::optional<at::Tensor>& up) {
  const c10::cuda::CUDAGuard guard(gate.device());
  Swiglu w = prepare_swiglu_bwd(grad_out, gate, up);
  check_launch(swiglu_bwd(w.p, sm_count(gate), c10::cuda::getCurrentCUDAStream()), "swiglu",
               "backward launch");
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
