// Fused AdamW and the global gradient norm on CUDA: the binding validates (adamw.cpp), the
// framework-free kernels (kernels/adamw.cu) run on the current stream. Nothing here reads a device
// value on the host, so a step never synchronises and can be captured in a CUDA graph.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "adamw_op.h"
#include "cuda_check.h"

namespace fmcore {

namespace {

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "expected ", name, " on a CUDA device, got ", t.device());
}

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList master_params, at::TensorList steps,
                     const std::optional<at::Tensor>& lr_tensor, double lr, double beta1,
                     double beta2, double eps, double weight_decay,
                     const std::optional<at::Tensor>& grad_norm,
                     std::optional<double> max_grad_norm, bool skip_nonfinite) {
  const AdamWCall call =
      make_adamw_call(params, grads, exp_avgs, exp_avg_sqs, master_params, steps, lr_tensor, lr,
                      beta1, beta2, eps, weight_decay, grad_norm, max_grad_norm, skip_nonfinite);
  if (call.params.num_tensors == 0) return;
  check_cuda(params[0], "params[0]");
  const c10::cuda::CUDAGuard guard(params[0].device());
  check_cuda_error(adamw_step(call.params, c10::cuda::getCurrentCUDAStream()), "adamw_step_");
}

void grad_norm_cuda(at::TensorList tensors, const at::Tensor& norm,
                    const std::optional<at::Tensor>& nonfinite_count) {
  check_cuda(norm, "norm");
  L2NormCall call = make_l2norm_call(tensors, norm, nonfinite_count);
  const c10::cuda::CUDAGuard guard(norm.device());
  // Scratch for the per-block partial sums, from the caching allocator (stream-ordered, so it is
  // free to reuse once the finalize kernel that reads it has run).
  const int64_t ws = l2norm_workspace_size(call.tensors.data(), call.params.num_tensors);
  at::Tensor partials = at::empty({ws}, norm.options().dtype(at::kDouble));
  call.params.partials = partials.data_ptr<double>();
  check_cuda_error(l2norm(call.params, c10::cuda::getCurrentCUDAStream()), "grad_norm_");
}

}  // namespace

TORCH_LIBRARY_IMPL(fmcore, CUDA, m) {
  m.impl("adamw_step_", &adamw_step_cuda);
  m.impl("grad_norm_", &grad_norm_cuda);
}

}  // namespace fmcore
