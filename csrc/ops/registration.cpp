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

  // Softmax cross-entropy (kernels/cross_entropy.h). logits (N, V), target (N,) int64/int32. The
  // forward returns the per-row loss (N,) and stats (N, 2) = (row max, log-sum-exp minus the max),
  // fp32 (fp64 for fp64 logits); the reduction happens in Python. inplace_backward is read only by
  // the autograd formula (gradient into the logits).
  m.def(
      "cross_entropy_fwd(Tensor logits, Tensor target, int ignore_index=-100, "
      "float label_smoothing=0.0, float z_loss=0.0, bool inplace_backward=False) "
      "-> (Tensor, Tensor)");
  m.def(
      "cross_entropy_bwd(Tensor logits, Tensor target, Tensor stats, Tensor grad_loss, "
      "int ignore_index=-100, float label_smoothing=0.0, float z_loss=0.0) -> Tensor");
  m.def(
      "cross_entropy_bwd_(Tensor(a!) logits, Tensor target, Tensor stats, Tensor grad_loss, "
      "int ignore_index=-100, float label_smoothing=0.0, float z_loss=0.0) -> ()");
  // Fused: loss, stats and grad_scale[n] * dloss_n/dlogits written over the logits, one kernel.
  m.def(
      "cross_entropy_fwd_bwd_(Tensor(a!) logits, Tensor target, Tensor grad_scale, "
      "int ignore_index=-100, float label_smoothing=0.0, float z_loss=0.0) -> (Tensor, Tensor)");
  // grad[n, :] *= factor[n] in place; rows whose factor is exactly 1 are not touched (the backward
  // of the fused path).
  m.def("cross_entropy_scale_(Tensor(a!) grad, Tensor factor) -> ()");
  // Linear cross-entropy: hidden (N, D), weight (V, D), bias (V,); reduction 0 none, 1 mean, 2 sum.
  // Returns (loss, lse, grad_hidden, grad_weight, grad_bias); a gradient not asked for is (0,).
  // grad_rows (N,) replaces the reduction's factor of each row's gradient (the backward of none).
  m.def(
      "linear_cross_entropy(Tensor hidden, Tensor weight, Tensor target, Tensor? bias=None, "
      "Tensor? grad_rows=None, int ignore_index=-100, float label_smoothing=0.0, float z_loss=0.0, "
      "int reduction=1, int chunk_size=0, bool grad_hidden=False, bool grad_weight=False, "
      "bool grad_bias=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
