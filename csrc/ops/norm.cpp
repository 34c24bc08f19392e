// Fused residual add + LayerNorm / RMSNorm: argument checks, the CPU reference implementation and
// its registration. The math is in kernels/norm.h.
#include "norm_op.h"

#include <cmath>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu_rows.h"
#include "fp64_sum.h"

namespace fmcore {

namespace {

void check_out_dtype(at::ScalarType st, const at::Tensor& x) {
  const bool ok = st == at::kFloat || st == at::kBFloat16 || st == at::kHalf ||
                  (st == at::kDouble && x.device().is_cpu());
  TORCH_CHECK_VALUE(ok, "expected out_dtype to be float32, bfloat16 or float16",
                    x.device().is_cpu() ? " (or float64 on the CPU)" : "", ", got ", st);
}

void check_vector(const at::Tensor& t, int64_t D, const char* name, const at::Tensor& x) {
  check_float(t, name);
  check_same_device(t, x, name, "x");
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == D, "expected ", name, " of shape (D,) = (", D,
                    ",) (the last dim of x ", shape_str(x.sizes()), "), got ", shape_str(t.sizes()));
}

// fp32 statistics, fp64 when the stream itself is fp64 (the CPU reference serving gradcheck).
at::ScalarType stats_dtype(at::ScalarType stream) {
  return stream == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

AddNormFwd prepare_add_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                double eps, bool rms, at::ScalarType out_dtype) {
  check_float(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) >= 1,
                    "expected x of shape (..., D) with D >= 1, got ", shape_str(x.sizes()));
  const int64_t D = x.size(-1);
  TORCH_CHECK_VALUE(eps >= 0 && std::isfinite(eps), "expected eps >= 0, got ", eps);
  check_vector(weight, D, "weight", x);
  if (residual.has_value()) {
    check_float(*residual, "residual");
    check_same_device(*residual, x, "residual", "x");
    TORCH_CHECK_VALUE(residual->sizes() == x.sizes(), "expected residual of the shape of x ",
                      shape_str(x.sizes()), ", got ", shape_str(residual->sizes()));
  }
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(!rms, "expected no bias for kind 'rms' (RMSNorm has none)");
    check_vector(*bias, D, "bias", x);
    check_same_dtype(*bias, weight, "bias", "weight");
  }
  check_out_dtype(out_dtype, x);
  if (x.is_cuda()) {
    TORCH_CHECK_VALUE(D <= kAddNormMaxDim, "expected the last dim of x to be at most ",
                      kAddNormMaxDim, " on CUDA, got ", D);
  }

  AddNormFwd f;
  f.x = x.contiguous();
  f.weight = weight.contiguous();
  if (residual.has_value()) f.residual = residual->contiguous();
  if (bias.has_value()) f.bias = bias->contiguous();
  const int64_t rows = x.numel() / D;
  const at::ScalarType stream =
      residual.has_value() ? at::promote_types(x.scalar_type(), residual->scalar_type())
                           : x.scalar_type();
  const auto opts = x.options();
  f.out = at::empty(x.sizes(), opts.dtype(out_dtype));
  f.residual_out = at::empty(residual.has_value() ? x.sizes() : at::IntArrayRef{0}, opts.dtype(stream));
  f.mean = at::empty({rms ? 0 : rows}, opts.dtype(stats_dtype(stream)));
  f.rstd = at::empty({rows}, opts.dtype(stats_dtype(stream)));

  AddNormParams& p = f.p;
  p.x = f.x.data_ptr();
  p.residual = residual.has_value() ? f.residual.data_ptr() : nullptr;
  p.weight = f.weight.data_ptr();
  p.bias = bias.has_value() ? f.bias.data_ptr() : nullptr;
  p.out = f.out.data_ptr();
  p.residual_out = residual.has_value() ? f.residual_out.data_ptr() : nullptr;
  p.mean = rms ? nullptr : static_cast<float*>(f.mean.data_ptr());  // fp32 on CUDA
  p.rstd = static_cast<float*>(f.rstd.data_ptr());
  p.rows = rows;
  p.dim = D;
  p.eps = static_cast<float>(eps);
  p.rms = rms;
  p.x_dtype = to_dtype(x.scalar_type());
  p.residual_dtype = residual.has_value() ? to_dtype(residual->scalar_type()) : p.x_dtype;
  p.residual_out_dtype = to_dtype(stream);
  p.out_dtype = to_dtype(out_dtype);
  p.weight_dtype = to_dtype(weight.scalar_type());
  return f;
}

