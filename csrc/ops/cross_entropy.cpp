// Softmax cross-entropy: argument checks, the device-independent op bodies, the CPU reference and
// its registration. The math is documented in kernels/cross_entropy.h.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu_math.h"
#include "cpu_rows.h"
#include "cross_entropy_op.h"

namespace fmcore {

at::ScalarType ce_acc_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_ce_options(const CeOptions& o) {
  TORCH_CHECK_VALUE(o.label_smoothing >= 0.0 && o.label_smoothing <= 1.0,
                    "expected label_smoothing in [0, 1], got ", o.label_smoothing);
  TORCH_CHECK_VALUE(std::isfinite(o.z_loss) && o.z_loss >= 0.0, "expected z_loss >= 0, got ",
                    o.z_loss);
}

namespace {

void check_ce_inputs(const at::Tensor& logits, const at::Tensor& target, const CeOptions& o,
                     bool writes_logits) {
  check_float(logits, "logits");
  check_dim(logits, 2, "logits", "(N, V)");
  TORCH_CHECK_VALUE(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
                    "expected target to be int64 or int32, got ", target.scalar_type());
  check_same_device(target, logits, "target", "logits");
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == N, "expected target of shape (N,) = (",
                    N, ",) to match logits ", shape_str(logits.sizes()), ", got ",
                    shape_str(target.sizes()));
  TORCH_CHECK_VALUE(V >= 1 && V <= std::numeric_limits<int32_t>::max(),
                    "expected logits with 1 <= V < 2^31 classes, got shape ",
                    shape_str(logits.sizes()));
  check_last_dim_contiguous(logits, "logits");
  if (writes_logits) {
    TORCH_CHECK_VALUE(N <= 1 || logits.stride(0) >= V,
                      "expected logits with non-overlapping rows (row stride >= V) to receive the "
                      "gradient in place, got strides ",
                      shape_str(logits.strides()));
  }
  check_ce_options(o);
}

// Per-row fp32 (fp64 for fp64 logits) values: (N,) when cols == 0 (any stride: grad_loss may be
// expanded), else (N, cols).
void check_rows(const at::Tensor& t, const at::Tensor& logits, const char* name, int64_t cols = 0,
                const char* logits_name = "logits") {
  check_same_device(t, logits, name, logits_name);
  const auto acc = ce_acc_type(logits);
  TORCH_CHECK_VALUE(t.scalar_type() == acc, "expected ", name, " to be ", acc, ", got ",
                    t.scalar_type());
  const int64_t N = logits.size(0);
  if (cols == 0) {
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == N, "expected ", name, " of shape (N,) = (", N,
                      ",), got ", shape_str(t.sizes()));
  } else {
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == N && t.size(1) == cols, "expected ", name,
                      " of shape (N, ", cols, ") = (", N, ", ", cols, "), got ",
                      shape_str(t.sizes()));
  }
}

}  // namespace

