// Bias + GELU: argument checks, the CPU reference implementation and its registration. The math
// is in kernels/gelu.h; the reference is ATen's gelu and gelu_backward on x + bias in fp32 (fp64
// for fp64 x), so that both devices compute torch's formulas.
#include "gelu_op.h"

#include <torch/library.h>

#include "checks.h"

namespace fmcore {

namespace {

BiasGelu prepare(const at::Tensor& x, const std::optional<at::Tensor>& bias, bool tanh) {
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

// z = x + bias in the math dtype (fp32; fp64 for fp64 x)
at::Tensor preactivation(const BiasGelu& g) {
  const at::ScalarType acc = g.x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor z = g.x.to(acc);
  return g.bias.defined() ? z + g.bias.to(acc) : z;
}

const char* approximate(const BiasGelu& g) { return g.p.tanh ? "tanh" : "none"; }

at::Tensor bias_gelu_cpu(const at::Tensor& x, const std::optional<at::Tensor>& bias, bool tanh) {
  const NoAutocastGuard no_autocast;
  BiasGelu g = prepare_bias_gelu_fwd(x, bias, tanh);
  g.out.copy_(at::gelu(preactivation(g), approximate(g)));
  return g.out;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cpu(const at::Tensor& grad_out,
                                                     const at::Tensor& x,
                                                     const std::optional<at::Tensor>& bias,
                                                     bool tanh, bool grad_bias) {
  const NoAutocastGuard no_autocast;
  BiasGelu g = prepare_bias_gelu_bwd(grad_out, x, bias, tanh, grad_bias);
  const at::Tensor z = preactivation(g);
  const at::Tensor gz = at::gelu_backward(g.grad_out.to(z.scalar_type()), z, approximate(g));
  g.grad_x.copy_(gz);
  if (g.p.grad_bias != nullptr) g.grad_bias.copy_(gz.reshape({-1, g.p.dim}).sum(0));
  return {g.grad_x, g.grad_bias};
}

}  // namespace

BiasGelu prepare_bias_gelu_fwd(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                               bool tanh) {
  BiasGelu g = prepare(x, bias, tanh);
  g.out = at::empty(x.sizes(), g.x.options());
  g.p.out = g.out.data_ptr();
  return g;
}

BiasGelu prepare_bias_gelu_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                               const std::optional<at::Tensor>& bias, bool tanh, bool grad_bias) {
  BiasGelu g = prepare(x, bias, tanh);
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
}

}  // namespace fmcore
