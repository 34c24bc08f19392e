// RoPE on CUDA: the binding validates (rope.cpp), the framework-free kernel (kernels/rope.cu) runs
// on the current stream.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "checks.h"
#include "cuda_check.h"
#include "rope_op.h"

namespace fmcore {

namespace {

void launch(const RopeParams& p, const at::Tensor& q) {
  // The kernel's per-row index is an int (kernels/rope.cu): say so instead of a bare launch error.
  TORCH_CHECK_VALUE((p.q.heads + p.k.heads) * p.head_dim <= kRopeMaxHeadsTimesDim,
                    "expected q and k with (q heads + k heads) * head_dim < 2^31 - 1024 on CUDA, got ",
                    p.q.heads, " (q) and ", p.k.heads, " (k) heads of dim ", p.head_dim);
  const c10::cuda::CUDAGuard guard(q.device());
  check_cuda_error(rope_fwd(p, c10::cuda::getCurrentCUDAStream()), "rope");
}

std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& cos, const at::Tensor& sin,
                                             bool interleaved, bool conjugate, int64_t seq_dim) {
  check_float(q, "q");
  at::Tensor q_out = at::empty_like(q), k_out = at::empty_like(k);
  launch(make_rope_params(q, k, cos, sin, interleaved, conjugate, seq_dim, q_out, k_out), q);
  return {q_out, k_out};
}

void rope_inplace_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                       const at::Tensor& sin, bool interleaved, bool conjugate, int64_t seq_dim) {
  check_rope_inplace(q, k);
  launch(make_rope_params(q, k, cos, sin, interleaved, conjugate, seq_dim, q, k), q);
}

}  // namespace

TORCH_LIBRARY_IMPL(fmcore, CUDA, m) {
  m.impl("rope", &rope_cuda);
  m.impl("rope_", &rope_inplace_cuda);
}

}  // namespace fmcore
