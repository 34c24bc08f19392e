// Flash attention: argument checks, the CPU implementation and its registration.
//
// The CPU path is exact in fp32 (fp64 for fp64 inputs) and never holds an S x S matrix. Where
// torch's own fused CPU flash attention computes this op's function (see torch_kernel_covers), it
// calls that; everywhere else (varlen, a causal Sq != Sk, a gradient for lse) it runs the math
// reference below (which also takes every sliding-window call, skipping the keys outside a chunk's
// windows), written in ATen ops (batched matmuls, vectorized elementwise ops) and chunked
// over query rows. Like the CUDA kernels, both backwards recompute the probabilities from lse, and
// both are deterministic.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "attention_op.h"
#include "checks.h"
#include "parallel.h"

namespace fmcore {

namespace {

void check_cu_seqlens(const at::Tensor& cu, const at::Tensor& q, const char* name) {
  TORCH_CHECK_VALUE(cu.scalar_type() == at::kInt, "expected ", name, " to be int32, got ",
                    cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1, "expected ", name,
                    " of shape (batch + 1,), got ", shape_str(cu.sizes()));
  check_same_device(cu, q, name, "q");
  TORCH_CHECK_VALUE(cu.is_contiguous(), "expected ", name, " to be contiguous, got stride ",
                    cu.stride(0));
}

// Values of cu_seqlens: starts at 0, never decreases, ends at total, no sequence above max_seqlen.
void check_cu_values(const at::Tensor& cu, int64_t total, int64_t max_seqlen, const char* name,
                     const char* max_name, const char* total_name) {
  const int32_t* p = cu.data_ptr<int32_t>();
  const int64_t n = cu.numel();
  TORCH_CHECK_VALUE(p[0] == 0, "expected ", name, " to start at 0, got ", p[0]);
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK_VALUE(p[i] >= p[i - 1], "expected ", name, " to be non-decreasing, got ", p[i - 1],
                      " then ", p[i], " at index ", i);
    TORCH_CHECK_VALUE(p[i] - p[i - 1] <= max_seqlen, "expected ", max_name, " (", max_seqlen,
                      ") >= every sequence length in ", name, ", got a sequence of ",
                      p[i] - p[i - 1], " at index ", i - 1);
  }
  TORCH_CHECK_VALUE(p[n - 1] == total, "expected the last entry of ", name, " (", p[n - 1],
                    ") to equal the number of rows of ", total_name, " (", total, ")");
}

}  // namespace

