// Softmax cross-entropy over rows of logits: framework-free parameters and launchers.
//
// Per row n of logits z (V classes) with target t, label smoothing eps and z-loss weight zl, in
// fp32 with an online max / sum-exp:
//   m_n = max_v z_v,   l_n = log sum_v exp(z_v - m_n),   lse_n = m_n + l_n
//   loss_n = (1 - eps) (lse_n - z_t) + eps (lse_n - mean_v z_v) + zl lse_n^2
//   dloss_n / dz_v = p_v (1 + 2 zl lse_n) - eps / V - (1 - eps) [v == t]
//   p_v = exp(z_v - lse_n)
// The row statistics are kept as the pair (m_n, l_n), not their sum: z_v - lse_n is then computed
// as (z_v - m_n) - l_n, exact in its first step, where z_v - fl(lse_n) would carry lse's rounding
// (5e-4 at |z| ~ 1e4, i.e. 5e-4 relative error in every probability).
// This is F.cross_entropy's per-row loss (label smoothing as torch defines it) plus PaLM's z-loss.
// Rows whose target is ignore_index have loss 0, stats (0, 0) and gradient 0, and their logits are
// never read. The gradient written is grad_scale[n] * dloss_n / dz (the chain rule for a
// reduction).
//
// A target outside [0, V) that is not ignore_index is never used as an index: the row is computed
// with z_t = 0. cross_entropy_check_target finds such targets, in a launch of its own queued before
// the loss kernel, so that the binding can raise without waiting for the loss kernel.
#pragma once

#include <cstdint>

#include "dtype.h"

namespace fmcore {

struct CrossEntropyParams {
  const void* logits = nullptr;  // (rows, vocab), row stride logits_stride elements, last dim dense
  void* grad = nullptr;  // (rows, vocab) gradient out, row stride grad_stride; may be logits
  const void* target = nullptr;  // (rows,) int32 or int64
  float* loss = nullptr;         // (rows,) fp32 out (forward)
  // (rows, 2) fp32 (m_n, l_n): written by the forward, read by the backward
  float* stats = nullptr;
  const float* grad_scale = nullptr;  // (rows,) fp32 factor of each row's gradient ...
  int64_t grad_scale_stride = 0;      // ... 0 when one factor serves every row
  int64_t* bad_target = nullptr;      // check_target: receives an out-of-range target, if any
  int64_t rows = 0, vocab = 0;
  int64_t logits_stride = 0, grad_stride = 0;
  int64_t ignore_index = -100;
  float label_smoothing = 0.f;
  float z_loss = 0.f;
  DType dtype = DType::kFloat32;  // logits and grad
  bool target_int64 = true;
};

#ifdef FMCORE_CUDA_API
// Forward: loss and stats per row. With `with_grad` the same kernel then writes the gradient into
// p.grad: the fused path. Its second pass over the row reads the first 110 KiB of it from shared
// memory (all of a bf16 row up to V = 56320), the rest again from global memory.
cudaError_t cross_entropy_fwd(const CrossEntropyParams& p, bool with_grad, cudaStream_t stream);
// Backward: the gradient from the saved stats, one read and one write of each logit.
cudaError_t cross_entropy_bwd(const CrossEntropyParams& p, cudaStream_t stream);
// grad[n, :] *= grad_scale[n] in place (uses grad, grad_stride, grad_scale, rows, vocab, dtype).
// Rows whose factor is exactly 1 are not touched: the backward of the fused path after
// loss.backward() costs no memory traffic.
cudaError_t cross_entropy_scale(const CrossEntropyParams& p, cudaStream_t stream);
// *bad_target = one of the targets outside [0, vocab) that are not ignore_index, if there is any;
// otherwise *bad_target is not written (uses target, target_int64, rows, vocab, ignore_index,
// bad_target). Reads the N targets once: a few microseconds.
cudaError_t cross_entropy_check_target(const CrossEntropyParams& p, cudaStream_t stream);
#endif

}  // namespace fmcore
