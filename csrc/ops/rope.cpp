// RoPE: argument checks, the CPU reference implementation and its registration.
#include "rope_op.h"

#include <algorithm>
#include <functional>
#include <optional>
#include <type_traits>
#include <vector>

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"

namespace fmcore {

namespace {

RopeTensor view_of(const at::Tensor& in, const at::Tensor& out, int64_t seq_dim) {
  const int64_t head_dim = seq_dim == 1 ? 2 : 1;
  RopeTensor t;
  t.in = in.data_ptr();
  t.out = out.data_ptr();
  t.heads = in.size(head_dim);
  t.in_stride_b = in.stride(0);
  t.in_stride_s = in.stride(seq_dim);
  t.in_stride_h = in.stride(head_dim);
  t.out_stride_b = out.stride(0);
  t.out_stride_s = out.stride(seq_dim);
  t.out_stride_h = out.stride(head_dim);
  return t;
}

}  // namespace

RopeParams make_rope_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                            const at::Tensor& sin, bool interleaved, bool conjugate, int64_t seq_dim,
                            const at::Tensor& q_out, const at::Tensor& k_out) {
  TORCH_CHECK_VALUE(seq_dim == 1 || seq_dim == 2,
                    "expected seq_dim 1 (q of shape (B, S, H, D)) or 2 ((B, H, S, D)), got ", seq_dim);
  const char* layout = seq_dim == 1 ? "(B, S, H, D)" : "(B, H, S, D)";
  check_dim(q, 4, "q", layout);
  check_dim(k, 4, "k", layout);
  check_float(q, "q");
  check_same_dtype(k, q, "k", "q");
  check_same_device(k, q, "k", "q");
  check_same_device(cos, q, "cos", "q");
  check_same_device(sin, q, "sin", "q");
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  const int64_t head_dim_idx = seq_dim == 1 ? 2 : 1;
  const int64_t B = q.size(0), S = q.size(seq_dim), Hq = q.size(head_dim_idx), D = q.size(3);
  const int64_t Hk = k.size(head_dim_idx);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(seq_dim) == S && k.size(3) == D, "expected k of shape ",
                    seq_dim == 1 ? "(B, S, Hk, D) = (" : "(B, Hk, S, D) = (", B, ", ",
                    seq_dim == 1 ? std::to_string(S) + ", Hk" : "Hk, " + std::to_string(S), ", ", D,
                    ") to match q ", shape_str(q.sizes()), ", got ", shape_str(k.sizes()));
  TORCH_CHECK_VALUE(Hk > 0 && Hq % Hk == 0, "expected the heads of k (", Hk,
                    ") to divide the heads of q (", Hq, ")");

  TORCH_CHECK_VALUE(cos.scalar_type() == at::kFloat || cos.scalar_type() == q.scalar_type(),
                    "expected cos to be float32 or q's dtype (", q.scalar_type(), "), got ",
                    cos.scalar_type());
  check_same_dtype(sin, cos, "sin", "cos");
  TORCH_CHECK_VALUE(cos.dim() == 2 || cos.dim() == 3,
                    "expected cos of shape (S, R/2) or (B, S, R/2), got ", shape_str(cos.sizes()));
  TORCH_CHECK_VALUE(sin.sizes() == cos.sizes(), "expected sin of the shape of cos ",
                    shape_str(cos.sizes()), ", got ", shape_str(sin.sizes()));
  const int64_t half = cos.size(-1), rotary = 2 * half;
  const char* cos_shape = cos.dim() == 3 ? "(B, S, R/2)" : "(S, R/2)";
  TORCH_CHECK_VALUE(half >= 1 && rotary <= D, "expected cos of shape ", cos_shape,
                    " with 2 <= R <= head dim ", D, ", got ", shape_str(cos.sizes()),
                    " (R = ", rotary, ")");
  TORCH_CHECK_VALUE(cos.size(-2) >= S, "expected cos of shape ", cos_shape, " with S >= ", S,
                    " (the sequence length of q), got ", shape_str(cos.sizes()));
  if (cos.dim() == 3) {
    TORCH_CHECK_VALUE(cos.size(0) == B || cos.size(0) == 1, "expected cos of shape (B, S, R/2) with B = ",
                      B, " or 1, got ", shape_str(cos.sizes()));
  }
  TORCH_CHECK_VALUE(cos.strides() == sin.strides(), "expected sin with the strides of cos ",
                    shape_str(cos.strides()), ", got ", shape_str(sin.strides()));
  check_last_dim_contiguous(cos, "cos");

  RopeParams p;
  p.q = view_of(q, q_out, seq_dim);
  p.k = view_of(k, k_out, seq_dim);
  p.cos = cos.data_ptr();
  p.sin = sin.data_ptr();
  p.cs_stride_b = (cos.dim() == 3 && cos.size(0) > 1) ? cos.stride(0) : 0;
  p.cs_stride_s = cos.stride(-2);
  p.batch = B;
  p.seqlen = S;
  p.head_dim = D;
  p.rotary_dim = rotary;
  p.x_dtype = to_dtype(q.scalar_type());
  p.cs_dtype = to_dtype(cos.scalar_type());
  p.interleaved = interleaved;
  p.conjugate = conjugate;
  return p;
}

