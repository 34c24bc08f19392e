// Fused AdamW and the global gradient L2 norm: framework-free parameters and launchers.
//
// Both are multi-tensor operations: one call takes a list of tensors of any count and sizes. The
// launchers cut each tensor into fixed-size chunks and pack up to a few hundred tensors into a
// table passed by value as the kernel's parameters (graph-capturable: no host-to-device copy). A
// grid of as many blocks as fit on the GPU at once strides over the table's chunks; a block finds
// the tensor of a chunk by a binary search over the chunk prefix sums. A param group therefore
// costs one launch per kAdamWMaxTensors tensors (plus one tiny step-counter launch each), whatever
// the sizes. All element indexing is int64, so a tensor may hold more than 2^31 elements.
//
// AdamW (torch.optim.AdamW's math, decoupled weight decay, bias correction), per element, in fp32:
//   g  = grad * clip                        clip = min(1, max_grad_norm / (norm + 1e-6)), or 1
//   p  = p * (1 - lr * weight_decay)
//   m  = lerp(m, g, 1 - beta1)
//   v  = v * beta2 + (1 - beta2) * g * g
//   p  = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// where t is the step count after this step's increment. The scalars are computed in double on the
// device from the step tensor and (optionally) an lr tensor, so schedules work under CUDA graphs.
// With skip_nonfinite, a non-finite norm (read on the device) leaves params, state and step as
// they were.
#pragma once

#include <algorithm>
#include <cstdint>

#include "dtype.h"

namespace fmcore {

// ---- AdamW

struct AdamWTensor {
  void* param = nullptr;        // numel elements of AdamWParams::dtype; written
  const void* grad = nullptr;   // numel elements of AdamWParams::dtype
  float* exp_avg = nullptr;     // numel fp32
  float* exp_avg_sq = nullptr;  // numel fp32
  float* master = nullptr;      // numel fp32 master copy (read and written), or nullptr: `param` is
                                // read and written itself
  float* step = nullptr;        // one fp32: the steps taken so far; incremented by the call
  int64_t numel = 0;
};

struct AdamWParams {
  const AdamWTensor* tensors = nullptr;  // host array of num_tensors entries
  int64_t num_tensors = 0;
  DType dtype = DType::kFloat32;  // of every param and grad
  const float* lr_ptr = nullptr;  // device scalar read at run time; when null, `lr` is used
  double lr = 0.0;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  const float* grad_norm = nullptr;  // device scalar (l2norm's output); null: no clip, no skip
  double max_grad_norm = -1.0;       // >= 0: clip the grads to this global norm (needs grad_norm)
  bool skip_nonfinite = false;       // a non-finite *grad_norm skips the step (needs grad_norm)
  // Every tensor has an fp32 master copy. A flag, not tensors[0].master != nullptr: a zero-size
  // tensor's master pointer is null, and deciding from it would update bf16 params in place while
  // their master copies went stale.
  bool master = false;
};

// Tensors per launch: the table (65 bytes a tensor) must fit the 32 KiB kernel-parameter space
// (CUDA 12.1+ on sm_70+; 4 KiB before).
constexpr int kAdamWMaxTensors = 448;
// Elements a block updates before it looks up its next chunk: small enough that the chunks spread
// evenly over the blocks (the last round leaves few idle), large enough to amortise the lookup.
constexpr int64_t kAdamWChunk = 8192;

// ---- global L2 norm of a list of tensors (any mix of fp32/bf16/fp16)

struct L2NormTensor {
  const void* data = nullptr;
  int64_t numel = 0;
  DType dtype = DType::kFloat32;
};

struct L2NormParams {
  const L2NormTensor* tensors = nullptr;  // host array of num_tensors entries
  int64_t num_tensors = 0;
  double* partials = nullptr;  // device scratch of l2norm_workspace_size(tensors, num_tensors)
  float* norm = nullptr;       // device scalar: sqrt(sum of squares of every element)
  int64_t* nonfinite_count = nullptr;  // optional device counter, +1 when the norm is inf/nan
};

constexpr int kL2NormMaxTensors = 1024;  // 25 bytes a tensor in the kernel parameters
constexpr int64_t kL2NormChunk = 16384;
constexpr int kL2NormBlocks =
    2048;  // most blocks (partials) per launch; fewer when fewer fit the GPU

// Each launch covers up to kL2NormMaxTensors non-empty tensors of one dtype and writes one partial
// sum per block (at most kL2NormBlocks); this is the scratch size those partials need (the launcher
// cuts the list the same way). Deterministic on a given GPU model: the grid is the number of blocks
// resident at once, partials have fixed slots and one block sums them in a fixed order.
inline int64_t l2norm_workspace_size(const L2NormTensor* tensors, int64_t num_tensors) {
  int64_t count[3] = {0, 0, 0};
  for (int64_t i = 0; i < num_tensors; ++i) {
    if (tensors[i].numel > 0) ++count[static_cast<int>(tensors[i].dtype)];
  }
  int64_t launches = 0;
  for (int64_t c : count) launches += (c + kL2NormMaxTensors - 1) / kL2NormMaxTensors;
  return std::max<int64_t>(launches, 1) * kL2NormBlocks;
}

#ifdef FMCORE_CUDA_API
// Enqueues the update of every tensor on `stream` (step counters first, then the update kernels).
cudaError_t adamw_step(const AdamWParams& p, cudaStream_t stream);
// Enqueues the partial sums and the finalize that writes *norm (and bumps *nonfinite_count).
cudaError_t l2norm(const L2NormParams& p, cudaStream_t stream);
#endif

}  // namespace fmcore
