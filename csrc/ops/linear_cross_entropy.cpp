// Linear cross-entropy: the lm-head matmul and the loss, chunk by chunk over the tokens, so no more
// than one (chunk, V) block of logits ever exists.
//
// Per chunk of rows: logits = hidden_c @ weight^T (+ bias) (cuBLAS through ATen); the cross-entropy
// kernel turns them, in place, into grad_scale * dloss/dlogits while writing the loss; then
// grad_hidden_c = dlogits @ weight, grad_weight += dlogits^T @ hidden_c, grad_bias += sum(dlogits).
// So the gradients are complete when the forward returns and the backward only scales them by
// grad_output (reductions mean and sum). With reduction "none" the per-row factors are unknown in
// the forward: it computes only the loss, and the backward calls this op again with grad_rows.
//
// grad_weight accumulates in weight's dtype (one rounding per chunk, as every chunked peer does):
// an fp32 accumulator would cost 2 bytes x V x D more than the memory bar allows for bf16 weights.
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "checks.h"
#include "cross_entropy_op.h"

namespace fmcore {

namespace {

constexpr int64_t kChunkBudgetBytes = 112ll << 20;
constexpr int64_t kCpuChunkBytes = 16ll << 20;

// Rows per chunk when the caller gives none: the (rows, V) logits block stays within 112 MiB (the
// other 16 MiB of the 128 MiB headroom cover the per-row loss/stats vectors, the fp32 bias-gradient
// accumulator and its per-chunk sum, all O(N + V)), rounded down to a multiple of 64 once that is
// more than 128 so the chunk GEMMs tile evenly (rows are M of two GEMMs and K of grad_weight's).
// On the GPU the largest chunk that fits matters: grad_weight's GEMM reads and writes all of
// grad_weight once per chunk, so its arithmetic intensity is proportional to the chunk's rows.
// On the CPU a block of ~16 MiB is faster (a larger one is paged in afresh on every call, as glibc
// maps blocks of 32 MiB and more, and streams through the cache worse): at (2048, 128) x V 4096
// fp32, 2 cores, fwd+bwd took 32.7 ms in one 32 MiB chunk and 23 ms in 16 MiB ones (torch: 57);
// at (1024, 256) x V 32000, 206 ms in 110 MiB chunks and 168-182 in 16 MiB ones. Yet no fewer than
// D / 2 rows, or the grad_weight traffic dominates: at (512, 1024) x V 32000, 16 MiB chunks (128
// rows) took 400 ms against 350 for 256 or 512 rows.
int64_t default_chunk_rows(const at::Tensor& hidden, int64_t V) {
  const int64_t N = hidden.size(0), D = hidden.size(1), elem = hidden.element_size();
  const int64_t budget_rows = std::max<int64_t>(1, kChunkBudgetBytes / (V * elem));
  int64_t rows = budget_rows;
  if (hidden.is_cpu()) rows = std::min(budget_rows, std::max(kCpuChunkBytes / (V * elem), D / 2));
  rows = std::max<int64_t>(rows, 1);
  if (rows > 128) rows -= rows % 64;
  return std::min(rows, std::max<int64_t>(N, 1));
}

void check_linear_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                         const at::Tensor& target, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& grad_rows, int64_t reduction,
                         int64_t chunk_size) {
  check_float(hidden, "hidden");
  check_dim(hidden, 2, "hidden", "(N, D)");
  check_dim(weight, 2, "weight", "(V, D)");
  check_same_dtype(weight, hidden, "weight", "hidden");
  check_same_device(weight, hidden, "weight", "hidden");
  const int64_t N = hidden.size(0), D = hidden.size(1), V = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == D, "expected weight of shape (V, D) with D = ", D,
                    " (the last dim of hidden), got ", shape_str(weight.sizes()));
  TORCH_CHECK_VALUE(V >= 1 && V <= std::numeric_limits<int32_t>::max(),
                    "expected weight of shape (V, D) with 1 <= V < 2^31, got ",
                    shape_str(weight.sizes()));
  TORCH_CHECK_VALUE(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
                    "expected target to be int64 or int32, got ", target.scalar_type());
  check_same_device(target, hidden, "target", "hidden");
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == N, "expected target of shape (N,) = (",
                    N, ",) to match hidden ", shape_str(hidden.sizes()), ", got ",
                    shape_str(target.sizes()));
  if (bias.has_value()) {
    check_same_dtype(*bias, hidden, "bias", "hidden");
    check_same_device(*bias, hidden, "bias", "hidden");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == V, "expected bias of shape (V,) = (", V,
                      ",), got ", shape_str(bias->sizes()));
  }
  if (grad_rows.has_value()) {
    check_same_device(*grad_rows, hidden, "grad_rows", "hidden");
    TORCH_CHECK_VALUE(grad_rows->scalar_type() == ce_acc_type(hidden), "expected grad_rows to be ",
                      ce_acc_type(hidden), ", got ", grad_rows->scalar_type());
    TORCH_CHECK_VALUE(grad_rows->dim() == 1 && grad_rows->size(0) == N,
                      "expected grad_rows of shape (N,) = (", N, ",), got ",
                      shape_str(grad_rows->sizes()));
  }
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2,
                    "expected reduction 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  TORCH_CHECK_VALUE(chunk_size >= 0,
                    "expected chunk_size >= 1 (or 0: chosen from the shapes), got ", chunk_size);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_op(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& grad_rows,
    const CeOptions& o, int64_t reduction, int64_t chunk_size, bool need_grad_hidden,
    bool need_grad_weight, bool need_grad_bias, const CeDevice& dev) {
  check_linear_inputs(hidden, weight, target, bias, grad_rows, reduction, chunk_size);
  check_ce_options(o);
  need_grad_bias = need_grad_bias && bias.has_value();
  // Reduction "none" without grad_rows (its forward): the per-row factors are unknown, so no
  // gradient is computed here (the backward calls again with grad_rows). Without this the forward
  // ran both gradient matmuls per chunk and held grad_hidden and grad_weight for nothing.
  if (reduction == 0 && !grad_rows.has_value()) {
    need_grad_hidden = need_grad_weight = need_grad_bias = false;
  }
  const bool any_grad = need_grad_hidden || need_grad_weight || need_grad_bias;
  const int64_t N = hidden.size(0), V = weight.size(0);
  const at::ScalarType acc_type = ce_acc_type(hidden);
  const auto acc = hidden.options().dtype(acc_type);
  const at::Tensor tgt = target.contiguous();

  at::Tensor loss_rows = at::empty({N}, acc), stats = at::empty({N, 2}, acc);
  at::Tensor count;  // of non-ignored targets, for the mean
  if (reduction == 1) count = tgt.ne(o.ignore_index).sum().to(acc_type);
  at::Tensor scale;  // (N,) factor of each row's gradient
  if (any_grad) {
    if (grad_rows.has_value()) {
      scale = *grad_rows;
    } else if (reduction == 1) {
      // 1/0 = inf when every target is ignored; ignored rows get 0 without multiplying.
      scale = count.reciprocal().expand({N});
    } else {
      scale = at::ones({1}, acc).expand({N});
    }
  }
  const auto empty = [&](bool need, at::IntArrayRef sizes) {
    return need ? at::empty(sizes, hidden.options()) : at::empty({0}, hidden.options());
  };
  at::Tensor grad_hidden = empty(need_grad_hidden, hidden.sizes());
  at::Tensor grad_weight = empty(need_grad_weight, weight.sizes());
  at::Tensor grad_bias_acc = need_grad_bias ? at::zeros({V}, acc) : at::Tensor();
  if (need_grad_weight && N == 0) grad_weight.zero_();

  const int64_t chunk = chunk_size > 0 ? std::min(chunk_size, std::max<int64_t>(N, 1))
                                       : default_chunk_rows(hidden, V);
  at::Tensor buf = at::empty({std::min(chunk, N), V}, hidden.options());
  // Queued before the chunks and waited for after them all: the wait ends when this small check
  // is done, with every chunk's work still queued behind it (see cross_entropy_cuda.cpp).
  const CeTargetCheck check = dev.check_target(tgt, o.ignore_index, V);
  const at::Tensor weight_t = weight.t();
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t rows = std::min(chunk, N - n0);
    const at::Tensor h = hidden.narrow(0, n0, rows);
    at::Tensor logits = buf.narrow(0, 0, rows);
    if (bias.has_value()) {
      at::addmm_out(logits, *bias, h, weight_t);
    } else {
      at::mm_out(logits, h, weight_t);
    }
    CeTensors t{logits,
                tgt.narrow(0, n0, rows),
                loss_rows.narrow(0, n0, rows),
                stats.narrow(0, n0, rows),
                any_grad ? logits : at::Tensor(),
                any_grad ? scale.narrow(0, n0, rows) : at::Tensor()};
    dev.run(t, o, any_grad ? CeMode::kFwdGrad : CeMode::kFwd);
    // logits now hold the scaled gradient of this chunk's loss
    if (need_grad_hidden) {
      at::Tensor gh = grad_hidden.narrow(0, n0, rows);
      at::mm_out(gh, logits, weight);
    }
    if (need_grad_weight) {
      if (n0 == 0) {
        at::mm_out(grad_weight, logits.t(), h);
      } else {
        grad_weight.addmm_(logits.t(), h);
      }
    }
    if (need_grad_bias) grad_bias_acc.add_(logits.sum(0, false, acc_type));
  }
  raise_if_bad_target(check, o, V);

  at::Tensor loss;
  switch (reduction) {
    case 0:
      loss = loss_rows;
      break;
    case 1:
      loss = loss_rows.sum() / count;
      break;  // 0/0 = nan when all ignored, as torch
    default:
      loss = loss_rows.sum();
      break;
  }
  at::Tensor grad_bias =
      need_grad_bias ? grad_bias_acc.to(hidden.scalar_type()) : at::empty({0}, hidden.options());
  return {loss, stats.sum(1), grad_hidden, grad_weight, grad_bias};
}

}  // namespace fmcore