namespace {

// Whether views a and b of one storage, with the same strides, reach a common element: whether
// off_b - off_a = sum_i d_i stride_i for some d_i in [-(b.size(i) - 1), a.size(i) - 1]. Dims taken
// outermost first; when a dim's stride exceeds the span the inner dims can reach (the layouts of
// slices of one buffer), only floor(r / stride) and the next integer can leave a remainder they
// reach, so the search is exact and at most 2^dim steps. std::nullopt: a layout beyond that.
std::optional<bool> views_intersect(const at::Tensor& a, const at::Tensor& b) {
  std::vector<int64_t> dims;
  for (int64_t i = 0; i < a.dim(); ++i) {
    if (a.size(i) > 1 || b.size(i) > 1) dims.push_back(i);
  }
  std::sort(dims.begin(), dims.end(),
            [&](int64_t x, int64_t y) { return a.stride(x) > a.stride(y); });
  std::vector<int64_t> span(dims.size() + 1, 0);  // span[j]: the largest |sum| dims j.. reach
  for (size_t j = dims.size(); j-- > 0;) {
    const int64_t d = dims[j];
    if (a.stride(d) <= span[j + 1]) return std::nullopt;  // (stride 0 included)
    span[j] = span[j + 1] + (std::max(a.size(d), b.size(d)) - 1) * a.stride(d);
  }
  const std::function<bool(size_t, int64_t)> reach = [&](size_t j, int64_t r) {
    if (j == dims.size()) return r == 0;
    const int64_t d = dims[j], st = a.stride(d);
    const int64_t lo = -(b.size(d) - 1), hi = a.size(d) - 1;
    const int64_t f = r >= 0 ? r / st : -((-r + st - 1) / st);  // floor(r / st)
    for (int64_t c : {f, f + 1}) {
      if (c >= lo && c <= hi && reach(j + 1, r - c * st)) return true;
    }
    return false;
  };
  return reach(0, b.storage_offset() - a.storage_offset());
}

// Whether a and b step alike through memory along every dim either spans (a size-1 dim's stride
// is arbitrary: a view may set it to anything).
bool same_strides(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t i = 0; i < a.dim(); ++i) {
    if ((a.size(i) > 1 || b.size(i) > 1) && a.stride(i) != b.stride(i)) return false;
  }
  return true;
}

// Whether the element ranges [lowest, highest] that views a and b of one storage reach intersect.
bool extents_meet(const at::Tensor& a, const at::Tensor& b) {
  const auto range = [](const at::Tensor& t) {
    int64_t lo = t.storage_offset(), hi = t.storage_offset();
    for (int64_t i = 0; i < t.dim(); ++i) {
      const int64_t reach = (t.size(i) - 1) * t.stride(i);
      (reach < 0 ? lo : hi) += reach;
    }
    return std::pair{lo, hi};
  };
  const auto [a_lo, a_hi] = range(a);
  const auto [b_lo, b_hi] = range(b);
  return a_lo <= b_hi && b_lo <= a_hi;
}

}  // namespace

