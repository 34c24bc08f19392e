// Fused residual add + norm on CUDA: the binding validates (norm.cpp), the framework-free kernels
// (kernels/norm.cu) run on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda_check.h"
#include "norm_op.h"

namespace fmcore {

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_norm_fwd_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, double eps, bool rms, at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(x.device());
  AddNormFwd f = prepare_add_norm_fwd(x, residual, weight, bias, eps, rms, out_dtype);
  check_cuda_error(add_norm_fwd(f.p, c10::cuda::getCurrentCUDAStream()), "add_norm_fwd");
  return {f.out, f.residual_out, f.mean, f.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_norm_bwd_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& s, const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd,
    bool rms, bool has_residual, bool has_bias, at::ScalarType x_dtype,
    std::optional<at::ScalarType> residual_dtype, bool grad_input, bool grad_weight) {
  const c10::cuda::CUDAGuard guard(s.device());
  AddNormBwd b =
      prepare_add_norm_bwd(grad_out, grad_residual_out, s, weight, mean, rstd, rms, has_residual,
                           has_bias, x_dtype, residual_dtype, grad_input, grad_weight);
  b.p.partial_rows = add_norm_bwd_partial_rows(b.p, sm_count(s));
  // (2, partial_rows, D) fp32: the per-block dweight and dbias sums the reduction kernel adds up;
  // none when neither gradient is asked for.
  const bool sums = add_norm_bwd_sums(b.p);
  const at::Tensor workspace =
      at::empty({sums ? 2 * b.p.partial_rows * b.p.dim : 0}, s.options().dtype(at::kFloat));
  b.p.workspace = sums ? workspace.data_ptr<float>() : nullptr;
  check_cuda_error(add_norm_bwd(b.p, c10::cuda::getCurrentCUDAStream()), "add_norm_bwd");
  return {b.grad_x, b.grad_residual, b.grad_weight, b.grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fmcore, CUDA, m) {
  m.impl("add_norm_fwd", &add_norm_fwd_cuda);
  m.impl("add_norm_bwd", &add_norm_bwd_cuda);
}

}  // namespace fmcore
