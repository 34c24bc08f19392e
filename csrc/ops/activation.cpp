// Bias + GELU and SwiGLU: argument checks, the CPU implementations and their registration. The
// math is in kernels/activation.h, in fp32 (fp64 for fp64 inputs). On the CPU, SwiGLU and bias +
// GELU's tanh form (GPT-2's) are loops of fmcore's own; the erf form is ATen's gelu /
// gelu_backward.
#include "activation_op.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include <torch/library.h>

#include "checks.h"
#include "cpu_math.h"
#include "cpu_rows.h"

namespace fmcore {

namespace {

BiasGelu prepare_bias_gelu(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                           bool tanh) {
  check_float(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "expected x of shape (..., D), got a scalar");
  const int64_t D = x.size(-1);
  BiasGelu g;
  g.x = x.contiguous();
  if (bias.has_value()) {
    check_same_device(*bias, x, "bias", "x");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == D, "expected bias of shape (D,) = (", D,
                      ",) (the last dim of x ", shape_str(x.sizes()), "), got ",
                      shape_str(bias->sizes()));
    const auto bt = bias->scalar_type();
    TORCH_CHECK_VALUE(bt == x.scalar_type() || (bt == at::kFloat && x.scalar_type() != at::kDouble),
                      "expected bias to have the dtype of x (", x.scalar_type(), ")",
                      x.scalar_type() != at::kDouble ? " or float32" : "", ", got ", bt);
    g.bias = bias->contiguous();
  }
  BiasGeluParams& p = g.p;
  p.x = g.x.data_ptr();
  p.bias = bias.has_value() ? g.bias.data_ptr() : nullptr;
  p.rows = D == 0 ? 0 : x.numel() / D;
  p.dim = D;
  p.tanh = tanh;
  p.x_dtype = to_dtype(x.scalar_type());
  p.bias_dtype = bias.has_value() ? to_dtype(bias->scalar_type()) : p.x_dtype;
  return g;
}

// The math dtype of an input: fp32, fp64 for fp64.
at::ScalarType math_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// ---- GELU's tanh form, fmcore's loop: one pass (bias add, GELU, and in the backward the bias
// gradient's partial sums) over rows loaded into Acc. ATen's tanh GELU is slow on the CPU (1M fp32
// values, 2 cores: 831 us, its erf GELU 188 us, and the bias add before it 150 us); the op so takes
// 384 us forward and 576 us backward where torch's gelu(x + b) takes 979 and 1244 (with the bias
// gradient's sum). Written as z sigmoid(2u), which is torch's 0.5 z (1 + tanh(u))
// (1 + tanh(u) = 2 sigmoid(2u)) with one exponential and no cancellation where tanh(u) ~ -1.

constexpr double kSqrt2OverPi = 0.7978845608028654, kCubic = 0.044715;  // torch's constants

// sigmoid(2u), u = sqrt(2 / pi) (z + 0.044715 z^3)
template <typename Acc>
inline Sigmoid<Acc> sigmoid_2u(Acc z) {
  constexpr Acc k1 = 2 * kSqrt2OverPi, k3 = 2 * kSqrt2OverPi * kCubic;
  return Sigmoid<Acc>(exp_saturated(-z * (k1 + k3 * z * z)));
}

// out = z sigmoid(2u)
template <typename Acc>
inline Acc gelu_tanh(Acc z) {
  return z * sigmoid_2u(z).s;
}

// d out / dz = s + 2 z s (1 - s) sqrt(2 / pi) (1 + 3 * 0.044715 z^2), s = sigmoid(2u): torch's
// 0.5 (1 + t) + 0.5 z (1 - t^2) sqrt(2 / pi) (1 + 3 * 0.044715 z^2) with t = tanh(u) = 2s - 1.
template <typename Acc>
inline Acc gelu_tanh_grad(Acc z) {
  constexpr Acc k1 = 2 * kSqrt2OverPi, k3 = 2 * 3 * kSqrt2OverPi * kCubic;
  const Sigmoid<Acc> sg = sigmoid_2u(z);
  return sg.s + z * sg.s * sg.one_minus_s * (k1 + k3 * z * z);
}

// In place over one row: z -> GELU(z); z -> g GELU'(z). Compiled for several vector widths
// (cpu_math.h); the fp64 overloads are for fp64 inputs (tests).
FMCORE_CPU_CLONES void gelu_tanh_row(float* z, int64_t n) {
  for (int64_t i = 0; i < n; ++i) z[i] = gelu_tanh(z[i]);
}
void gelu_tanh_row(double* z, int64_t n) {
  for (int64_t i = 0; i < n; ++i) z[i] = gelu_tanh(z[i]);
}
FMCORE_CPU_CLONES void gelu_tanh_grad_row(float* z, const float* g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) z[i] = g[i] * gelu_tanh_grad(z[i]);
}
void gelu_tanh_grad_row(double* z, const double* g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) z[i] = g[i] * gelu_tanh_grad(z[i]);
}

