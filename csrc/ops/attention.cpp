// Flash attention: argument checks, the CPU reference implementation and its registration.
//
// The CPU path is the math reference, exact in fp32 (fp64 for fp64 inputs), chunked so that it
// never holds an S x S matrix: the forward and dq work on blocks of kBlockM query rows against the
// keys those rows see ((kBlockM, Sk) scores), dk/dv on blocks of kBlockN keys against kChunkQ query
// rows at a time. Like the CUDA kernels, the backward recomputes the probabilities from lse and is
// deterministic by construction: every output element is written by one task in a fixed order.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "attention_op.h"
#include "checks.h"
#include "parallel.h"

namespace fmcore {

namespace {

constexpr int64_t kBlockM = 64;   // query rows per forward / dq task
constexpr int64_t kBlockN = 64;   // keys per dk/dv task
constexpr int64_t kChunkQ = 256;  // query rows per step inside a dk/dv task

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
                            double softmax_scale, int64_t tiles) {
  TORCH_CHECK_VALUE(tiles >= 0 && tiles < kAttnTileConfigs, "expected tiles in [0, ",
                    kAttnTileConfigs - 1, "], got ", tiles);
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
  p.causal = causal;
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

// ---- CPU reference

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Sequence b of a batched (B, S, H, D) or packed (T, H, D) tensor, as (S_b, H, D).
at::Tensor seq_of(const at::Tensor& t, bool varlen, int64_t b, int64_t start, int64_t len) {
  return varlen ? t.narrow(0, start, len) : t.select(0, b);
}

// Rows [r0, r0 + n) of head h of sequence b, as an (n, D) matrix in the accumulation dtype.
struct Seqs {
  bool varlen;
  at::ScalarType acc;
  at::Tensor rows(const at::Tensor& t, int64_t b, int64_t start, int64_t len, int64_t r0, int64_t n,
                  int64_t h) const {
    return seq_of(t, varlen, b, start, len).narrow(0, r0, n).select(1, h).to(acc);
  }
  at::Tensor out_rows(const at::Tensor& t, int64_t b, int64_t start, int64_t len, int64_t r0,
                      int64_t n, int64_t h) const {
    return seq_of(t, varlen, b, start, len).narrow(0, r0, n).select(1, h);
  }
};

// Overwrites the (rows, cols) scores s (already scaled) of query rows i0.. against keys j0.. with
// the probabilities exp(s - lse_i), 0 where the mask hides the key or the row sees no key.
template <typename A>
void probs_from_lse(A* s, int64_t rows, int64_t cols, int64_t i0, int64_t j0, const A* lse,
                    bool causal, const SeqInfo& seq) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t end =
        key_end(causal, i0 + r, seq.q_len, seq.k_len) - j0;  // visible cols: [0, end)
    A* row = s + r * cols;
    const A l = lse[r];
    for (int64_t c = 0; c < cols; ++c) {
      row[c] = (c < end && std::isfinite(l)) ? std::exp(row[c] - l) : A(0);
    }
  }
}

template <typename A>
void attn_fwd_cpu_impl(const AttnShapes& sh, const AttnParams& p, double scale, const at::Tensor& q,
                       const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                       const at::Tensor& lse) {
  const Seqs seqs{sh.varlen, lse.scalar_type()};
  const int64_t group = sh.heads_q / sh.heads_k, nblocks = ceil_div(sh.seqlen_q, kBlockM);
  A* lse_ptr = lse.data_ptr<A>();
  fmcore::parallel_for_aten(0, sh.batch * sh.heads_q * nblocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t mb = task % nblocks, h = task / nblocks % sh.heads_q,
                    b = task / nblocks / sh.heads_q;
      const SeqInfo s = seq_info(p, b);
      const int64_t m0 = mb * kBlockM;
      if (m0 >= s.q_len) continue;
      const int64_t rows = std::min(kBlockM, s.q_len - m0);
      const int64_t nk =
          key_end(p.causal, m0 + rows - 1, s.q_len, s.k_len);  // the block's widest row
      A* l_out = lse_ptr + b * p.lse_stride_b + h * p.lse_stride_h + s.q_start + m0;
      at::Tensor o = seqs.out_rows(out, b, s.q_start, s.q_len, m0, rows, h);
      if (nk == 0) {  // no row of the block sees a key
        o.zero_();
        std::fill(l_out, l_out + rows, -std::numeric_limits<A>::infinity());
        continue;
      }
      const at::Tensor qb = seqs.rows(q, b, s.q_start, s.q_len, m0, rows, h);
      const at::Tensor kb = seqs.rows(k, b, s.k_start, s.k_len, 0, nk, h / group);
      const at::Tensor vb = seqs.rows(v, b, s.k_start, s.k_len, 0, nk, h / group);
      at::Tensor sc = at::mm(qb, kb.t()).mul_(scale);  // (rows, nk), contiguous
      at::Tensor inv_l = at::empty({rows, 1}, sc.options());
      A* sp = sc.data_ptr<A>();
      A* il = inv_l.data_ptr<A>();
      for (int64_t r = 0; r < rows; ++r) {
        A* row = sp + r * nk;
        const int64_t ke = key_end(p.causal, m0 + r, s.q_len, s.k_len);
        if (ke == 0) {
          std::fill(row, row + nk, A(0));
          l_out[r] = -std::numeric_limits<A>::infinity();
          il[r] = 0;
          continue;
        }
        const A mx = *std::max_element(row, row + ke);
        A sum = 0;
        for (int64_t c = 0; c < ke; ++c) sum += (row[c] = std::exp(row[c] - mx));
        std::fill(row + ke, row + nk, A(0));
        l_out[r] = mx + std::log(sum);
        il[r] = A(1) / sum;
      }
      o.copy_(at::mm(sc, vb).mul_(inv_l));
    }
  });
}