AddNormBwd prepare_add_norm_bwd(const at::Tensor& grad_out,
                                const std::optional<at::Tensor>& grad_residual_out,
                                const at::Tensor& s, const at::Tensor& weight,
                                const at::Tensor& mean, const at::Tensor& rstd, bool rms,
                                bool has_residual, bool has_bias, at::ScalarType x_dtype,
                                std::optional<at::ScalarType> residual_dtype, bool grad_input,
                                bool grad_weight) {
  check_float(s, "s");
  // The forward's checks, again: this op is public, and rows = numel / D below divides by D.
  TORCH_CHECK_VALUE(s.dim() >= 1 && s.size(-1) >= 1,
                    "expected s of shape (..., D) with D >= 1, got ", shape_str(s.sizes()));
  const int64_t D = s.size(-1);
  if (s.is_cuda()) {
    TORCH_CHECK_VALUE(D <= kAddNormMaxDim, "expected the last dim of s to be at most ",
                      kAddNormMaxDim, " on CUDA, got ", D);
  }
  check_vector(weight, D, "weight", s);
  check_float(grad_out, "grad_out");
  check_same_device(grad_out, s, "grad_out", "s");
  TORCH_CHECK_VALUE(grad_out.sizes() == s.sizes(), "expected grad_out of the shape of s ",
                    shape_str(s.sizes()), ", got ", shape_str(grad_out.sizes()));
  if (grad_residual_out.has_value()) {
    TORCH_CHECK_VALUE(has_residual, "expected no grad_residual_out without a residual");
    check_same_device(*grad_residual_out, s, "grad_residual_out", "s");
    check_same_dtype(*grad_residual_out, s, "grad_residual_out", "s");
    TORCH_CHECK_VALUE(grad_residual_out->sizes() == s.sizes(), "expected grad_residual_out of the shape of s ",
                      shape_str(s.sizes()), ", got ", shape_str(grad_residual_out->sizes()));
  }
  const int64_t rows = s.numel() / D;
  const at::ScalarType acc = stats_dtype(s.scalar_type());
  TORCH_CHECK_VALUE(rstd.scalar_type() == acc && rstd.numel() == rows && mean.scalar_type() == acc &&
                        mean.numel() == (rms ? 0 : rows),
                    "expected mean and rstd from the forward of this s");
  check_same_device(rstd, s, "rstd", "s");
  check_same_device(mean, s, "mean", "s");
  check_out_dtype(x_dtype, s);
  // Without a residual s is x, and the CUDA kernel reads s in x_dtype: another dtype would be read
  // with the wrong element size (past the end of s for a 2-byte s read as fp32).
  TORCH_CHECK_VALUE(has_residual || x_dtype == s.scalar_type(),
                    "expected x_dtype to be the dtype of s (", s.scalar_type(),
                    ") without a residual (s is x), got ", x_dtype);
  if (residual_dtype.has_value()) check_out_dtype(*residual_dtype, s);

  AddNormBwd b;
  b.grad_out = grad_out.contiguous();
  if (grad_residual_out.has_value()) b.grad_residual_out = grad_residual_out->contiguous();
  b.s = s.contiguous();
  b.weight = weight.contiguous();
  b.mean = mean.contiguous();
  b.rstd = rstd.contiguous();
  const auto opts = s.options();
  const bool grad_residual = grad_input && residual_dtype.has_value();
  const int64_t zero = 0;
  const at::IntArrayRef none(zero);  // (0,): a gradient not asked for
  b.grad_x = at::empty(grad_input ? s.sizes() : none, opts.dtype(x_dtype));
  b.grad_residual = at::empty(grad_residual ? s.sizes() : none,
                              opts.dtype(residual_dtype.value_or(s.scalar_type())));
  b.grad_weight = at::empty({grad_weight ? D : 0}, opts.dtype(weight.scalar_type()));
  b.grad_bias = at::empty({has_bias ? D : 0}, opts.dtype(weight.scalar_type()));

  AddNormParams& p = b.p;
  p.weight = b.weight.data_ptr();
  if (has_residual) {
    p.residual_out = b.s.data_ptr();
  } else {
    p.x = b.s.data_ptr();
  }
  p.mean = rms ? nullptr : static_cast<float*>(b.mean.data_ptr());
  p.rstd = static_cast<float*>(b.rstd.data_ptr());
  p.grad_out = b.grad_out.data_ptr();
  p.grad_residual_out = grad_residual_out.has_value() ? b.grad_residual_out.data_ptr() : nullptr;
  p.grad_x = grad_input ? b.grad_x.data_ptr() : nullptr;
  p.grad_residual = grad_residual ? b.grad_residual.data_ptr() : nullptr;
  p.grad_weight = grad_weight ? b.grad_weight.data_ptr() : nullptr;
  p.grad_bias = has_bias ? b.grad_bias.data_ptr() : nullptr;
  p.rows = rows;
  p.dim = D;
  p.rms = rms;
  p.x_dtype = to_dtype(x_dtype);
  p.residual_dtype = to_dtype(residual_dtype.value_or(s.scalar_type()));
  p.residual_out_dtype = to_dtype(s.scalar_type());
  p.out_dtype = to_dtype(grad_out.scalar_type());
  p.weight_dtype = to_dtype(weight.scalar_type());
  return b;
}

