// Bias + GELU and SwiGLU: argument checks, the CPU reference implementations and their
// registration. The math is in kernels/activation.h; the references are ATen's gelu /
// gelu_backward and silu / silu_backward in fp32 (fp64 for fp64 inputs), so that both devices
// compute torch's formulas.
#include "activation_op.h"

#include <utility>
#include <vector>

#include <torch/library.h>

#include "checks.h"

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
                      "expected bias to have the dtype of x (", x.scalar_type(),
                      ") or float32, got ", bt);
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

// z = x + bias in the math dtype; written into `into` (the output about to be overwritten) when it
// is of that dtype: a fresh multi-MiB temporary costs its page faults (on the CPU step of the tiny
// preset, ~0.8 ms each, 4 a step).
at::Tensor preactivation(const BiasGelu& g, at::Tensor into) {
  at::Tensor z = g.x.to(math_type(g.x));
  if (!g.bias.defined()) return z;
  const at::Tensor bias = g.bias.to(z.scalar_type());
  return into.scalar_type() == z.scalar_type() ? at::add_out(into, z, bias) : z + bias;
}

const char* approximate(const BiasGelu& g) { return g.p.tanh ? "tanh" : "none"; }

at::Tensor bias_gelu_cpu(const at::Tensor& x, const std::optional<at::Tensor>& bias, bool tanh) {
  const NoAutocastGuard no_autocast;
  BiasGelu g = prepare_bias_gelu_fwd(x, bias, tanh);
  const at::Tensor z = preactivation(g, g.out);
  // straight into out (z may be out itself) when the dtypes allow: no temporary to page in and copy
  if (g.out.scalar_type() == z.scalar_type()) {
    at::gelu_out(g.out, z, approximate(g));
  } else {
    g.out.copy_(at::gelu(z, approximate(g)));
  }
  return g.out;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cpu(const at::Tensor& grad_out,
                                                     const at::Tensor& x,
                                                     const std::optional<at::Tensor>& bias,
                                                     bool tanh, bool grad_bias) {
  const NoAutocastGuard no_autocast;
  BiasGelu g = prepare_bias_gelu_bwd(grad_out, x, bias, tanh, grad_bias);
  const at::Tensor z = preactivation(g, g.grad_x);
  const at::Tensor grad = g.grad_out.to(z.scalar_type());
  at::Tensor gz;
  if (g.grad_x.scalar_type() == z.scalar_type()) {  // (z may be grad_x itself)
    gz = at::gelu_backward_out(g.grad_x, grad, z, approximate(g));
  } else {
    gz = at::gelu_backward(grad, z, approximate(g));
    g.grad_x.copy_(gz);
  }
  if (g.p.grad_bias != nullptr) g.grad_bias.copy_(gz.reshape({-1, g.p.dim}).sum(0));
  return {g.grad_x, g.grad_bias};
}

// gate and up in the math dtype (the halves of a packed gate)
std::pair<at::Tensor, at::Tensor> gate_up(const Swiglu& w) {
  const at::ScalarType acc = math_type(w.gate);
  if (w.up.defined()) return {w.gate.to(acc), w.up.to(acc)};
  const at::Tensor both = w.gate.to(acc);
  return {both.narrow(-1, 0, w.p.dim), both.narrow(-1, w.p.dim, w.p.dim)};
}

at::Tensor swiglu_cpu(const at::Tensor& gate, const std::optional<at::Tensor>& up) {
  const NoAutocastGuard no_autocast;
  Swiglu w = prepare_swiglu_fwd(gate, up);
  const auto [g, u] = gate_up(w);
  if (w.out.scalar_type() == g.scalar_type()) {
    at::mul_out(w.out, at::silu(g), u);
  } else {
    w.out.copy_(at::silu(g) * u);
  }
  return w.out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cpu(const at::Tensor& grad_out,
                                                  const at::Tensor& gate,
                                                  const std::optional<at::Tensor>& up) {
  const NoAutocastGuard no_autocast;
  Swiglu w = prepare_swiglu_bwd(grad_out, gate, up);
  const auto [g, u] = gate_up(w);
  const at::Tensor d = w.grad_out.to(g.scalar_type());
  const at::Tensor dg = at::silu_backward(d * u, g), du = d * at::silu(g);
  if (w.up.defined()) {
    w.grad_gate.copy_(dg);
    w.grad_up.copy_(du);
  } else {
    w.grad_gate.narrow(-1, 0, w.p.dim).copy_(dg);
    w.grad_gate.narrow(-1, w.p.dim, w.p.dim).copy_(du);
  }
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