template <typename A>
void attn_bwd_cpu_impl(const AttnShapes& sh, const AttnParams& p, double scale,
                       const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                       const std::optional<at::Tensor>& dlse, const at::Tensor& dq,
                       const at::Tensor& dk, const at::Tensor& dv) {
  const Seqs seqs{sh.varlen, lse.scalar_type()};
  const int64_t group = sh.heads_q / sh.heads_k;
  const A* lse_ptr = lse.data_ptr<A>();
  const A* dlse_ptr = dlse ? dlse->data_ptr<A>() : nullptr;
  // delta_i = rowsum(dout_i * out_i) - dlse_i: with it dS = P * (dP - delta) also carries the
  // gradient of lse (d lse_i / d s_ij = P_ij).
  at::Tensor delta = at::empty_like(lse);
  A* delta_ptr = delta.data_ptr<A>();
  auto row_off = [&](int64_t b, int64_t h, const SeqInfo& s, int64_t i0) {
    return b * p.lse_stride_b + h * p.lse_stride_h + s.q_start + i0;
  };

  // Pass 1: delta and dq, one task per (batch, query head, block of kBlockM queries).
  const int64_t mblocks = ceil_div(sh.seqlen_q, kBlockM);
  fmcore::parallel_for_aten(0, sh.batch * sh.heads_q * mblocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t mb = task % mblocks, h = task / mblocks % sh.heads_q,
                    b = task / mblocks / sh.heads_q;
      const SeqInfo s = seq_info(p, b);
      const int64_t m0 = mb * kBlockM;
      if (m0 >= s.q_len) continue;
      const int64_t rows = std::min(kBlockM, s.q_len - m0);
      const int64_t off = row_off(b, h, s, m0);
      const at::Tensor dob = seqs.rows(dout, b, s.q_start, s.q_len, m0, rows, h);
      const at::Tensor ob = seqs.rows(out, b, s.q_start, s.q_len, m0, rows, h);
      const at::Tensor dsum = (dob * ob).sum(1);
      const A* ds = dsum.data_ptr<A>();
      for (int64_t r = 0; r < rows; ++r)
        delta_ptr[off + r] = ds[r] - (dlse_ptr ? dlse_ptr[off + r] : A(0));
      at::Tensor dqb = seqs.out_rows(dq, b, s.q_start, s.q_len, m0, rows, h);
      const int64_t nk = key_end(p.causal, m0 + rows - 1, s.q_len, s.k_len);
      if (nk == 0) {
        dqb.zero_();
        continue;
      }
      const at::Tensor qb = seqs.rows(q, b, s.q_start, s.q_len, m0, rows, h);
      const at::Tensor kb = seqs.rows(k, b, s.k_start, s.k_len, 0, nk, h / group);
      const at::Tensor vb = seqs.rows(v, b, s.k_start, s.k_len, 0, nk, h / group);
      at::Tensor pr = at::mm(qb, kb.t()).mul_(scale);
      probs_from_lse(pr.data_ptr<A>(), rows, nk, m0, 0, lse_ptr + off, p.causal, s);
      const at::Tensor dp = at::mm(dob, vb.t());
      const at::Tensor dsc = pr * (dp - at::from_blob(delta_ptr + off, {rows, 1}, pr.options()));
      dqb.copy_(at::mm(dsc, kb).mul_(scale));
    }
  });

  // Pass 2: dk and dv, one task per (batch, kv head, block of kBlockN keys), looping over the query
  // heads of the GQA group and the queries that see the block, kChunkQ rows at a time.
  const int64_t nblocks = ceil_div(sh.seqlen_k, kBlockN);
  fmcore::parallel_for_aten(0, sh.batch * sh.heads_k * nblocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t nb = task % nblocks, hk = task / nblocks % sh.heads_k,
                    b = task / nblocks / sh.heads_k;
      const SeqInfo s = seq_info(p, b);
      const int64_t n0 = nb * kBlockN;
      if (n0 >= s.k_len) continue;
      const int64_t cols = std::min(kBlockN, s.k_len - n0);
      const at::Tensor kb = seqs.rows(k, b, s.k_start, s.k_len, n0, cols, hk);
      const at::Tensor vb = seqs.rows(v, b, s.k_start, s.k_len, n0, cols, hk);
      at::Tensor dkb = at::zeros({cols, sh.head_dim}, kb.options());
      at::Tensor dvb = at::zeros({cols, sh.head_dim}, kb.options());
      const int64_t i_begin = query_begin(p.causal, n0, s.q_len, s.k_len);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t i0 = i_begin; i0 < s.q_len; i0 += kChunkQ) {
          const int64_t rows = std::min(kChunkQ, s.q_len - i0);
          const int64_t off = row_off(b, h, s, i0);
          const at::Tensor qb = seqs.rows(q, b, s.q_start, s.q_len, i0, rows, h);
          const at::Tensor dob = seqs.rows(dout, b, s.q_start, s.q_len, i0, rows, h);
          at::Tensor pr = at::mm(qb, kb.t()).mul_(scale);  // (rows, cols)
          probs_from_lse(pr.data_ptr<A>(), rows, cols, i0, n0, lse_ptr + off, p.causal, s);
          const at::Tensor dp = at::mm(dob, vb.t());
          const at::Tensor dsc =
              pr * (dp - at::from_blob(delta_ptr + off, {rows, 1}, pr.options()));
          dvb.addmm_(pr.t(), dob);
          dkb.addmm_(dsc.t(), qb);
        }
      }
      seqs.out_rows(dk, b, s.k_start, s.k_len, n0, cols, hk).copy_(dkb.mul_(scale));
      seqs.out_rows(dv, b, s.k_start, s.k_len, n0, cols, hk).copy_(dvb);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v,
                                                      const std::optional<at::Tensor>& cu_seqlens_q,
                                                      const std::optional<at::Tensor>& cu_seqlens_k,
                                                      int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                      bool causal, double softmax_scale,
                                                      bool /*deterministic*/, int64_t tiles) {
  const NoAutocastGuard no_autocast;
  const AttnShapes sh =
      check_attn_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty(lse_shape(sh), q.options().dtype(lse_dtype(q.scalar_type())));
  const AttnParams p =
      make_attn_params(sh, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale,
                       tiles);
  if (lse.scalar_type() == at::kDouble) {
    attn_fwd_cpu_impl<double>(sh, p, softmax_scale, q, k, v, out, lse);
  } else {
    attn_fwd_cpu_impl<float>(sh, p, softmax_scale, q, k, v, out, lse);
  }
  return {out, lse};
}

