// Bias + GELU and SwiGLU autograd in C++ (TORCH_LIBRARY_IMPL(fmcore, Autograd, m)), for every
// device, as norm_autograd.cpp does for add_norm and for the same reason: a Python autograd kernel
// runs on every call, and a model calls these once a layer.
//
// fmcore::bias_gelu: a Function whose backward is fmcore::bias_gelu_bwd, asked for the bias
// gradient only when the bias needs one. Saved: x and the bias (the backward recomputes x + bias).
// fmcore::swiglu: a Function whose backward is fmcore::swiglu_bwd. Saved: gate and up (or the
// packed gate).
// The backward ops have no derivative: they run through FirstOrderOnly (autograd_gate.h).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "autograd_gate.h"

namespace fmcore {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;
using Tensor2 = std::tuple<at::Tensor, at::Tensor>;

at::Tensor call_fwd(const at::Tensor& x, const OptTensor& bias, bool tanh) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fmcore::bias_gelu", "")
                             .typed<at::Tensor(const at::Tensor&, const OptTensor&, bool)>();
  return op.call(x, bias, tanh);
}

Tensor2 call_bwd(const at::Tensor& grad_out, const at::Tensor& x, const OptTensor& bias, bool tanh,
                 bool grad_bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fmcore::bias_gelu_bwd", "")
          .typed<Tensor2(const at::Tensor&, const at::Tensor&, const OptTensor&, bool, bool)>();
  return op.call(grad_out, x, bias, tanh, grad_bias);
}

class BiasGeluFunction : public torch::autograd::Function<BiasGeluFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& bias,
                            bool tanh) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({x, bias.value_or(at::Tensor())});
    ctx->saved_data["tanh"] = tanh;
    return call_fwd(x, bias, tanh);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const OptTensor bias = saved[1].defined() ? OptTensor(saved[1]) : std::nullopt;
    // needs_input_grad counts tensor arguments only: a None bias has no index.
    const bool need_b = bias.has_value() && ctx->needs_input_grad(1);
    auto [gx, gb] = call_bwd(grads[0], saved[0], bias, ctx->saved_data["tanh"].toBool(), need_b);
    return {ctx->needs_input_grad(0) ? gx : at::Tensor(), need_b ? gb : at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor bias_gelu_autograd(const at::Tensor& x, const OptTensor& bias, bool tanh) {
  // Nothing to record: skip the Function's node and context. Forward-mode tangents still go
  // through apply(), which raises "jvp is not implemented".
  if (!records_grad(x, bias) && !has_tangents(x, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_fwd(x, bias, tanh);
  }
  return BiasGeluFunction::apply(x, bias, tanh);
}

Tensor2 bias_gelu_bwd_autograd(const at::Tensor& grad_out, const at::Tensor& x,
                               const OptTensor& bias, bool tanh, bool grad_bias) {
  if (!records_grad(grad_out, x, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_bwd(grad_out, x, bias, tanh, grad_bias);
  }
  const auto call = [&] {
    auto [gx, gb] = call_bwd(grad_out, x, bias, tanh, grad_bias);
    return variable_list{gx, gb};
  };
  const variable_list out = FirstOrderOnly::apply("bias_gelu", call, grad_out, x, bias);
  return {out[0], out[1]};
}

at::Tensor call_swiglu(const at::Tensor& gate, const OptTensor& up) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fmcore::swiglu", "")
                             .typed<at::Tensor(const at::Tensor&, const OptTensor&)>();
  return op.call(gate, up);
}

Tensor2 call_swiglu_bwd(const at::Tensor& grad_out, const at::Tensor& gate, const OptTensor& up) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fmcore::swiglu_bwd", "")
          .typed<Tensor2(const at::Tensor&, const at::Tensor&, const OptTensor&)>();
  return op.call(grad_out, gate, up);
}

class SwigluFunction : public torch::autograd::Function<SwigluFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const OptTensor& up) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({gate, up.value_or(at::Tensor())});
    return call_swiglu(gate, up);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const OptTensor up = saved[1].defined() ? OptTensor(saved[1]) : std::nullopt;
    auto [gg, gu] = call_swiglu_bwd(grads[0], saved[0], up);
    return {ctx->needs_input_grad(0) ? gg : at::Tensor(),
            up.has_value() && ctx->needs_input_grad(1) ? gu : at::Tensor()};
  }
};

at::Tensor swiglu_autograd(const at::Tensor& gate, const OptTensor& up) {
  if (!records_grad(gate, up) && !has_tangents(gate, up)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_swiglu(gate, up);
  }
  return SwigluFunction::apply(gate, up);
}

Tensor2 swiglu_bwd_autograd(const at::Tensor& grad_out, const at::Tensor& gate,
                            const OptTensor& up) {
  if (!records_grad(grad_out, gate, up)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_swiglu_bwd(grad_out, gate, up);
  }
  const auto call = [&] {
    auto [gg, gu] = call_swiglu_bwd(grad_out, gate, up);
    return variable_list{gg, gu};
  };
  const variable_list out = FirstOrderOnly::apply("swiglu", call, grad_out, gate, up);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fmcore, Autograd, m) {
  m.impl("bias_gelu", &bias_gelu_autograd);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd_autograd);
  m.impl("swiglu", &swiglu_autograd);
  m.impl("swiglu_bwd", &swiglu_bwd_autograd);
}

}  // namespace fmcore