void raise_if_bad_target(const CeTargetCheck& check, const CeOptions& o, int64_t vocab) {
  if (!check) return;
  const int64_t value = check();
  TORCH_CHECK_VALUE(value == o.ignore_index, "expected target values in [0, ", vocab,
                    ") or ignore_index (", o.ignore_index, "), got ", value);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_op(const at::Tensor& logits,
                                                        const at::Tensor& target,
                                                        const CeOptions& o, const CeDevice& dev) {
  check_ce_inputs(logits, target, o, false);
  const auto acc = logits.options().dtype(ce_acc_type(logits));
  at::Tensor loss = at::empty({logits.size(0)}, acc), stats = at::empty({logits.size(0), 2}, acc);
  const at::Tensor tgt = target.contiguous();
  // Checked before the loss kernel is queued and waited for after: see cross_entropy_cuda.cpp.
  const CeTargetCheck check = dev.check_target(tgt, o.ignore_index, logits.size(1));
  dev.run({logits, tgt, loss, stats, {}, {}}, o, CeMode::kFwd);
  raise_if_bad_target(check, o, logits.size(1));
  return {loss, stats};
}

at::Tensor cross_entropy_bwd_op(const at::Tensor& logits, const at::Tensor& target,
                                const at::Tensor& stats, const at::Tensor& grad_loss,
                                const CeOptions& o, bool inplace, const CeDevice& dev) {
  check_ce_inputs(logits, target, o, inplace);
  check_rows(stats, logits, "stats", 2);
  check_rows(grad_loss, logits, "grad_loss");
  at::Tensor grad = inplace ? logits : at::empty(logits.sizes(), logits.options());
  dev.run({logits, target.contiguous(), {}, stats.contiguous(), grad, grad_loss}, o, CeMode::kBwd);
  return grad;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_bwd_op(const at::Tensor& logits,
                                                            const at::Tensor& target,
                                                            const at::Tensor& grad_scale,
                                                            const CeOptions& o,
                                                            const CeDevice& dev) {
  check_ce_inputs(logits, target, o, true);
  check_rows(grad_scale, logits, "grad_scale");
  const auto acc = logits.options().dtype(ce_acc_type(logits));
  at::Tensor loss = at::empty({logits.size(0)}, acc), stats = at::empty({logits.size(0), 2}, acc);
  const at::Tensor tgt = target.contiguous();
  const CeTargetCheck check = dev.check_target(tgt, o.ignore_index, logits.size(1));
  dev.run({logits, tgt, loss, stats, logits, grad_scale}, o, CeMode::kFwdGrad);
  raise_if_bad_target(check, o, logits.size(1));
  return {loss, stats};
}

void cross_entropy_scale_op(const at::Tensor& grad, const at::Tensor& factor, const CeDevice& dev) {
  check_float(grad, "grad");
  check_dim(grad, 2, "grad", "(N, V)");
  check_last_dim_contiguous(grad, "grad");
  TORCH_CHECK_VALUE(grad.size(0) <= 1 || grad.stride(0) >= grad.size(1),
                    "expected grad with non-overlapping rows (row stride >= V), got strides ",
                    shape_str(grad.strides()));
  TORCH_CHECK_VALUE(grad.size(1) <= std::numeric_limits<int32_t>::max(),
                    "expected grad with V < 2^31 columns, got shape ", shape_str(grad.sizes()));
  check_rows(factor, grad, "factor", 0, "grad");
  dev.run({grad, {}, {}, {}, grad, factor}, {}, CeMode::kScale);
}

namespace {

// ---- CPU: grad[n, :] *= grad_scale[n] (kScale).

template <typename T, typename Acc>
void scale_cpu(const CeTensors& t) {
  const int64_t N = t.grad.size(0), V = t.grad.size(1), stride = t.grad.stride(0);
  T* G = t.grad.data_ptr<T>();
  const Acc* scale = t.grad_scale.const_data_ptr<Acc>();
  const int64_t s_stride = t.grad_scale.stride(0);
  if (V == 0) return;  // a (N, 0) gradient: nothing to scale
  at::parallel_for(0, N, rows_per_task(V), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const Acc s = scale[n * s_stride];
      if (s == 1) continue;  // as the kernel: rows whose factor is 1 are not touched
      T* g = G + n * stride;
      for (int64_t v = 0; v < V; ++v) g[v] = static_cast<T>(static_cast<Acc>(g[v]) * s);
    }
  });
}

// ---- CPU implementation: rows in parallel, each in Acc (bf16/fp16 rows converted through a
// buffer, cpu_rows.h) and computed in a few vectorized passes while it is in cache: its maximum m;
// e^(x - m) (the one exponential per logit), written into the gradient's row or a buffer; their
// sum; the gradient as e^(x - m) c - b, c = sc (1 + 2 zl lse) e^-logsum. The backward computes
// e^(x - m) from the saved m and the same c, so the fused forward + gradient and the backward give
// the gradient bitwise alike. On 2 cores at (2048, 4096) fp32, the in-place forward + gradient
// took 5.3 ms in blocks of ATen ops (a pass and a temporary per op; 32 ms in the scalar std::exp
// loops before those) and takes 2.1 ms so; the forward 4.5 -> 1.9 ms.
// fp32 rows are read and written where they are: copying them cost 0.5 ms of the 2.6.

// The reductions are OpenMP SIMD loops (the build compiles with OpenMP): the compiler keeps
// partial results in vector lanes and combines them in a fixed order for the build, so a row's sums
// do not depend on the thread count. (Without the pragma it would not vectorize a float max or sum:
// that reorders the operations.) NaN logits are passed over by the max; they make the row's sum,
// loss and gradient NaN.
template <typename Acc>
[[gnu::always_inline]] inline Acc simd_max(const Acc* x, int64_t n) {
  Acc m = -std::numeric_limits<Acc>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t v = 0; v < n; ++v) m = x[v] > m ? x[v] : m;
  return m;
}