AttnShapes check_attn_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::optional<at::Tensor>& cu_seqlens_q,
                             const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                             int64_t max_seqlen_k) {
  AttnShapes s;
  TORCH_CHECK_VALUE(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(),
                    "expected cu_seqlens_q and cu_seqlens_k both given (varlen) or both None, got ",
                    cu_seqlens_q.has_value() ? "only cu_seqlens_q" : "only cu_seqlens_k");
  s.varlen = cu_seqlens_q.has_value();
  const int64_t dims = s.varlen ? 3 : 4;
  const char* q_layout = s.varlen ? "(total_q, Hq, D)" : "(B, Sq, Hq, D)";
  const char* kv_layout = s.varlen ? "(total_k, Hk, D)" : "(B, Sk, Hk, D)";
  check_dim(q, dims, "q", q_layout);
  check_dim(k, dims, "k", kv_layout);
  check_dim(v, dims, "v", kv_layout);
  check_float(q, "q");
  check_same_dtype(k, q, "k", "q");
  check_same_dtype(v, q, "v", "q");
  check_same_device(k, q, "k", "q");
  check_same_device(v, q, "v", "q");
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");
  s.heads_q = q.size(-2);
  s.heads_k = k.size(-2);
  s.head_dim = q.size(-1);
  TORCH_CHECK_VALUE(s.head_dim > 0, "expected q with a head dim > 0, got shape ",
                    shape_str(q.sizes()));
  TORCH_CHECK_VALUE(k.size(-1) == s.head_dim, "expected k with the head dim of q (", s.head_dim,
                    "), got shape ", shape_str(k.sizes()));
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "expected v of the shape of k ", shape_str(k.sizes()),
                    ", got ", shape_str(v.sizes()));
  TORCH_CHECK_VALUE(s.heads_k > 0 && s.heads_q % s.heads_k == 0, "expected the heads of k (",
                    s.heads_k, ") to divide the heads of q (", s.heads_q, ")");
  if (s.varlen) {
    const at::Tensor& cq = *cu_seqlens_q;
    const at::Tensor& ck = *cu_seqlens_k;
    check_cu_seqlens(cq, q, "cu_seqlens_q");
    check_cu_seqlens(ck, q, "cu_seqlens_k");
    TORCH_CHECK_VALUE(ck.size(0) == cq.size(0),
                      "expected cu_seqlens_k of the shape of cu_seqlens_q ", shape_str(cq.sizes()),
                      ", got ", shape_str(ck.sizes()));
    TORCH_CHECK_VALUE(max_seqlen_q >= 0, "expected max_seqlen_q >= 0, got ", max_seqlen_q);
    TORCH_CHECK_VALUE(max_seqlen_k >= 0, "expected max_seqlen_k >= 0, got ", max_seqlen_k);
    s.batch = cq.size(0) - 1;
    s.total_q = q.size(0);
    s.total_k = k.size(0);
    // max_seqlen only has to bound the longest document, and no document is longer than the packed
    // tensor, so the grid extent is clamped to the total: an over-generous max_seqlen (2^40, say)
    // would otherwise overflow the unsigned CUDA grid dim (a 0- or short grid: rows left unwritten)
    // and make the CPU reference loop over empty blocks.
    s.seqlen_q = std::min(max_seqlen_q, s.total_q);
    s.seqlen_k = std::min(max_seqlen_k, s.total_k);
    TORCH_CHECK_VALUE(s.total_q < (int64_t{1} << 31) && s.total_k < (int64_t{1} << 31),
                      "expected fewer than 2^31 packed rows (int32 cu_seqlens), got q of shape ",
                      shape_str(q.sizes()));
    if (q.device().is_cpu()) {
      check_cu_values(cq, s.total_q, max_seqlen_q, "cu_seqlens_q", "max_seqlen_q", "q");
      check_cu_values(ck, s.total_k, max_seqlen_k, "cu_seqlens_k", "max_seqlen_k", "k");
    }
  } else {
    s.batch = q.size(0);
    s.seqlen_q = q.size(1);
    s.seqlen_k = k.size(1);
    TORCH_CHECK_VALUE(k.size(0) == s.batch, "expected k of shape (B, Sk, Hk, D) with B = ", s.batch,
                      " (the batch of q), got ", shape_str(k.sizes()));
  }
  return s;
}

std::vector<int64_t> lse_shape(const AttnShapes& s) {
  if (s.varlen) return {s.heads_q, s.total_q};
  return {s.batch, s.heads_q, s.seqlen_q};
}

at::ScalarType lse_dtype(at::ScalarType x) { return x == at::kDouble ? at::kDouble : at::kFloat; }

void check_attn_grads(const AttnShapes& s, const at::Tensor& q, const at::Tensor& dout,
                      const at::Tensor& out, const at::Tensor& lse,
                      const std::optional<at::Tensor>& dlse) {
  for (const auto& [t, name] : {std::pair{&dout, "dout"}, std::pair{&out, "out"}}) {
    TORCH_CHECK_VALUE(t->sizes() == q.sizes(), "expected ", name, " of the shape of q ",
                      shape_str(q.sizes()), ", got ", shape_str(t->sizes()));
    check_same_dtype(*t, q, name, "q");
    check_same_device(*t, q, name, "q");
    check_last_dim_contiguous(*t, name);
  }
  const auto want = lse_shape(s);
  const auto want_dtype = lse_dtype(q.scalar_type());
  for (const at::Tensor* t : {&lse, dlse ? &*dlse : nullptr}) {
    if (t == nullptr) continue;
    const char* name = t == &lse ? "lse" : "dlse";
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef(want), "expected ", name, " of shape ",
                      shape_str(want), ", got ", shape_str(t->sizes()));
    TORCH_CHECK_VALUE(t->scalar_type() == want_dtype, "expected ", name, " to be ", want_dtype,
                      ", got ", t->scalar_type());
    check_same_device(*t, q, name, "q");
    TORCH_CHECK_VALUE(t->is_contiguous(), "expected ", name, " to be contiguous, got strides ",
                      shape_str(t->strides()));
  }
}