// z = x's row + bias, in Acc
template <typename Acc>
void load_preactivation(const BiasGelu& g, int64_t row, const std::vector<Acc>& bias, Acc* z) {
  const int64_t D = g.p.dim;
  load_row(g.x, row * D, D, z);
  if (g.bias.defined()) {
    for (int64_t i = 0; i < D; ++i) z[i] += bias[i];
  }
}

template <typename Acc>
std::vector<Acc> load_bias(const BiasGelu& g) {
  std::vector<Acc> bias(g.bias.defined() ? g.p.dim : 0);
  if (g.bias.defined()) load_row(g.bias, 0, g.p.dim, bias.data());
  return bias;
}

template <typename Acc>
void bias_gelu_tanh_fwd(const BiasGelu& g) {
  const int64_t D = g.p.dim;
  const std::vector<Acc> bias = load_bias<Acc>(g);
  at::parallel_for(0, g.p.rows, rows_per_task(D), [&](int64_t begin, int64_t end) {
    std::vector<Acc> z(D);
    for (int64_t row = begin; row < end; ++row) {
      load_preactivation(g, row, bias, z.data());
      gelu_tanh_row(z.data(), D);
      store_row(g.out, row * D, D, z.data());
    }
  });
}

// grad_x, and grad_bias from per-block partial sums of grad_x in Acc (cpu_rows.h), before grad_x
// is rounded to x's dtype (as the CUDA kernel).
template <typename Acc>
void bias_gelu_tanh_bwd(const BiasGelu& g) {
  const int64_t D = g.p.dim, rows = g.p.rows, n_part = partial_rows(rows);
  const bool want_bias = g.p.grad_bias != nullptr;
  const std::vector<Acc> bias = load_bias<Acc>(g);
  std::vector<Acc> part(want_bias ? n_part * D : 0, Acc(0));
  at::parallel_for(0, n_part, 1, [&](int64_t begin, int64_t end) {
    std::vector<Acc> z(D), dy(D);
    for (int64_t blk = begin; blk < end; ++blk) {
      for (int64_t row = blk * kRowsPerPartial; row < std::min(rows, (blk + 1) * kRowsPerPartial);
           ++row) {
        load_preactivation(g, row, bias, z.data());
        load_row(g.grad_out, row * D, D, dy.data());
        gelu_tanh_grad_row(z.data(), dy.data(), D);
        store_row(g.grad_x, row * D, D, z.data());
        if (want_bias) {
          Acc* acc = part.data() + blk * D;
          for (int64_t i = 0; i < D; ++i) acc[i] += z[i];
        }
      }
    }
  });
  if (!want_bias) return;
  store_row(g.grad_bias, 0, D, add_partial_rows(part, n_part, D, 0, D).data());
}

// ---- GELU's erf form: ATen's.

