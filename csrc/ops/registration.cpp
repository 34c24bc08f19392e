// Every fmcore op schema, in one place. Device files register their implementations with
// TORCH_LIBRARY_IMPL(fmcore, CPU|CUDA, m); Python registers fake (meta) and autograd formulas,
// except the autograd of rope, add_norm, bias_gelu and swiglu, which is C++ for its per-call cost
// (rope_autograd.cpp, norm_autograd.cpp, activation_autograd.cpp).
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
      "cross_entropy_fwd(Tensor logits, Tensor target, SymInt ignore_index=-100, "
      "float label_smoothing=0.0, float z_loss=0.0, bool inplace_backward=False) "
      "-> (Tensor, Tensor)");
  m.def(
      "cross_entropy_bwd(Tensor logits, Tensor target, Tensor stats, Tensor grad_loss, "
      "SymInt ignore_index=-100, float label_smoothing=0.0, float z_loss=0.0) -> Tensor");
  m.def(
      "cross_entropy_bwd_(Tensor(a!) logits, Tensor target, Tensor stats, Tensor grad_loss, "
      "SymInt ignore_index=-100, float label_smoothing=0.0, float z_loss=0.0) -> ()");
  // Fused: loss, stats and grad_scale[n] * dloss_n/dlogits written over the logits, one kernel.
  m.def(
      "cross_entropy_fwd_bwd_(Tensor(a!) logits, Tensor target, Tensor grad_scale, "
      "SymInt ignore_index=-100, float label_smoothing=0.0, float z_loss=0.0) -> (Tensor, Tensor)");
  // grad[n, :] *= factor[n] in place; rows whose factor is exactly 1 are not touched (the backward
  // of the fused path).
  m.def("cross_entropy_scale_(Tensor(a!) grad, Tensor factor) -> ()");
  // Linear cross-entropy: hidden (N, D), weight (V, D), bias (V,); reduction 0 none, 1 mean, 2 sum.
  // Returns (loss, lse, grad_hidden, grad_weight, grad_bias); a gradient not asked for is (0,), and
  // so is every gradient for reduction none without grad_rows (its forward: the factors come later).
  // grad_rows (N,) replaces the reduction's factor of each row's gradient (the backward of none).
  m.def(
      "linear_cross_entropy(Tensor hidden, Tensor weight, Tensor target, Tensor? bias=None, "
      "Tensor? grad_rows=None, SymInt ignore_index=-100, float label_smoothing=0.0, "
      "float z_loss=0.0, "
      "int reduction=1, int chunk_size=0, bool grad_hidden=False, bool grad_weight=False, "
      "bool grad_bias=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
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
  // Flash attention. Batched when cu_seqlens_q/k are None: q (B, Sq, Hq, D), k/v (B, Sk, Hk, D),
  // lse (B, Hq, Sq). Varlen otherwise: q (Tq, Hq, D), k/v (Tk, Hk, D), int32 cu_seqlens (B + 1,),
  // lse (Hq, Tq); max_seqlen_q/k bound every sequence (unused when batched). lse is float32
  // (float64 for float64 CPU inputs). Causal masks align to the bottom-right corner. The backward
  // takes the optional gradient of lse (dlse) and recomputes the probabilities from lse.
  // deterministic=False lets the CUDA backward add dq with atomics (faster, not bitwise
  // reproducible); tiles picks the CUDA kernels' tile configuration (0, the default, or one of the
  // alternatives the benchmark times; kernels/attention.h). The forward only carries deterministic
  // to the backward; the CPU ignores both. window_left/window_right: FlashAttention-2's
  // window_size, a sliding window around each query's bottom-right-aligned diagonal (-1: no bound
  // on that side; causal is window_right = 0, and causal with window_right > 0 raises).
  m.def(
      "flash_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "SymInt max_seqlen_q, SymInt max_seqlen_k, bool causal, float softmax_scale, "
      "bool deterministic=False, int tiles=0, int window_left=-1, int window_right=-1) "
      "-> (Tensor, Tensor)");
  m.def(
      "flash_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? dlse, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, SymInt max_seqlen_q, "
      "SymInt max_seqlen_k, bool causal, float softmax_scale, bool deterministic=False, "
      "int tiles=0, int window_left=-1, int window_right=-1) -> (Tensor, Tensor, Tensor)");
  // flash_attn_bwd for q, k, v packed in qkv ((B, S, 3, H, D), or (T, 3, H, D) with cu_seqlens,
  // which then serves q and k): returns the gradient of qkv (contiguous), written in place of
  // stacking three (fmcore.ops.flash_attention_qkvpacked's backward).
  m.def(
      "flash_attn_qkvpacked_bwd(Tensor dout, Tensor qkv, Tensor out, Tensor lse, Tensor? dlse, "
      "Tensor? cu_seqlens, SymInt max_seqlen, bool causal, float softmax_scale, "
      "bool deterministic=False, int tiles=0, int window_left=-1, int window_right=-1) -> Tensor");

  // Fused residual add + LayerNorm (rms=False) / RMSNorm (rms=True) (kernels/norm.h). x (..., D),
  // residual (x's shape) or None, weight and bias (D,). Returns (out, residual_out, mean, rstd): out
  // in out_dtype, residual_out = x + residual in their promoted dtype ((0,) without a residual),
  // mean (rows,) ((0,) for RMSNorm) and rstd (rows,) fp32 (fp64 for an fp64 stream on the CPU).
  // The backward takes s (residual_out, or x without a residual) and returns (grad_x in x_dtype,
  // grad_residual in residual_dtype ((0,) when None), grad_weight, grad_bias). Only what is asked
  // for is computed, the rest is (0,): grad_x and grad_residual with grad_input, grad_weight with
  // grad_weight, grad_bias with has_bias (the backward never reads the bias itself).
  // Autograd for both is C++ (norm_autograd.cpp); add_norm_bwd has none (no double backward).
  m.def(
      "add_norm_fwd(Tensor x, Tensor? residual, Tensor weight, Tensor? bias, float eps, bool rms, "
      "ScalarType out_dtype) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "add_norm_bwd(Tensor grad_out, Tensor? grad_residual_out, Tensor s, Tensor weight, "
      "Tensor mean, Tensor rstd, bool rms, bool has_residual, bool has_bias, ScalarType x_dtype, "
      "ScalarType? residual_dtype, bool grad_input=True, bool grad_weight=True) "
      "-> (Tensor, Tensor, Tensor, Tensor)");

  // Bias + GELU (kernels/activation.h): gelu(x + bias) for x (..., D) and bias (D,) (x's dtype
  // or float32) or None; tanh selects the tanh approximation. The backward returns (grad_x,
  // grad_bias in bias's dtype, (0,) unless grad_bias and a bias). SwiGLU: silu(gate) * up for gate
  // and up (..., F), or, with up None, gate (..., 2F) holding both (gate first); the backward
  // returns (grad_gate, grad_up), or, packed, (the (..., 2F) gradient, (0,)). Autograd for all four
  // is C++ (activation_autograd.cpp); the backward ops have none (no double backward).
  m.def("bias_gelu(Tensor x, Tensor? bias, bool tanh=False) -> Tensor");
  m.def(
      "bias_gelu_bwd(Tensor grad_out, Tensor x, Tensor? bias, bool tanh=False, "
      "bool grad_bias=True) -> (Tensor, Tensor)");
  m.def("swiglu(Tensor gate, Tensor? up) -> Tensor");
  m.def("swiglu_bwd(Tensor grad_out, Tensor gate, Tensor? up) -> (Tensor, Tensor)");
}