AttnTensor attn_tensor(const at::Tensor& t, bool varlen) {
  AttnTensor a;
  a.ptr = t.defined() ? t.data_ptr() : nullptr;
  if (!t.defined()) return a;
  a.stride_b = varlen ? 0 : t.stride(0);
  a.stride_s = t.stride(varlen ? 0 : 1);
  a.stride_h = t.stride(-2);
  return a;
}

AttnParams make_attn_params(const AttnShapes& s, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                            const std::optional<at::Tensor>& cu_seqlens_q,
                            const std::optional<at::Tensor>& cu_seqlens_k, bool causal,
                            double softmax_scale, int64_t tiles, int64_t window_left,
                            int64_t window_right) {
  TORCH_CHECK_VALUE(tiles >= 0 && tiles < kAttnTileConfigs, "expected tiles in [0, ",
                    kAttnTileConfigs - 1, "], got ", tiles);
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1,
                    "expected window_size = (window_left, window_right) of ints >= -1 (-1: no "
                    "bound on that side), got (", window_left, ", ", window_right, ")");
  TORCH_CHECK_VALUE(!causal || window_right <= 0,
                    "expected window_size[1] (window_right) of -1 or 0 with causal=True (causal is "
                    "window_right = 0), got ", window_right);
  AttnParams p;
  p.q = attn_tensor(q, s.varlen);
  p.k = attn_tensor(k, s.varlen);
  p.v = attn_tensor(v, s.varlen);
  p.out = attn_tensor(out, s.varlen);
  p.lse = lse.data_ptr();
  p.lse_stride_b = s.varlen ? 0 : s.heads_q * s.seqlen_q;
  p.lse_stride_h = s.varlen ? s.total_q : s.seqlen_q;
  if (s.varlen) {
    p.cu_seqlens_q = cu_seqlens_q->data_ptr<int32_t>();
    p.cu_seqlens_k = cu_seqlens_k->data_ptr<int32_t>();
  }
  p.batch = s.batch;
  p.heads_q = s.heads_q;
  p.heads_k = s.heads_k;
  p.head_dim = s.head_dim;
  p.seqlen_q = s.seqlen_q;
  p.seqlen_k = s.seqlen_k;
  p.total_q = s.total_q;
  p.total_k = s.total_k;
  p.scale = static_cast<float>(softmax_scale);
  // A right bound is kept as the causal mask moved right by it (attention.h).
  p.causal = causal || window_right >= 0;
  p.window_right = window_right > 0 ? window_right : 0;
  p.window_left = window_left;
  p.dtype = to_dtype(q.scalar_type());
  p.tiles = static_cast<int>(tiles);
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unpack_qkv(const at::Tensor& qkv, bool varlen) {
  TORCH_CHECK_VALUE(qkv.dim() == (varlen ? 4 : 5) && qkv.size(-3) == 3, "expected qkv of shape ",
                    varlen ? "(total, 3, H, D) (with cu_seqlens)" : "(B, S, 3, H, D)", ", got ",
                    shape_str(qkv.sizes()));
  return {qkv.select(-3, 0), qkv.select(-3, 1), qkv.select(-3, 2)};
}

