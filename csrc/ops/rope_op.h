// RoPE binding shared by the CPU and CUDA implementations: validates the arguments and fills the
// kernel's parameter struct (pointers, element strides, dtypes).
#pragma once

#include <torch/types.h>

#include "kernels/rope.h"

namespace fmcore {

// Checks q, k, cos, sin and fills RopeParams reading from q/k and writing to q_out/k_out (which may be
// q/k themselves for the in-place op). Raises ValueError/RuntimeError naming the bad argument.
RopeParams make_rope_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                            const at::Tensor& sin, bool interleaved, bool conjugate, int64_t seq_dim,
                            const at::Tensor& q_out, const at::Tensor& k_out);

// The in-place op's extra check: no element of q or k reachable twice (ValueError otherwise).
void check_rope_inplace(const at::Tensor& q, const at::Tensor& k);

}  // namespace fmcore
