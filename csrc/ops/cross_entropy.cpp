// Softmax cross-entropy: argument checks, the device-independent op bodies, the CPU reference and
// its registration. The math is documented in kernels/cross_entropy.h.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "checks.h"
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

// ---- CPU reference: blocks of rows in vectorized ATen ops (max; sum of exponentials; gradient).

template <typename T, typename Acc>
void scale_cpu(const CeTensors& t) {
  const int64_t N = t.grad.size(0), V = t.grad.size(1), stride = t.grad.stride(0);
  T* G = t.grad.data_ptr<T>();
  const Acc* scale = t.grad_scale.const_data_ptr<Acc>();
  const int64_t s_stride = t.grad_scale.stride(0);
  // A (N, 0) gradient has nothing to scale, and the grain below would divide by V = 0 (undefined
  // behaviour that -O3 happened to hide; UBSan reported it in scripts/sanitize_cpu.sh asan).
  if (V == 0) return;
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / V), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const Acc s = scale[n * s_stride];
      if (s == 1) continue;  // as the kernel: rows whose factor is 1 are not touched
      T* g = G + n * stride;
      for (int64_t v = 0; v < V; ++v) g[v] = static_cast<T>(static_cast<Acc>(g[v]) * s);
    }
  });
}

// Logits per block of the CPU reference: 256K (1 MiB in fp32), so that a block's passes (max, exp
// and sum, the gradient) and their temporaries stay in cache. On 2 cores at (2048, 4096) fp32, the
// in-place forward + gradient took 7.7 ms with these blocks, 9.4 with 1M (temporaries past the
// cache, freshly paged in each time), 13.6 with 64K (ATen's cost per op), and 32 with the scalar
// loops (std::exp) this replaced; 4.9 ms since it computes x - m in place. The forward: 3.0 ms
// (20.8 before).
constexpr int64_t kCpuBlockElems = int64_t{1} << 18;

// Rows [r0, r0 + n) of the forward (loss, stats) and/or the gradient, in ATen ops: each a
// vectorized pass over the block (the exponentials through ATen's vectorized exp). x - m is
// computed in x's own memory when the gradient may overwrite it (a gradient written into the
// logits, or x a float32 copy of bf16/fp16 logits). The gradient is e^((x - m) - logsum) in the
// forward + gradient and in the backward alike, so that both give it bitwise.
void cross_entropy_cpu_rows(const CeTensors& t, const CeOptions& o, CeMode mode, int64_t r0,
                            int64_t n) {
  const auto acc = ce_acc_type(t.logits);
  const int64_t V = t.logits.size(1);
  const double inf = std::numeric_limits<double>::infinity();
  const double eps = o.label_smoothing, zl = o.z_loss;
  const bool x_is_copy = t.logits.scalar_type() != acc;
  const bool grad_in_logits = t.grad.defined() && t.grad.is_same(t.logits);
  const bool overwrite_x = x_is_copy || grad_in_logits;
  const at::Tensor x = t.logits.narrow(0, r0, n).to(acc);  // a view when the logits are fp32
  const at::Tensor target = t.target.narrow(0, r0, n).to(at::kLong).unsqueeze(1);  // (n, 1)
  const at::Tensor ignored = target == o.ignore_index;
  // (check_target_cpu reports the targets out of range that are not ignored)
  const at::Tensor in_range = (target >= 0).logical_and_(target < V);
  const at::Tensor out_of_range = in_range.logical_not();
  const at::Tensor stats = t.stats.narrow(0, r0, n);
  at::Tensor m, logsum;  // (n, 1); see kernels/cross_entropy.h for why the pair and not their sum
  at::Tensor shifted;    // x - m
  if (mode == CeMode::kBwd) {
    m = stats.narrow(1, 0, 1);
    logsum = stats.narrow(1, 1, 1);
    shifted = overwrite_x ? x.sub_(m) : x - m;
  } else {
    m = x.amax(1, true);  // a NaN propagates, as in the kernel
    const at::Tensor zt =
        x.gather(1, target.masked_fill(out_of_range, 0)).masked_fill_(out_of_range, 0);
    const at::Tensor sum_x = eps != 0 ? x.sum(1, true) : at::Tensor();
    // A row of -inf sums e^(-inf - 0) = 0 (not e^NaN): logsum -inf, as in the kernel.
    const at::Tensor m_safe = m.masked_fill(m == -inf, 0);
    shifted = overwrite_x ? x.sub_(m_safe) : x - m_safe;
    logsum = shifted.exp().sum(1, true).log_();
    at::Tensor loss = logsum - (zt - m);
    if (eps != 0) loss = loss.mul_(1 - eps).add_((logsum - (sum_x / V - m)).mul_(eps));
    if (zl != 0) loss.add_((m + logsum).square_().mul_(zl));
    t.loss.narrow(0, r0, n).copy_(loss.squeeze(1).masked_fill_(ignored.squeeze(1), 0));
    stats.copy_(at::cat({m, logsum}, 1).masked_fill_(ignored, 0));
  }
  if (!t.grad.defined()) return;
  // grad = sc * (p * (1 + 2 z (m + logsum)) - eps / V - (1 - eps) [v == target])
  const at::Tensor sc = t.grad_scale.narrow(0, r0, n).unsqueeze(1);
  const at::Tensor g = shifted.sub_(logsum).exp_().mul_(sc * (1 + 2 * zl * (m + logsum)));
  if (eps != 0) g.sub_(sc * (eps / V));
  const at::Tensor miss = in_range.logical_and(ignored.logical_not()).logical_not_();
  g.scatter_add_(1, target.masked_fill(miss, 0), (sc * -(1 - eps)).masked_fill_(miss, 0));
  // Ignored rows are 0; so are the backward's rows scaled by 0, whatever their logits (as the
  // kernel, which does not read them).
  const at::Tensor zero = mode == CeMode::kBwd ? ignored.logical_or(sc == 0) : ignored;
  if (zero.any().item<bool>()) g.masked_fill_(zero, 0);
  if (!(grad_in_logits && !x_is_copy)) t.grad.narrow(0, r0, n).copy_(g);  // else g is there
}

void cross_entropy_cpu(const CeTensors& t, const CeOptions& o, CeMode mode) {
  const int64_t N = t.logits.size(0), V = t.logits.size(1);
  const int64_t rows = std::max<int64_t>(1, kCpuBlockElems / V);
  for (int64_t r0 = 0; r0 < N; r0 += rows) {
    cross_entropy_cpu_rows(t, o, mode, r0, std::min(rows, N - r0));
  }
}

void run_cpu(const CeTensors& t, const CeOptions& o, CeMode mode) {
  if (mode != CeMode::kScale) {
    cross_entropy_cpu(t, o, mode);
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