namespace {

// ---- torch's fused CPU kernel
//
// at::_scaled_dot_product_flash_attention_for_cpu and its backward (what
// F.scaled_dot_product_attention runs on the CPU) take (B, H, S, D) views with any strides, GQA and
// fp64 included (torch 2.11 to 2.14, checked against fp64), and return lse. Their causal mask is
// aligned to the top-left corner, ours to the bottom-right: the two agree when Sq == Sk. Used for
// fp32 and fp64 only: with bf16 inputs its lse was off by 4.3e-5 to 6.6e-5, past the tests' bound
// (4.0e-5 to 6.0e-5: twice torch's fp32 lse error plus an fp32 ulp floor) that the reference meets,
// and its output changed with the inputs' strides. On 2 cores, fp32, fwd + bwd of B16 S128 H2 D64
// causal (the tiny preset's attention) took 4.3 ms in the reference and 2.8 through fmcore's op
// with torch's kernel (F.scaled_dot_product_attention: 2.3 to 2.4). Its backward is deterministic
// too: 20 repeats (GQA 16/1, 2 threads) were bitwise equal, as the deterministic-mode test asks of
// every path. A scale that is not finite and positive goes to the reference: torch's kernel gave
// NaN in every causal row but the last with scale 0 or below, 0 for a NaN scale. It has no sliding
// window: windowed calls (attn_windowed) take the reference.
bool torch_kernel_covers(const AttnShapes& s, const at::Tensor& q, const AttnParams& p) {
  const bool full_precision = q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble;
  return full_precision && !s.varlen && q.numel() > 0 && s.seqlen_k > 0 && !attn_windowed(p) &&
         (!p.causal || s.seqlen_q == s.seqlen_k) && std::isfinite(p.scale) && p.scale > 0;
}

// (B, S, H, D) <-> (B, H, S, D)
at::Tensor heads_dim1(const at::Tensor& t) { return t.transpose(1, 2); }

// ---- CPU reference
//
// Batched: all sequences (of a batched call; one document at a time for varlen) and heads go
// through each ATen matmul and elementwise op together, the query heads of a GQA group stacked as
// rows against their kv head: (B Hk, G rows, D) @ (B Hk, D, keys). Chunked over query rows so that
// one chunk's scores stay within kChunkScores elements whatever S is. The backward recomputes the
// probabilities from lse and computes dq, dk and dv in the same pass (FlashAttention-2's five
// matmuls); it is deterministic: every op runs in a fixed order.

constexpr int64_t kChunkScores = int64_t{4} << 20;  // 16 MiB of fp32 scores per chunk
// Query rows per chunk of a causal (or windowed) call. On 2 cores (fp32, fwd + bwd): 64 beat 128,
// 256 and whole sequences by 1.1-1.5x at S = 256 and 1024, and tied them at S = 128; 32 was no
// faster than 64.
constexpr int64_t kCausalChunkRows = 64;

// (B, S, H, D) -> (B, Hk, H / Hk, S, D) contiguous in the accumulation dtype: head-major, a kv
// head's group of query heads together.
at::Tensor heads_major(const at::Tensor& t, int64_t heads_k, at::ScalarType acc) {
  return t.to(acc)
      .unflatten(2, {heads_k, t.size(2) / heads_k})
      .permute({0, 2, 3, 1, 4})
      .contiguous();
}

// Rows [m0, m0 + rows) of every head of a heads_major tensor, a kv head's group stacked: (B Hk,
// G rows, D).
at::Tensor query_rows(const at::Tensor& th, int64_t m0, int64_t rows) {
  return th.narrow(3, m0, rows).reshape({th.size(0) * th.size(1), -1, th.size(4)});
}

// (B Hk, G rows, D) back into rows [m0, m0 + rows) of a (B, S, Hq, D) tensor.
void store_rows(const at::Tensor& dst, const at::Tensor& src, int64_t m0, int64_t rows,
                int64_t heads_k) {
  const at::Tensor d = dst.narrow(1, m0, rows).unflatten(2, {heads_k, dst.size(2) / heads_k});
  d.copy_(src.view({d.size(0), d.size(2), d.size(3), rows, d.size(4)}).permute({0, 3, 1, 2, 4}));
}

// One batch of equal-length sequences: q (B, Sq, Hq, D), k and v (B, Sk, Hk, D), lse (B, Hq, Sq).
// The mask as in AttnParams: causal with window_right (the right bound), window_left (-1: none).
struct AttnBatch {
  at::Tensor q, k, v, lse;
  bool causal;
  double scale;
  int64_t window_right, window_left;
  int64_t batch() const { return q.size(0); }
  int64_t sq() const { return q.size(1); }
  int64_t sk() const { return k.size(1); }
  int64_t heads_k() const { return k.size(2); }
  // Query rows [m0, m0 + rows) see keys [first, first + count) at most (count 0: none).
  struct Keys {
    int64_t first, count;
  };
  Keys keys(int64_t m0, int64_t rows) const {
    const int64_t first = key_begin(window_left, m0, sq(), sk());
    const int64_t end = key_end(causal, window_right, m0 + rows - 1, sq(), sk());
    return {first, std::max<int64_t>(end - first, 0)};
  }
  // Rows of a chunk: its scores ((B Hq) x rows x Sk) within kChunkScores elements.
  // Causal or windowed: at most kCausalChunkRows, so that a chunk's matmuls skip most of the keys
  // its rows cannot see (a chunk scores every key any of its rows sees, for every row).
  int64_t chunk_rows() const {
    const int64_t rows = kChunkScores / std::max<int64_t>(1, batch() * q.size(2) * sk());
    return std::clamp<int64_t>(rows, 1, causal || window_left >= 0 ? kCausalChunkRows : rows);
  }
  // Keys kc (keys(m0, rows)) that the causal mask or the window hides from query rows [m0, m0 +
  // rows): a (rows, kc.count) bool mask, undefined when it hides none.
  at::Tensor hidden(int64_t m0, int64_t rows, Keys kc) const {
    // the chunk's first row sees up to the last key, its last row from the first one
    const bool right = key_end(causal, window_right, m0, sq(), sk()) < kc.first + kc.count;
    const bool left = key_begin(window_left, m0 + rows - 1, sq(), sk()) > kc.first;
    if (!right && !left) return {};
    const auto opts = q.options().dtype(at::kLong);
    const at::Tensor j = at::arange(kc.first, kc.first + kc.count, opts).unsqueeze(0);
    // each row's own key position, i + Sk - Sq
    const at::Tensor pos = at::arange(m0, m0 + rows, opts).add_(sk() - sq()).unsqueeze(1);
    at::Tensor h;
    if (right) h = j >= pos + (window_right + 1);
    if (left) {
      const at::Tensor before = j < pos - window_left;
      h = h.defined() ? h.logical_or_(before) : before;
    }
    return h;
  }
  // The scaled scores of query rows qc (query_rows at some m0) against keys kc ((B Hk, nk, D), the
  // first nk), -inf where `hidden` (m0's) hides a key: (B Hk, G rows, nk). Replaced, not added
  // (a -inf bias): a NaN or inf score of a hidden key then stays out of its row, as in the kernels.
  at::Tensor scores(const at::Tensor& qc, const at::Tensor& kc, const at::Tensor& hidden) const {
    const at::Tensor s = at::bmm(qc, kc.transpose(1, 2)).mul_(scale);
    if (hidden.defined()) {
      s.view({s.size(0), -1, hidden.size(0), hidden.size(1)})
          .masked_fill_(hidden, -std::numeric_limits<double>::infinity());
    }
    return s;
  }
};

// exp(x) in place, for x = scores minus a row's max or lse (<= 0 where a key is visible): exactly 0
// below -80 (e^-80 = 1.8e-35 is as good as 0 beside the row's largest term, 1; a key scored -inf
// then gets no weight and no gradient, as in torch), computed as exp(-80) and then zeroed, which
// keeps ATen's vectorized exp on its fast path (inputs that underflow, -inf included, took it 4 to
// 30 times longer here); the keys `hidden` hides exactly 0, whatever x held there (NaN included). A
// row whose max or lse (`row_offset`, (B Hk, G rows, 1)) is -inf sees no key, or only keys scored
// -inf: its P is exactly 0 (x is NaN there), as in the kernels: output 0, lse -inf.
void exp_visible_(const at::Tensor& x, const at::Tensor& hidden, const at::Tensor& row_offset) {
  const at::Tensor negligible = x < -80;  // (NaN is not: it stays NaN)
  x.clamp_min_(-80).exp_().masked_fill_(negligible, 0);
  if (hidden.defined()) {
    x.view({x.size(0), -1, hidden.size(0), hidden.size(1)}).masked_fill_(hidden, 0);
  }
  const at::Tensor dead = at::isneginf(row_offset);
  if (dead.any().item<bool>()) x.masked_fill_(dead, 0);
}

// Which rows of the call's tensors a batch is: all of them, or one document of a varlen call (its
// rows of the packed tensors, as a batch of one).
struct BatchRows {
  bool varlen;
  SeqInfo s;
  at::Tensor q(const at::Tensor& t) const { return rows(t, 0, s.q_start, s.q_len); }
  at::Tensor k(const at::Tensor& t) const { return rows(t, 0, s.k_start, s.k_len); }
  at::Tensor lse(const at::Tensor& t) const { return rows(t, 1, s.q_start, s.q_len); }  // (Hq, T)
  at::Tensor rows(const at::Tensor& t, int64_t dim, int64_t start, int64_t len) const {
    return varlen && t.defined() ? t.narrow(dim, start, len).unsqueeze(0) : t;
  }
};

// f(BatchRows) once for a batched call, once per document (in parallel: they write disjoint rows,
// and each one's ops then run on one thread) for a varlen one.
template <typename F>
void for_each_batch(const AttnShapes& sh, const AttnParams& p, const F& f) {
  if (!sh.varlen) {
    f(BatchRows{false, {}});
    return;
  }
  fmcore::parallel_for_aten(0, sh.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) f(BatchRows{true, seq_info(p, b)});
  });
}

