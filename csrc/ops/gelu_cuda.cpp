// Bias + GELU on CUDA: the binding validates (gelu.cpp), the framework-free kernels
// (kernels/gelu.cu) run on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "gelu_op.h"

namespace fmcore {

namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fmcore bias_gelu: CUDA ", what, " failed: ",
              cudaGetErrorString(err));
}

int sm_count(const at::Tensor& t) {
  int n = 0;
  check_launch(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, t.get_device()),
               "SM count query");
  return n;
}

at::Tensor bias_gelu_cuda(const at::Tensor& x, const std::optional<at::Tensor>& bias, bool tanh) {
  const c10::cuda::CUDAGuard guard(x.device());
  BiasGelu g = prepare_bias_gelu_fwd(x, bias, tanh);
  check_launch(bias_gelu_fwd(g.p, sm_count(x), c10::cuda::getCurrentCUDAStream()),
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
  check_launch(bias_gelu_bwd(g.p, c10::cuda::getCurrentCUDAStream()), "backward launch");
  return {g.grad_x, g.grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fmcore, CUDA, m) {
  m.impl("bias_gelu", &bias_gelu_cuda);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd_cuda);
}

}  // namespace fmcore