namespace {

// ---- CPU reference: the arithmetic of kernels/norm.h, one row at a time (cpu_rows.h).

// Row sums in fp64 (sum_fp64): a sequential fp32 sum over thousands of features loses digits that
// the CUDA kernel's tree reduction keeps.
// eps as the caller gave it: p.eps is the CUDA kernels' fp32 copy, and an fp64 call normalised
// with 1e-5 rounded to fp32 (relative error 2.5e-9 where torch's is 4e-16).
template <typename Acc>
void add_norm_fwd_rows(const AddNormFwd& f, double eps) {
  const AddNormParams& p = f.p;
  const int64_t D = p.dim;
  const bool has_residual = p.residual != nullptr, has_bias = p.bias != nullptr;
  Acc* mean = f.mean.mutable_data_ptr<Acc>();
  Acc* rstd = f.rstd.mutable_data_ptr<Acc>();
  at::parallel_for(0, p.rows, rows_per_task(D), [&](int64_t begin, int64_t end) {
    std::vector<Acc> s(D), r(D), w(D), b(D, Acc(0));
    load_row(f.weight, 0, D, w.data());
    if (has_bias) load_row(f.bias, 0, D, b.data());
    for (int64_t row = begin; row < end; ++row) {
      const int64_t off = row * D;
      load_row(f.x, off, D, s.data());
      if (has_residual) {
        load_row(f.residual, off, D, r.data());
        for (int64_t i = 0; i < D; ++i) s[i] += r[i];
        store_row(f.residual_out, off, D, s.data());
        load_row(f.residual_out, off, D, s.data());  // the statistics see the stored (rounded) sum
      }
      const double sum = p.rms ? 0.0 : sum_fp64(D, [&](int64_t i) { return s[i]; });
      const double mean_d = sum / static_cast<double>(D);
      const Acc mu = static_cast<Acc>(mean_d);
      // About the fp64 mean, squared in fp64: an fp32 square overflowed for |x - mean| > 1.8e19
      // (rstd 0, the output the bias, silently, as torch's fp32 statistics still give; the CUDA
      // kernel retries such a row scaled by 2^-72), and the fp32-rounded mean added its rounding
      // error squared to a row whose spread is below it.
      const double sq = sum_fp64(D, [&](int64_t i) {
        const double d = static_cast<double>(s[i]) - mean_d;
        return d * d;
      });
      const Acc rs = static_cast<Acc>(1.0 / std::sqrt(sq / static_cast<double>(D) + eps));
      if (!p.rms) mean[row] = mu;
      rstd[row] = rs;
      for (int64_t i = 0; i < D; ++i) s[i] = (s[i] - mu) * rs * w[i] + b[i];
      store_row(f.out, off, D, s.data());
    }
  });
}

template <typename Acc>
void add_norm_bwd_rows(const AddNormBwd& bw) {
  const AddNormParams& p = bw.p;
  const int64_t D = p.dim;
  // Only the gradients asked for: the row gradient (grad_x), the dweight and dbias sums.
  const bool want_x = p.grad_x != nullptr, want_w = p.grad_weight != nullptr,
             want_b = p.grad_bias != nullptr;
  if (!want_x && !want_w && !want_b) return;
  const Acc* mean = p.rms ? nullptr : bw.mean.const_data_ptr<Acc>();
  const Acc* rstd = bw.rstd.const_data_ptr<Acc>();
  const int64_t n_part = partial_rows(p.rows);  // dweight/dbias: fixed blocks (cpu_rows.h)
  std::vector<Acc> part(want_w || want_b ? static_cast<size_t>(n_part * 2 * D) : 0, Acc(0));
  at::parallel_for(0, n_part, 1, [&](int64_t begin, int64_t end) {
    std::vector<Acc> xh(D), g(D), dy(D), w(D), gr(D);
    if (want_x) load_row(bw.weight, 0, D, w.data());
    for (int64_t blk = begin; blk < end; ++blk) {
      Acc* dw = want_w ? part.data() + blk * 2 * D : nullptr;
      Acc* db = want_b ? part.data() + blk * 2 * D + D : nullptr;
      for (int64_t row = blk * kRowsPerPartial; row < std::min(p.rows, (blk + 1) * kRowsPerPartial); ++row) {
        const int64_t off = row * D;
        const Acc mu = p.rms ? Acc(0) : mean[row], rs = rstd[row];
        load_row(bw.s, off, D, xh.data());
        load_row(bw.grad_out, off, D, dy.data());
        for (int64_t i = 0; i < D; ++i) xh[i] = (xh[i] - mu) * rs;
        if (dw != nullptr) {
          for (int64_t i = 0; i < D; ++i) dw[i] += dy[i] * xh[i];
        }
        if (db != nullptr) {
          for (int64_t i = 0; i < D; ++i) db[i] += dy[i];
        }
        if (!want_x) continue;
        for (int64_t i = 0; i < D; ++i) g[i] = dy[i] * w[i];
        const double sum_gx = sum_fp64(D, [&](int64_t i) { return g[i] * xh[i]; });
        const double sum_g = p.rms ? 0.0 : sum_fp64(D, [&](int64_t i) { return g[i]; });
        const Acc c1 = static_cast<Acc>(sum_gx / static_cast<double>(D));
        const Acc c2 = p.rms ? Acc(0) : static_cast<Acc>(sum_g / static_cast<double>(D));
        if (p.grad_residual_out != nullptr) {
          load_row(bw.grad_residual_out, off, D, gr.data());
        } else {
          std::fill(gr.begin(), gr.end(), Acc(0));
        }
        for (int64_t i = 0; i < D; ++i) g[i] = rs * (g[i] - c2 - xh[i] * c1) + gr[i];
        store_row(bw.grad_x, off, D, g.data());
        if (p.grad_residual != nullptr) store_row(bw.grad_residual, off, D, g.data());
      }
    }
  });
  if (!want_w && !want_b) return;
  // each block's partial rows: dweight, then dbias
  if (want_w) store_row(bw.grad_weight, 0, D, add_partial_rows(part, n_part, 2 * D, 0, D).data());
  if (want_b) store_row(bw.grad_bias, 0, D, add_partial_rows(part, n_part, 2 * D, D, D).data());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_norm_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, double eps, bool rms, at::ScalarType out_dtype) {
  const NoAutocastGuard no_autocast;
  AddNormFwd f = prepare_add_norm_fwd(x, residual, weight, bias, eps, rms, out_dtype);
  if (f.rstd.scalar_type() == at::kDouble) {
    add_norm_fwd_rows<double>(f, eps);
  } else {
    add_norm_fwd_rows<float>(f, eps);
  }
  return {f.out, f.residual_out, f.mean, f.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_norm_bwd_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& s, const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd,
    bool rms, bool has_residual, bool has_bias, at::ScalarType x_dtype,
    std::optional<at::ScalarType> residual_dtype, bool grad_input, bool grad_weight) {
  const NoAutocastGuard no_autocast;
  AddNormBwd b =
      prepare_add_norm_bwd(grad_out, grad_residual_out, s, weight, mean, rstd, rms, has_residual,
                           has_bias, x_dtype, residual_dtype, grad_input, grad_weight);
  if (b.rstd.scalar_type() == at::kDouble) {
    add_norm_bwd_rows<double>(b);
  } else {
    add_norm_bwd_rows<float>(b);
  }
  return {b.grad_x, b.grad_residual, b.grad_weight, b.grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fmcore, CPU, m) {
  m.impl("add_norm_fwd", &add_norm_fwd_cpu);
  m.impl("add_norm_bwd", &add_norm_bwd_cpu);
}

}  // namespace fmcore
