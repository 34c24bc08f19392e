// Flash attention binding shared by the CPU and CUDA implementations: argument checks, output
// allocation and the kernel's parameter struct.
#pragma once

#include <torch/types.h>

#include <optional>

#include "kernels/attention.h"

namespace fmcore {

// What the checks established about the arguments.
struct AttnShapes {
  bool varlen = false;
  int64_t batch = 0, seqlen_q = 0, seqlen_k = 0;  // varlen: max_seqlen_q/k
  int64_t heads_q = 0, heads_k = 0, head_dim = 0;
  int64_t total_q = 0, total_k = 0;  // varlen: rows of the packed q and k
};

// Checks q, k, v (and cu_seqlens for varlen: dtype, shape, device; values only on the CPU, where
// reading them costs nothing) and raises ValueError/RuntimeError naming the bad argument.
AttnShapes check_attn_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::optional<at::Tensor>& cu_seqlens_q,
                             const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                             int64_t max_seqlen_k);

// The backward's extra tensors: dout and out of q's shape and dtype, lse of lse_shape(), dlse too.
void check_attn_grads(const AttnShapes& s, const at::Tensor& q, const at::Tensor& dout,
                      const at::Tensor& out, const at::Tensor& lse,
                      const std::optional<at::Tensor>& dlse);

// (B, Hq, Sq) batched, (Hq, Tq) varlen.
std::vector<int64_t> lse_shape(const AttnShapes& s);
// float32, or float64 for float64 inputs (the CPU reference serving gradcheck).
at::ScalarType lse_dtype(at::ScalarType x);

// The parameter struct over the given tensors (the backward fields stay empty when undefined).
// Raises ValueError for a tile configuration outside [0, kAttnTileConfigs), a window bound below
// -1, or causal with window_right > 0. The mask goes into causal / window_right / window_left as
// attention.h describes (causal is also set for any window_right >= 0).
AttnParams make_attn_params(const AttnShapes& s, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                            const std::optional<at::Tensor>& cu_seqlens_q,
                            const std::optional<at::Tensor>& cu_seqlens_k, bool causal,
                            double softmax_scale, int64_t tiles, int64_t window_left,
                            int64_t window_right);
AttnTensor attn_tensor(const at::Tensor& t, bool varlen);

// q, k and v as views of a packed qkv: (B, S, 3, H, D), or (T, 3, H, D) when varlen. Raises
// ValueError naming qkv for any other shape.
std::tuple<at::Tensor, at::Tensor, at::Tensor> unpack_qkv(const at::Tensor& qkv, bool varlen);

}  // namespace fmcore