// z = x + bias in the math dtype; written into `into` (the output about to be overwritten) when it
// is of that dtype: a fresh multi-MiB temporary costs its page faults (on the CPU step of the tiny
// preset, ~0.8 ms each, 4 a step).
at::Tensor preactivation(const BiasGelu& g, at::Tensor into) {
  at::Tensor z = g.x.to(math_type(g.x));
  if (!g.bias.defined()) return z;
  const at::Tensor bias = g.bias.to(z.scalar_type());
  return into.scalar_type() == z.scalar_type() ? at::add_out(into, z, bias) : z + bias;
}

at::Tensor bias_gelu_cpu(const at::Tensor& x, const std::optional<at::Tensor>& bias, bool tanh) {
  const NoAutocastGuard no_autocast;
  BiasGelu g = prepare_bias_gelu_fwd(x, bias, tanh);
  if (tanh) {
    g.x.scalar_type() == at::kDouble ? bias_gelu_tanh_fwd<double>(g) : bias_gelu_tanh_fwd<float>(g);
    return g.out;
  }
  const at::Tensor z = preactivation(g, g.out);
  // straight into out (z may be out itself) when the dtypes allow: no temporary to page in and copy
  if (g.out.scalar_type() == z.scalar_type()) {
    at::gelu_out(g.out, z, "none");
  } else {
    g.out.copy_(at::gelu(z, "none"));
  }
  return g.out;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cpu(const at::Tensor& grad_out,
                                                     const at::Tensor& x,
                                                     const std::optional<at::Tensor>& bias,
                                                     bool tanh, bool grad_bias) {
  const NoAutocastGuard no_autocast;
  BiasGelu g = prepare_bias_gelu_bwd(grad_out, x, bias, tanh, grad_bias);
  if (tanh) {
    g.x.scalar_type() == at::kDouble ? bias_gelu_tanh_bwd<double>(g) : bias_gelu_tanh_bwd<float>(g);
    return {g.grad_x, g.grad_bias};
  }
  const at::Tensor z = preactivation(g, g.grad_x);
  const at::Tensor grad = g.grad_out.to(z.scalar_type());
  at::Tensor gz;
  if (g.grad_x.scalar_type() == z.scalar_type()) {  // (z may be grad_x itself)
    gz = at::gelu_backward_out(g.grad_x, grad, z, "none");
  } else {
    gz = at::gelu_backward(grad, z, "none");
    g.grad_x.copy_(gz);
  }
  if (g.p.grad_bias != nullptr) g.grad_bias.copy_(gz.reshape({-1, g.p.dim}).sum(0));
  return {g.grad_x, g.grad_bias};
}

// ---- SwiGLU, fmcore's loop: one pass over rows loaded into Acc. ATen's took a pass per op, each
// writing a temporary (silu, the product; the backward's three products and the copies into the
// gradients). s = sigmoid(gate).

// silu(gate) up, in that order (gate up first would overflow where silu(gate) is 0)
template <typename Acc>
inline Acc swiglu(Acc gate, Acc up) {
  return gate * Sigmoid<Acc>(exp_saturated(-gate)).s * up;
}

// In place over one row: gate -> silu(gate) up.
FMCORE_CPU_CLONES void swiglu_row(float* gate, const float* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) gate[i] = swiglu(gate[i], up[i]);
}
void swiglu_row(double* gate, const double* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) gate[i] = swiglu(gate[i], up[i]);
}

// In place over one row, with d the output's gradient:
// gate -> grad_gate = d up s (1 + gate (1 - s)) (torch's silu_backward of d up),
// up -> grad_up = d gate s.
template <typename Acc>
inline void swiglu_grad(Acc& gate, Acc& up, Acc d) {
  const Sigmoid<Acc> sg(exp_saturated(-gate));
  const Acc grad_up = d * gate * sg.s;
  gate = d * up * sg.s * (1 + gate * sg.one_minus_s);
  up = grad_up;
}
FMCORE_CPU_CLONES void swiglu_grad_row(float* gate, float* up, const float* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) swiglu_grad(gate[i], up[i], d[i]);
}
void swiglu_grad_row(double* gate, double* up, const double* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) swiglu_grad(gate[i], up[i], d[i]);
}