void check_rope_inplace(const at::Tensor& q, const at::Tensor& k) {
  // Each element is rotated where it is stored: one reachable through two indices (an expanded q)
  // or through both q and k (k is q) would be rotated twice, silently. Strided views into one
  // buffer (q and k slices of a fused qkv projection) are what the in-place op is for: allowed.
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}}) {
    TORCH_CHECK_VALUE(at::has_internal_overlap(*t) != at::MemOverlap::Yes,
                      "in-place rope: elements of ", name, " share memory (an expanded or stride-0 ",
                      "tensor); rotate a copy or use inplace=False");
  }
  at::MemOverlapStatus qk = at::get_overlap_status(q, k);
  // TooHard: views of one storage that are not contiguous (q and k sliced off one buffer, or slices
  // that overlap by an off-by-one): decided exactly when they share their strides (where a dim
  // holds more than one element); otherwise refused where their extents meet (k = q[:, :, ::2]
  // had both rotated twice where they met, silently).
  if (qk == at::MemOverlapStatus::TooHard && q.is_alias_of(k) && q.numel() > 0 && k.numel() > 0) {
    std::optional<bool> hit;
    if (same_strides(q, k)) hit = views_intersect(q, k);
    if (!hit.has_value()) hit = extents_meet(q, k);
    qk = *hit ? at::MemOverlapStatus::Partial : at::MemOverlapStatus::No;
  }
  TORCH_CHECK_VALUE(qk != at::MemOverlapStatus::Full && qk != at::MemOverlapStatus::Partial,
                    "in-place rope: q and k share memory (k is q, or they overlap; views of one ",
                    "buffer with other strides are refused where their extents meet); rotate them ",
                    "separately or use inplace=False");
}

namespace {

// ---- CPU reference: the same arithmetic as the CUDA kernel, one (b, s) row at a time.

template <typename T, typename CS, typename Acc = std::conditional_t<std::is_same_v<T, double>, double, float>>
void rope_tensor_cpu(const RopeTensor& t, const RopeParams& p, int64_t b, int64_t s, const CS* cos,
                     const CS* sin) {
  const int64_t half = p.rotary_dim / 2;
  const Acc sign = p.conjugate ? -1 : 1;
  for (int64_t h = 0; h < t.heads; ++h) {
    const T* x = static_cast<const T*>(t.in) + b * t.in_stride_b + s * t.in_stride_s + h * t.in_stride_h;
    T* y = static_cast<T*>(t.out) + b * t.out_stride_b + s * t.out_stride_s + h * t.out_stride_h;
    for (int64_t i = 0; i < half; ++i) {
      const int64_t ia = p.interleaved ? 2 * i : i;
      const int64_t ib = p.interleaved ? 2 * i + 1 : i + half;
      const Acc xa = static_cast<Acc>(x[ia]), xb = static_cast<Acc>(x[ib]);
      const Acc co = static_cast<Acc>(cos[i]), si = sign * static_cast<Acc>(sin[i]);
      y[ia] = static_cast<T>(xa * co - xb * si);
      y[ib] = static_cast<T>(xb * co + xa * si);
    }
    if (x != y) {
      for (int64_t i = p.rotary_dim; i < p.head_dim; ++i) y[i] = x[i];
    }
  }
}

template <typename T, typename CS>
void rope_cpu_impl(const RopeParams& p) {
  at::parallel_for(0, p.batch * p.seqlen, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / p.seqlen, s = row % p.seqlen;
      const int64_t off = b * p.cs_stride_b + s * p.cs_stride_s;
      const CS* cos = static_cast<const CS*>(p.cos) + off;
      const CS* sin = static_cast<const CS*>(p.sin) + off;
      rope_tensor_cpu<T, CS>(p.q, p, b, s, cos, sin);
      rope_tensor_cpu<T, CS>(p.k, p, b, s, cos, sin);
    }
  });
}

void run_rope_cpu(const RopeParams& p, at::ScalarType x, at::ScalarType cs) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x, "rope_cpu", [&] {
    using T = scalar_t;
    if (cs == at::kFloat) {
      rope_cpu_impl<T, float>(p);
    } else {
      rope_cpu_impl<T, T>(p);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& cos, const at::Tensor& sin,
                                            bool interleaved, bool conjugate, int64_t seq_dim) {
  check_float(q, "q");  // before empty_like, so an integer q fails with a clear message
  at::Tensor q_out = at::empty_like(q), k_out = at::empty_like(k);
  const RopeParams p = make_rope_params(q, k, cos, sin, interleaved, conjugate, seq_dim, q_out, k_out);
  run_rope_cpu(p, q.scalar_type(), cos.scalar_type());
  return {q_out, k_out};
}

void rope_inplace_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                      const at::Tensor& sin, bool interleaved, bool conjugate, int64_t seq_dim) {
  check_rope_inplace(q, k);
  const RopeParams p = make_rope_params(q, k, cos, sin, interleaved, conjugate, seq_dim, q, k);
  run_rope_cpu(p, q.scalar_type(), cos.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fmcore, CPU, m) {
  m.impl("rope", &rope_cpu);
  m.impl("rope_", &rope_inplace_cpu);
}

}  // namespace fmcore
