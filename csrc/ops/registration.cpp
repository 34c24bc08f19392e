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

  // Flash attention. Batched when cu_seqlens_q/k are None: q (B, Sq, Hq, D), k/v (B, Sk, Hk, D),
  // lse (B, Hq, Sq). Varlen otherwise: q (Tq, Hq, D), k/v (Tk, Hk, D), int32 cu_seqlens (B + 1,),
  // lse (Hq, Tq); max_seqlen_q/k bound every sequence (unused when batched). lse is float32
  // (float64 for float64 CPU inputs). Causal masks align to the bottom-right corner. The backward
  // takes the optional gradient of lse (dlse) and recomputes the probabilities from lse.
  m.def(
      "flash_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, bool causal, float softmax_scale) -> (Tensor, Tensor)");
  m.def(
      "flash_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? dlse, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, bool causal, float softmax_scale) -> (Tensor, Tensor, Tensor)");
}