// Where row r of gate and up (and of their gradients) starts in their tensors: separate (rows, F)
// tensors, or the halves of one (rows, 2F).
struct SwigluRows {
  at::Tensor up, grad_up;  // up's (and grad_up's) tensor: its own, or gate's (grad_gate's)
  int64_t stride, up_offset;
  explicit SwigluRows(const Swiglu& w)
      : up(w.up.defined() ? w.up : w.gate),
        grad_up(w.up.defined() ? w.grad_up : w.grad_gate),
        stride(w.p.in_stride),
        up_offset(w.up.defined() ? 0 : w.p.dim) {}
};

template <typename Acc>
void swiglu_fwd_rows(const Swiglu& w) {
  const int64_t F = w.p.dim;
  const SwigluRows where(w);
  at::parallel_for(0, w.p.rows, rows_per_task(F), [&](int64_t begin, int64_t end) {
    std::vector<Acc> g(F), u(F);
    for (int64_t row = begin; row < end; ++row) {
      load_row(w.gate, row * where.stride, F, g.data());
      load_row(where.up, row * where.stride + where.up_offset, F, u.data());
      swiglu_row(g.data(), u.data(), F);
      store_row(w.out, row * F, F, g.data());
    }
  });
}

template <typename Acc>
void swiglu_bwd_rows(const Swiglu& w) {
  const int64_t F = w.p.dim;
  const SwigluRows where(w);
  at::parallel_for(0, w.p.rows, rows_per_task(F), [&](int64_t begin, int64_t end) {
    std::vector<Acc> g(F), u(F), d(F);
    for (int64_t row = begin; row < end; ++row) {
      load_row(w.gate, row * where.stride, F, g.data());
      load_row(where.up, row * where.stride + where.up_offset, F, u.data());
      load_row(w.grad_out, row * F, F, d.data());
      swiglu_grad_row(g.data(), u.data(), d.data(), F);
      store_row(w.grad_gate, row * where.stride, F, g.data());
      store_row(where.grad_up, row * where.stride + where.up_offset, F, u.data());
    }
  });
}

at::Tensor swiglu_cpu(const at::Tensor& gate, const std::optional<at::Tensor>& up) {
  Swiglu w = prepare_swiglu_fwd(gate, up);
  w.gate.scalar_type() == at::kDouble ? swiglu_fwd_rows<double>(w) : swiglu_fwd_rows<float>(w);
  return w.out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cpu(const at::Tensor& grad_out,
                                                  const at::Tensor& gate,
                                                  const std::optional<at::Tensor>& up) {
  Swiglu w = prepare_swiglu_bwd(grad_out, gate, up);
  w.gate.scalar_type() == at::kDouble ? swiglu_bwd_rows<double>(w) : swiglu_bwd_rows<float>(w);
  return {w.grad_gate, w.grad_up};
}

Swiglu prepare_swiglu(const at::Tensor& gate, const std::optional<at::Tensor>& up) {
  check_float(gate, "gate");
  TORCH_CHECK_VALUE(gate.dim() >= 1, "expected gate of shape (..., F), got a scalar");
  Swiglu w;
  w.gate = gate.contiguous();
  int64_t F = gate.size(-1);
  if (up.has_value()) {
    check_same_device(*up, gate, "up", "gate");
    check_same_dtype(*up, gate, "up", "gate");
    TORCH_CHECK_VALUE(up->sizes() == gate.sizes(), "expected up of the shape of gate ",
                      shape_str(gate.sizes()), ", got ", shape_str(up->sizes()));
    w.up = up->contiguous();
  } else {
    TORCH_CHECK_VALUE(F % 2 == 0, "expected a packed gate (up=None) of shape (..., 2F) with an ",
                      "even last dim (gate, then up), got ", shape_str(gate.sizes()));
    F /= 2;
  }
  SwigluParams& p = w.p;
  p.gate = w.gate.data_ptr();
  p.in_stride = up.has_value() ? F : 2 * F;
  p.up = up.has_value() ? w.up.data_ptr()
                        : static_cast<const char*>(p.gate) + F * gate.element_size();
  p.grad_stride = p.in_stride;
  p.rows = F == 0 ? 0 : gate.numel() / p.in_stride;
  p.dim = F;
  p.dtype = to_dtype(gate.scalar_type());
  return w;
}

}  // namespace