// out and lse of one batch (out (B, Sq, Hq, D)).
void attn_fwd_batch(const AttnBatch& a, const at::Tensor& out) {
  const int64_t sq = a.sq(), hk = a.heads_k();
  if (out.numel() == 0) return;
  const double inf = std::numeric_limits<double>::infinity();
  if (a.sk() == 0) {
    out.zero_();
    a.lse.fill_(-inf);
    return;
  }
  const at::ScalarType acc = a.lse.scalar_type();
  const at::Tensor qh = heads_major(a.q, hk, acc);
  const at::Tensor kh = heads_major(a.k, hk, acc).flatten(0, 2);  // (B Hk, Sk, D)
  const at::Tensor vh = heads_major(a.v, hk, acc).flatten(0, 2);
  const at::Tensor lse_h = a.lse.unflatten(1, {hk, a.q.size(2) / hk});  // (B, Hk, G, Sq)
  const int64_t chunk = a.chunk_rows();
  for (int64_t m0 = 0; m0 < sq; m0 += chunk) {
    const int64_t rows = std::min(chunk, sq - m0);
    const AttnBatch::Keys kc = a.keys(m0, rows);
    const at::Tensor lse_dst = lse_h.narrow(3, m0, rows);
    if (kc.count == 0) {  // no row of the chunk sees a key
      out.narrow(1, m0, rows).zero_();
      lse_dst.fill_(-inf);
      continue;
    }
    const at::Tensor hidden = a.hidden(m0, rows, kc);
    const at::Tensor p =
        a.scores(query_rows(qh, m0, rows), kh.narrow(1, kc.first, kc.count), hidden);
    // A row that sees no key, or only keys scored -inf, has max -inf and P 0 (exp_visible_): sum 0,
    // output 0, lse -inf.
    const at::Tensor m = p.amax(-1, true);
    exp_visible_(p.sub_(m), hidden, m);
    const at::Tensor l = p.sum(-1, true);
    const at::Tensor inv_l = l.reciprocal().masked_fill_(l == 0, 0);
    const at::Tensor o = at::bmm(p, vh.narrow(1, kc.first, kc.count)).mul_(inv_l);
    store_rows(out, o, m0, rows, hk);
    lse_dst.copy_(l.log_().add_(m).view(lse_dst.sizes()));
  }
}

