// Every fmcore op schema, in one place. Device files register their implementations with
// TORCH_LIBRARY_IMPL(fmcore, CPU|CUDA, m); Python registers fake (meta) and autograd formulas.
#include <torch/library.h>

TORCH_LIBRARY(fmcore, m) {
  // RoPE. q (B, S, Hq, D) and k (B, S, Hk, D) when seq_dim == 1, (B, H, S, D) when seq_dim == 2;
  // cos/sin (S', R/2) or (B, S', R/2) with S' >= S. conjugate=True applies the inverse rotation.
  m.def(
      "rope(Tensor q, Tensor k, Tensor cos, Tensor sin, bool interleaved=False, "
      "bool conjugate=False, int seq_dim=1) -> (Tensor, Tensor)");
  m.def(
      "rope_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, bool interleaved=False, "
      "bool conjugate=False, int seq_dim=1) -> ()");

  // Fused AdamW (kernels/adamw.h). grad_norm_ writes the global L2 norm of every tensor in the list
  // (fp32/bf16/fp16, one device) into norm, a one-element fp32 tensor, and adds 1 to nonfinite_count
  // (one-element int64) when that norm is inf/nan. adamw_step_ updates params, exp_avgs, exp_avg_sqs
  // (fp32), master_params (empty, or fp32 copies of bf16/fp16 params: read instead of params) and
  // steps (one-element fp32 counts, incremented first) in place. lr_tensor (one-element fp32), when
  // given, is read on the device instead of lr. grad_norm is grad_norm_'s output: with
  // max_grad_norm the grads are scaled by min(1, max_grad_norm / (norm + 1e-6)) inside the update;
  // with skip_nonfinite a non-finite norm leaves everything unchanged.
  m.def("grad_norm_(Tensor[] tensors, Tensor(a!) norm, Tensor(b!)? nonfinite_count=None) -> ()");
  m.def(
      "adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] master_params, Tensor(e!)[] steps, Tensor? lr_tensor, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, Tensor? grad_norm=None, "
      "float? max_grad_norm=None, bool skip_nonfinite=False) -> ()");
}