Swiglu prepare_swiglu_fwd(const at::Tensor& gate, const std::optional<at::Tensor>& up) {
  Swiglu w = prepare_swiglu(gate, up);
  std::vector<int64_t> sizes = gate.sizes().vec();
  sizes.back() = w.p.dim;
  w.out = at::empty(sizes, w.gate.options());
  w.p.out = w.out.data_ptr();
  return w;
}

Swiglu prepare_swiglu_bwd(const at::Tensor& grad_out, const at::Tensor& gate,
                          const std::optional<at::Tensor>& up) {
  Swiglu w = prepare_swiglu(gate, up);
  check_same_device(grad_out, gate, "grad_out", "gate");
  check_same_dtype(grad_out, gate, "grad_out", "gate");
  std::vector<int64_t> sizes = gate.sizes().vec();
  sizes.back() = w.p.dim;
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(sizes), "expected grad_out of shape ",
                    shape_str(sizes), " (the output's), got ", shape_str(grad_out.sizes()));
  w.grad_out = grad_out.contiguous();
  w.grad_gate = at::empty(gate.sizes(), w.gate.options());
  w.grad_up = at::empty(up.has_value() ? gate.sizes() : at::IntArrayRef{0}, w.gate.options());
  w.p.grad_out = w.grad_out.data_ptr();
  w.p.grad_gate = w.grad_gate.data_ptr();
  w.p.grad_up = up.has_value() ? w.grad_up.data_ptr()
                               : static_cast<char*>(w.p.grad_gate) + w.p.dim * gate.element_size();
  return w;
}

BiasGelu prepare_bias_gelu_fwd(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                               bool tanh) {
  BiasGelu g = prepare_bias_gelu(x, bias, tanh);
  g.out = at::empty(x.sizes(), g.x.options());
  g.p.out = g.out.data_ptr();
  return g;
}

BiasGelu prepare_bias_gelu_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                               const std::optional<at::Tensor>& bias, bool tanh, bool grad_bias) {
  BiasGelu g = prepare_bias_gelu(x, bias, tanh);
  check_same_device(grad_out, x, "grad_out", "x");
  check_same_dtype(grad_out, x, "grad_out", "x");
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), "expected grad_out of the shape of x ",
                    shape_str(x.sizes()), ", got ", shape_str(grad_out.sizes()));
  g.grad_out = grad_out.contiguous();
  g.grad_x = at::empty(x.sizes(), g.x.options());
  const bool want_bias = grad_bias && bias.has_value();
  g.grad_bias = at::empty({want_bias ? g.p.dim : 0}, x.options().dtype(g.bias.defined()
                                                                          ? g.bias.scalar_type()
                                                                          : x.scalar_type()));
  g.p.grad_out = g.grad_out.data_ptr();
  g.p.grad_x = g.grad_x.data_ptr();
  g.p.grad_bias = want_bias ? g.grad_bias.data_ptr() : nullptr;
  return g;
}

TORCH_LIBRARY_IMPL(fmcore, CPU, m) {
  m.impl("bias_gelu", &bias_gelu_cpu);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd_cpu);
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_bwd", &swiglu_bwd_cpu);
}

}  // namespace fmcore