// dq, dk, dv of one batch (of q's, k's, v's shapes), from dout, out, lse and dlse (lse's shape, or
// undefined).
void attn_bwd_batch(const AttnBatch& a, const at::Tensor& dout, const at::Tensor& out,
                    const at::Tensor& dlse, const at::Tensor& dq, const at::Tensor& dk,
                    const at::Tensor& dv) {
  const int64_t sq = a.sq(), sk = a.sk(), hk = a.heads_k();
  if (dq.numel() == 0 || sk == 0) {  // no query, or no key: every gradient is 0
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return;
  }
  const at::ScalarType acc = a.lse.scalar_type();
  const at::Tensor qh = heads_major(a.q, hk, acc), doh = heads_major(dout, hk, acc);
  const at::Tensor kh = heads_major(a.k, hk, acc).flatten(0, 2);  // (B Hk, Sk, D)
  const at::Tensor vh = heads_major(a.v, hk, acc).flatten(0, 2);
  // delta_i = rowsum(dout_i * out_i) - dlse_i: with it dS = P * (dP - delta) also carries the
  // gradient of lse (d lse_i / d s_ij = P_ij).
  const auto group_view = [&](const at::Tensor& t) { return t.unflatten(1, {hk, t.size(1) / hk}); };
  at::Tensor delta = doh.mul(heads_major(out, hk, acc)).sum(-1);  // (B, Hk, G, Sq)
  if (dlse.defined()) delta.sub_(group_view(dlse));
  const at::Tensor lse_h = group_view(a.lse);  // (B, Hk, G, Sq)
  at::Tensor dk_acc = at::zeros_like(kh), dv_acc = at::zeros_like(vh);
  const int64_t chunk = a.chunk_rows();
  for (int64_t m0 = 0; m0 < sq; m0 += chunk) {
    const int64_t rows = std::min(chunk, sq - m0);
    const AttnBatch::Keys kcols = a.keys(m0, rows);
    if (kcols.count == 0) {
      dq.narrow(1, m0, rows).zero_();
      continue;
    }
    const auto chunk_of = [&](const at::Tensor& t) {  // (B, Hk, G, Sq) -> (B Hk, G rows, 1)
      return t.narrow(3, m0, rows).reshape({kh.size(0), -1, 1});
    };
    const at::Tensor qc = query_rows(qh, m0, rows), doc = query_rows(doh, m0, rows);
    const int64_t k0 = kcols.first, nk = kcols.count;
    const at::Tensor kc = kh.narrow(1, k0, nk), vc = vh.narrow(1, k0, nk);
    const at::Tensor hidden = a.hidden(m0, rows, kcols);
    const at::Tensor lse_c = chunk_of(lse_h);
    const at::Tensor p = a.scores(qc, kc, hidden).sub_(lse_c);  // P = exp(S - lse)
    exp_visible_(p, hidden, lse_c);
    // (bmm then add_: baddbmm_ into a narrowed accumulator ran one addmm_ per batch matrix)
    dv_acc.narrow(1, k0, nk).add_(at::bmm(p.transpose(1, 2), doc));
    const at::Tensor ds = at::bmm(doc, vc.transpose(1, 2)).sub_(chunk_of(delta)).mul_(p);
    store_rows(dq, at::bmm(ds, kc).mul_(a.scale), m0, rows, hk);
    dk_acc.narrow(1, k0, nk).add_(at::bmm(ds.transpose(1, 2), qc));
  }
  const auto store_kv = [&](const at::Tensor& dst, const at::Tensor& src) {  // (B Hk, Sk, D)
    dst.copy_(src.view({a.batch(), hk, sk, src.size(2)}).transpose(1, 2));
  };
  store_kv(dk, dk_acc.mul_(a.scale));
  store_kv(dv, dv_acc);
}

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v,
                                                      const std::optional<at::Tensor>& cu_seqlens_q,
                                                      const std::optional<at::Tensor>& cu_seqlens_k,
                                                      int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                      bool causal, double softmax_scale,
                                                      bool /*deterministic*/, int64_t tiles,
                                                      int64_t window_left, int64_t window_right) {
  const NoAutocastGuard no_autocast;
  const AttnShapes sh =
      check_attn_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty(lse_shape(sh), q.options().dtype(lse_dtype(q.scalar_type())));
  // (made first on either path: it also checks tiles)
  const AttnParams p =
      make_attn_params(sh, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale,
                       tiles, window_left, window_right);
  if (torch_kernel_covers(sh, q, p)) {
    const auto [o, l] = at::_scaled_dot_product_flash_attention_for_cpu(
        heads_dim1(q), heads_dim1(k), heads_dim1(v), 0.0, causal, std::nullopt, softmax_scale);
    out.copy_(heads_dim1(o));
    lse.copy_(l);
    return {out, lse};
  }
  for_each_batch(sh, p, [&](const BatchRows& r) {
    attn_fwd_batch({r.q(q), r.k(k), r.k(v), r.lse(lse), p.causal, softmax_scale, p.window_right,
                    p.window_left},
                   r.q(out));
  });
  return {out, lse};
}