// The backward into dq, dk, dv (of q's, k's, v's shapes; views of a packed gradient allowed).
void flash_attn_bwd_cpu_into(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                             const std::optional<at::Tensor>& dlse,
                             const std::optional<at::Tensor>& cu_seqlens_q,
                             const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                             int64_t max_seqlen_k, bool causal, double softmax_scale, int64_t tiles,
                             at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const NoAutocastGuard no_autocast;
  const AttnShapes sh =
      check_attn_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  check_attn_grads(sh, q, dout, out, lse, dlse);
  const AttnParams p =
      make_attn_params(sh, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale,
                       tiles);
  if (lse.scalar_type() == at::kDouble) {
    attn_bwd_cpu_impl<double>(sh, p, softmax_scale, dout, q, k, v, out, lse, dlse, dq, dk, dv);
  } else {
    attn_bwd_cpu_impl<float>(sh, p, softmax_scale, dout, q, k, v, out, lse, dlse, dq, dk, dv);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double softmax_scale,
    bool /*deterministic: the reference always is*/, int64_t tiles) {
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  flash_attn_bwd_cpu_into(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, causal, softmax_scale, tiles, dq, dk, dv);
  return {dq, dk, dv};
}

at::Tensor flash_attn_qkvpacked_bwd_cpu(const at::Tensor& dout, const at::Tensor& qkv,
                                        const at::Tensor& out, const at::Tensor& lse,
                                        const std::optional<at::Tensor>& dlse,
                                        const std::optional<at::Tensor>& cu_seqlens,
                                        int64_t max_seqlen, bool causal, double softmax_scale,
                                        bool /*deterministic*/, int64_t tiles) {
  const auto [q, k, v] = unpack_qkv(qkv, cu_seqlens.has_value());
  at::Tensor dqkv = at::empty(qkv.sizes(), qkv.options());
  auto [dq, dk, dv] = unpack_qkv(dqkv, cu_seqlens.has_value());
  flash_attn_bwd_cpu_into(dout, q, k, v, out, lse, dlse, cu_seqlens, cu_seqlens, max_seqlen,
                          max_seqlen, causal, softmax_scale, tiles, dq, dk, dv);
  return dqkv;
}

}  // namespace

TORCH_LIBRARY_IMPL(fmcore, CPU, m) {
  m.impl("flash_attn_fwd", &flash_attn_fwd_cpu);
  m.impl("flash_attn_bwd", &flash_attn_bwd_cpu);
  m.impl("flash_attn_qkvpacked_bwd", &flash_attn_qkvpacked_bwd_cpu);
}

}  // namespace fmcore
