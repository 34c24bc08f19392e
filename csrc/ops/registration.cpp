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
}