template <typename Acc>
[[gnu::always_inline]] inline Acc simd_sum(const Acc* x, int64_t n, Acc shift = 0) {
  Acc sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t v = 0; v < n; ++v) sum += x[v] - shift;
  return sum;
}

// The row passes, compiled for several vector widths (cpu_math.h); fp64 for fp64 logits (tests).
FMCORE_CPU_CLONES float row_max(const float* x, int64_t n) { return simd_max(x, n); }
double row_max(const double* x, int64_t n) { return simd_max(x, n); }
FMCORE_CPU_CLONES float row_sum(const float* x, int64_t n) { return simd_sum(x, n); }
double row_sum(const double* x, int64_t n) { return simd_sum(x, n); }
// sum of x - m: label smoothing's mean logit relative to the max. Summing x itself lost the
// row's spread to its offset (logits 1e4 + randn: 40x torch's error) or overflowed (3e38).
FMCORE_CPU_CLONES float row_sum_minus(const float* x, float m, int64_t n) {
  return simd_sum(x, n, m);
}
double row_sum_minus(const double* x, double m, int64_t n) { return simd_sum(x, n, m); }
// e = e^(x - m) (x and e may be the same memory)
FMCORE_CPU_CLONES void row_exp(const float* x, float* e, float m, int64_t n) {
  for (int64_t v = 0; v < n; ++v) e[v] = exp_saturated(x[v] - m);
}
void row_exp(const double* x, double* e, double m, int64_t n) {
  for (int64_t v = 0; v < n; ++v) e[v] = exp_saturated(x[v] - m);
}
// e -> e c - b
FMCORE_CPU_CLONES void row_affine(float* e, float c, float b, int64_t n) {
  for (int64_t v = 0; v < n; ++v) e[v] = e[v] * c - b;
}
void row_affine(double* e, double c, double b, int64_t n) {
  for (int64_t v = 0; v < n; ++v) e[v] = e[v] * c - b;
}

// Row `row` (n elements) of the 2-D tensor t, as Acc values: t's own memory when t is of dtype Acc
// (no copy), otherwise `buffer`, loaded with the row first.
template <typename Acc>
struct RowIn {
  const at::Tensor& t;
  bool direct;
  explicit RowIn(const at::Tensor& t)
      : t(t), direct(t.scalar_type() == c10::CppTypeToScalarType<Acc>()) {}
  const Acc* get(int64_t row, int64_t n, Acc* buffer) const {
    if (direct) return t.const_data_ptr<Acc>() + row * t.stride(0);
    load_row(t, row * t.stride(0), n, buffer);
    return buffer;
  }
};