// The backward into dq, dk, dv (of q's, k's, v's shapes; views of a packed gradient allowed).
void flash_attn_bwd_cpu_into(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                             const std::optional<at::Tensor>& dlse,
                             const std::optional<at::Tensor>& cu_seqlens_q,
                             const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                             int64_t max_seqlen_k, bool causal, double softmax_scale, int64_t tiles,
                             int64_t window_left, int64_t window_right, at::Tensor& dq,
                             at::Tensor& dk, at::Tensor& dv) {
  const NoAutocastGuard no_autocast;
  const AttnShapes sh =
      check_attn_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  check_attn_grads(sh, q, dout, out, lse, dlse);
  const AttnParams p =
      make_attn_params(sh, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale,
                       tiles, window_left, window_right);
  if (!dlse.has_value() && torch_kernel_covers(sh, q, p)) {
    const auto [gq, gk, gv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        heads_dim1(dout), heads_dim1(q), heads_dim1(k), heads_dim1(v), heads_dim1(out), lse, 0.0,
        causal, std::nullopt, softmax_scale);
    dq.copy_(heads_dim1(gq));
    dk.copy_(heads_dim1(gk));
    dv.copy_(heads_dim1(gv));
    return;
  }
  const at::Tensor dlse_t = dlse.value_or(at::Tensor());
  for_each_batch(sh, p, [&](const BatchRows& r) {
    attn_bwd_batch({r.q(q), r.k(k), r.k(v), r.lse(lse), p.causal, softmax_scale, p.window_right,
                    p.window_left},
                   r.q(dout), r.q(out), r.lse(dlse_t), r.q(dq), r.k(dk), r.k(dv));
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double softmax_scale,
    bool /*deterministic: both CPU paths always are*/, int64_t tiles, int64_t window_left,
    int64_t window_right) {
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  flash_attn_bwd_cpu_into(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, causal, softmax_scale, tiles, window_left, window_right, dq,
                          dk, dv);
  return {dq, dk, dv};
}

at::Tensor flash_attn_qkvpacked_bwd_cpu(const at::Tensor& dout, const at::Tensor& qkv,
                                        const at::Tensor& out, const at::Tensor& lse,
                                        const std::optional<at::Tensor>& dlse,
                                        const std::optional<at::Tensor>& cu_seqlens,
                                        int64_t max_seqlen, bool causal, double softmax_scale,
                                        bool /*deterministic*/, int64_t tiles,
                                        int64_t window_left, int64_t window_right) {
  const auto [q, k, v] = unpack_qkv(qkv, cu_seqlens.has_value());
  at::Tensor dqkv = at::empty(qkv.sizes(), qkv.options());
  auto [dq, dk, dv] = unpack_qkv(dqkv, cu_seqlens.has_value());
  flash_attn_bwd_cpu_into(dout, q, k, v, out, lse, dlse, cu_seqlens, cu_seqlens, max_seqlen,
                          max_seqlen, causal, softmax_scale, tiles, window_left, window_right, dq,
                          dk, dv);
  return dqkv;
}

}  // namespace

TORCH_LIBRARY_IMPL(fmcore, CPU, m) {
  m.impl("flash_attn_fwd", &flash_attn_fwd_cpu);
  m.impl("flash_attn_bwd", &flash_attn_bwd_cpu);
  m.impl("flash_attn_qkvpacked_bwd", &flash_attn_qkvpacked_bwd_cpu);
}

}  // namespace fmcore
