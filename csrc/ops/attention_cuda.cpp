// Flash attention on CUDA: the binding validates (attention.cpp), copies any input the kernels'
// 16-byte accesses cannot read in place, and launches kernels/attention.cu on the current stream.
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "attention_op.h"
#include "checks.h"
#include "cuda_check.h"

namespace fmcore {

namespace {

void check_cuda_support(const AttnShapes& s, const at::Tensor& q) {
  TORCH_CHECK_VALUE(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
                    "expected q to be bfloat16 or float16 on CUDA (fmcore's kernels), got ",
                    q.scalar_type(),
                    "; fmcore.ops.scaled_dot_product_attention falls back to torch");
  TORCH_CHECK_VALUE(
      attn_cuda_supports_head_dim(s.head_dim),
      "expected a head dim of 64, 96 or 128 on CUDA (fmcore's kernels), got q of shape ",
      shape_str(q.sizes()), "; fmcore.ops.scaled_dot_product_attention falls back to torch");
  // Grid dims y and z. Hk <= Hq except when Hq = 0 (any Hk divides 0), where the dk/dv kernel
  // still runs over Hk heads to write their zeros.
  TORCH_CHECK_VALUE(s.heads_q <= 65535 && s.heads_k <= 65535 && s.batch <= 65535,
                    "expected at most 65535 heads in q and in k and 65535 sequences on CUDA, got ",
                    s.heads_q, " and ", s.heads_k, " heads and ", s.batch, " sequences");
}

// The kernels move 16 bytes at a time: the base must be 16-byte aligned and every stride a multiple
// of 8 elements. Anything else (an odd storage offset, a padded layout) is copied once.
at::Tensor kernel_ready(const at::Tensor& t) {
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) ok = ok && (t.size(d) <= 1 || t.stride(d) % 8 == 0);
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double softmax_scale,
    bool /*deterministic: a backward option*/, int64_t tiles, int64_t window_left,
    int64_t window_right) {
  const AttnShapes sh =
      check_attn_inputs(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  check_cuda_support(sh, q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = kernel_ready(q_in), k = kernel_ready(k_in), v = kernel_ready(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty(lse_shape(sh), q.options().dtype(at::kFloat));
  const AttnParams p =
      make_attn_params(sh, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale,
                       tiles, window_left, window_right);
  check_cuda_error(attn_fwd(p, c10::cuda::getCurrentCUDAStream()), "flash_attn_fwd");
  return {out, lse};
}

// The backward into dq, dk, dv (of q's, k's, v's shapes; views of a packed gradient allowed: the
// kernels write through strides).
void flash_attn_bwd_cuda_into(const at::Tensor& dout_in, const at::Tensor& q_in,
                              const at::Tensor& k_in, const at::Tensor& v_in,
                              const at::Tensor& out_in, const at::Tensor& lse,
                              const std::optional<at::Tensor>& dlse,
                              const std::optional<at::Tensor>& cu_seqlens_q,
                              const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                              int64_t max_seqlen_k, bool causal, double softmax_scale,
                              bool deterministic, int64_t tiles, int64_t window_left,
                              int64_t window_right, const at::Tensor& dq, const at::Tensor& dk,
                              const at::Tensor& dv) {
  const AttnShapes sh =
      check_attn_inputs(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  check_cuda_support(sh, q_in);
  check_attn_grads(sh, q_in, dout_in, out_in, lse, dlse);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = kernel_ready(q_in), k = kernel_ready(k_in), v = kernel_ready(v_in);
  const at::Tensor dout = kernel_ready(dout_in), out = kernel_ready(out_in);
  at::Tensor delta = at::empty(lse_shape(sh), lse.options());
  AttnParams p =
      make_attn_params(sh, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale,
                       tiles, window_left, window_right);
  p.dout = attn_tensor(dout, sh.varlen);
  p.dq = attn_tensor(dq, sh.varlen);
  p.dk = attn_tensor(dk, sh.varlen);
  p.dv = attn_tensor(dv, sh.varlen);
  at::Tensor dq_accum;
  if (!deterministic) {
    // torch's deterministic mode: warn (warn_only) or raise (strict; the Python wrappers never get
    // here then, they pass deterministic=True) as torch's own nondeterministic kernels do.
    at::globalContext().alertNotDeterministic(
        "fmcore::flash_attn_bwd with deterministic=False (atomic dq; pass deterministic=True)");
    // The atomic dq path's fp32 scratch (attn_bwd): zeroed here, contiguous (q's shape).
    dq_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
    p.dq_accum = attn_tensor(dq_accum, sh.varlen);
  }
  p.dlse = dlse ? dlse->data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  check_cuda_error(attn_bwd(p, c10::cuda::getCurrentCUDAStream()), "flash_attn_bwd");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double softmax_scale,
    bool deterministic, int64_t tiles, int64_t window_left, int64_t window_right) {
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  flash_attn_bwd_cuda_into(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                           max_seqlen_k, causal, softmax_scale, deterministic, tiles, window_left,
                           window_right, dq, dk, dv);
  return {dq, dk, dv};
}

// dq, dk, dv written into one gradient of qkv's shape: no copy to stack them, which autograd's
// unbind backward would make (3 x the activations read and written, every layer).
at::Tensor flash_attn_qkvpacked_bwd_cuda(const at::Tensor& dout, const at::Tensor& qkv,
                                         const at::Tensor& out, const at::Tensor& lse,
                                         const std::optional<at::Tensor>& dlse,
                                         const std::optional<at::Tensor>& cu_seqlens,
                                         int64_t max_seqlen, bool causal, double softmax_scale,
                                         bool deterministic, int64_t tiles,
                                         int64_t window_left, int64_t window_right) {
  const auto [q, k, v] = unpack_qkv(qkv, cu_seqlens.has_value());
  // Contiguous: 16-byte aligned views whose strides are multiples of 8 elements (D is).
  at::Tensor dqkv = at::empty(qkv.sizes(), qkv.options());
  const auto [dq, dk, dv] = unpack_qkv(dqkv, cu_seqlens.has_value());
  flash_attn_bwd_cuda_into(dout, q, k, v, out, lse, dlse, cu_seqlens, cu_seqlens, max_seqlen,
                           max_seqlen, causal, softmax_scale, deterministic, tiles, window_left,
                           window_right, dq, dk, dv);
  return dqkv;
}

}  // namespace

TORCH_LIBRARY_IMPL(fmcore, CUDA, m) {
  m.impl("flash_attn_fwd", &flash_attn_fwd_cuda);
  m.impl("flash_attn_bwd", &flash_attn_bwd_cuda);
  m.impl("flash_attn_qkvpacked_bwd", &flash_attn_qkvpacked_bwd_cuda);
}

}  // namespace fmcore