template <typename Acc>
void cross_entropy_cpu(const CeTensors& t, const CeOptions& o, CeMode mode) {
  const int64_t N = t.logits.size(0), V = t.logits.size(1);
  const bool fwd = mode != CeMode::kBwd, grad = t.grad.defined();
  const Acc eps = static_cast<Acc>(o.label_smoothing), zl = static_cast<Acc>(o.z_loss);
  const Acc* scale = grad ? t.grad_scale.const_data_ptr<Acc>() : nullptr;
  const int64_t s_stride = grad ? t.grad_scale.stride(0) : 0;
  Acc* loss = fwd ? t.loss.mutable_data_ptr<Acc>() : nullptr;
  Acc* stats = t.stats.mutable_data_ptr<Acc>();  // (m, logsum) per row: written (fwd) or read (bwd)
  const at::Tensor target = t.target.to(at::kLong);
  const int64_t* tgt = target.const_data_ptr<int64_t>();
  const RowIn<Acc> logits(t.logits);
  // The exponentials, then the gradient, are written into the gradient's row when it is of dtype
  // Acc (it may be the logits' own: each element is read before it is written), else a buffer.
  const bool grad_direct = grad && t.grad.scalar_type() == c10::CppTypeToScalarType<Acc>();
  at::parallel_for(0, N, rows_per_task(V), [&](int64_t begin, int64_t end) {
    std::vector<Acc> x_buf(logits.direct ? 0 : V), e_buf(grad_direct ? 0 : V);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t tn = tgt[n];
      const bool ignored = tn == o.ignore_index, in_range = tn >= 0 && tn < V;
      const Acc sc = grad ? scale[n * s_stride] : Acc(0);
      Acc* e = grad_direct ? t.grad.mutable_data_ptr<Acc>() + n * t.grad.stride(0) : e_buf.data();
      // Ignored rows (and, in the backward, rows scaled by 0) are not read: loss 0, stats (0, 0),
      // gradient 0.
      if (ignored || (!fwd && sc == 0)) {
        if (fwd) {
          loss[n] = 0;
          stats[2 * n] = stats[2 * n + 1] = 0;
        }
        if (grad) {
          std::fill(e, e + V, Acc(0));
          if (!grad_direct) store_row(t.grad, n * t.grad.stride(0), V, e);
        }
        continue;
      }
      const Acc* x = logits.get(n, V, x_buf.data());
      Acc m, logsum;
      if (fwd) {
        m = row_max(x, V);
        const Acc x_t = in_range ? x[tn] : Acc(0);  // an out-of-range target raises after the call
        // (a row of -inf: NaN, as torch's)
        const Acc mean_x_minus_m = eps != 0 ? row_sum_minus(x, m, V) / V : Acc(0);
        // a row of -inf: e^(-inf - 0) = 0 (not e^NaN), logsum -inf, as in the kernel
        row_exp(x, e, m == -std::numeric_limits<Acc>::infinity() ? Acc(0) : m, V);
        logsum = std::log(row_sum(e, V));
        Acc l = logsum - (x_t - m);
        if (eps != 0) l = l * (1 - eps) + (logsum - mean_x_minus_m) * eps;
        if (zl != 0) l += zl * (m + logsum) * (m + logsum);
        loss[n] = l;
        stats[2 * n] = m;
        stats[2 * n + 1] = logsum;
      } else {
        m = stats[2 * n];
        logsum = stats[2 * n + 1];
        row_exp(x, e, m, V);
      }
      if (!grad) continue;
      // grad = sc (p (1 + 2 zl (m + logsum)) - eps / V - (1 - eps) [v == target]),
      // p = e^(x - m) e^-logsum
      const Acc c = sc * (1 + 2 * zl * (m + logsum)) * std::exp(-logsum);
      row_affine(e, c, sc * eps / V, V);
      if (in_range) e[tn] -= sc * (1 - eps);
      if (!grad_direct) store_row(t.grad, n * t.grad.stride(0), V, e);
    }
  });
}

void run_cpu(const CeTensors& t, const CeOptions& o, CeMode mode) {
  if (mode != CeMode::kScale) {
    ce_acc_type(t.logits) == at::kDouble ? cross_entropy_cpu<double>(t, o, mode)
                                         : cross_entropy_cpu<float>(t, o, mode);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, t.grad.scalar_type(), "cross_entropy_scale_cpu", [&] {
        scale_cpu<scalar_t, std::conditional_t<std::is_same_v<scalar_t, double>, double, float>>(t);
      });
}

// On the CPU the targets are simply read now.
template <typename TI>
int64_t first_bad_target(const at::Tensor& target, int64_t ignore_index, int64_t vocab) {
  const TI* t = target.const_data_ptr<TI>();
  for (int64_t n = 0; n < target.numel(); ++n) {
    const int64_t v = static_cast<int64_t>(t[n]);
    if (v != ignore_index && (v < 0 || v >= vocab)) return v;
  }
  return ignore_index;
}

CeTargetCheck check_target_cpu(const at::Tensor& target, int64_t ignore_index, int64_t vocab) {
  const int64_t bad = target.scalar_type() == at::kLong
                          ? first_bad_target<int64_t>(target, ignore_index, vocab)
                          : first_bad_target<int32_t>(target, ignore_index, vocab);
  return [bad] { return bad; };
}

}  // namespace

constexpr CeDevice kCpuDevice{&run_cpu, &check_target_cpu};

TORCH_LIBRARY_IMPL(fmcore, CPU, m) { register_cross_entropy<kCpuDevice>(m); }

}  // namespace fmcore
