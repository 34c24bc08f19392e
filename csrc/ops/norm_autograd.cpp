// Fused residual add + norm autograd in C++ (TORCH_LIBRARY_IMPL(fmcore, Autograd, m)), for every
// device, as rope_autograd.cpp does for RoPE.
//
// Why not torch.library.register_autograd: its Python kernel runs on every call of add_norm_fwd,
// which the GPT/Llama blocks make ~25 times a step; on the CPU (8, 64) it cost ~90 us of a ~110 us
// forward with grad, against ~20 us for torch's add + layer_norm. Numbers: docs/design-notes.md
// ("add_norm autograd is C++").
//
// fmcore::add_norm_fwd: a Function whose backward is fmcore::add_norm_bwd, asked only for the
// gradients some input needs (needs_input_grad). Saved: s (the stream output, or x itself without a
// residual), weight, and the per-row mean/rstd; dtypes and flags as saved_data.
//
// fmcore::add_norm_bwd has no derivative: it runs through FirstOrderOnly (autograd_gate.h).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "autograd_gate.h"

namespace fmcore {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptTensor = std::optional<at::Tensor>;

Tensor4 call_fwd(const at::Tensor& x, const OptTensor& residual, const at::Tensor& weight,
                 const OptTensor& bias, double eps, bool rms, at::ScalarType out_dtype) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fmcore::add_norm_fwd", "")
                             .typed<Tensor4(const at::Tensor&, const OptTensor&, const at::Tensor&,
                                            const OptTensor&, double, bool, at::ScalarType)>();
  return op.call(x, residual, weight, bias, eps, rms, out_dtype);
}

Tensor4 call_bwd(const at::Tensor& grad_out, const OptTensor& grad_residual_out,
                 const at::Tensor& s, const at::Tensor& weight, const at::Tensor& mean,
                 const at::Tensor& rstd, bool rms, bool has_residual, bool has_bias,
                 at::ScalarType x_dtype, std::optional<at::ScalarType> residual_dtype,
                 bool grad_input, bool grad_weight) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fmcore::add_norm_bwd", "")
          .typed<Tensor4(const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, bool, bool, bool, at::ScalarType,
                         std::optional<at::ScalarType>, bool, bool)>();
  return op.call(grad_out, grad_residual_out, s, weight, mean, rstd, rms, has_residual, has_bias,
                 x_dtype, residual_dtype, grad_input, grad_weight);
}

class AddNormFunction : public torch::autograd::Function<AddNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& residual,
                               const at::Tensor& weight, const OptTensor& bias, double eps,
                               bool rms, at::ScalarType out_dtype) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, stream, mean, rstd] = call_fwd(x, residual, weight, bias, eps, rms, out_dtype);
    const bool has_residual = residual.has_value();
    // The backward reads the sum: the stream output, or x itself when nothing was added.
    ctx->save_for_backward({has_residual ? stream : x, weight, mean, rstd});
    // Without a residual the stream output is a (0,) placeholder (Python returns x itself); with
    // one it is x + residual, which depends on neither weight nor bias: not differentiable when
    // only they require grad (torch's x + residual would not require grad either).
    const bool stream_differentiable =
        has_residual && (x.requires_grad() || residual->requires_grad());
    ctx->mark_non_differentiable(stream_differentiable ? variable_list{mean, rstd}
                                                       : variable_list{stream, mean, rstd});
    // An output that did not reach the loss arrives undefined: no zeros for an unused stream.
    ctx->set_materialize_grads(false);
    ctx->saved_data["rms"] = rms;
    ctx->saved_data["has_residual"] = has_residual;
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["residual_dtype"] = has_residual ? residual->scalar_type() : x.scalar_type();
    ctx->saved_data["out_dtype"] = out_dtype;
    return {out, stream, mean, rstd};
  }

  // grads: (d out, d stream, d mean, d rstd); returns one gradient per forward argument.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad counts tensor arguments only: a None residual has no index.
    const size_t iw = has_residual ? 2 : 1;
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_r = has_residual && ctx->needs_input_grad(1);
    const bool need_w = ctx->needs_input_grad(iw);
    const bool need_b = has_bias && ctx->needs_input_grad(iw + 1);
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& s = saved[0];
    at::Tensor grad_out = grads[0];
    if (!grad_out.defined()) {  // only the stream reached the loss
      grad_out = at::zeros_symint(s.sym_sizes(),
                                  s.options().dtype(ctx->saved_data["out_dtype"].toScalarType()));
    }
    OptTensor grad_stream;
    if (has_residual && grads[1].defined()) grad_stream = grads[1];

    // x and the residual share one gradient (ds); the kernel writes it in x's dtype, and a second
    // copy in the residual's only when both are needed and the dtypes differ. When only the
    // residual needs it, the one copy is written in the residual's dtype.
    const at::ScalarType x_dtype = ctx->saved_data["x_dtype"].toScalarType();
    const at::ScalarType r_dtype = ctx->saved_data["residual_dtype"].toScalarType();
    const at::ScalarType first_dtype = need_x || !need_r ? x_dtype : r_dtype;
    std::optional<at::ScalarType> second_dtype;
    if (need_x && need_r && r_dtype != x_dtype) second_dtype = r_dtype;
    auto [g_first, g_second, gw, gb] = call_bwd(
        grad_out, grad_stream, s, saved[1], saved[2], saved[3], ctx->saved_data["rms"].toBool(),
        has_residual, need_b, first_dtype, second_dtype, need_x || need_r, need_w);
    at::Tensor gx = need_x ? g_first : at::Tensor();
    at::Tensor gr = !need_r ? at::Tensor() : second_dtype.has_value() ? g_second : g_first;
    return {gx,
            gr,
            need_w ? gw : at::Tensor(),
            need_b ? gb : at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

Tensor4 add_norm_fwd_autograd(const at::Tensor& x, const OptTensor& residual,
                              const at::Tensor& weight, const OptTensor& bias, double eps, bool rms,
                              at::ScalarType out_dtype) {
  // Nothing to record: skip the Function's node and context (as rope_autograd.cpp). Forward-mode
  // tangents still go through apply(), which raises "jvp is not implemented".
  if (!records_grad(x, residual, weight, bias) && !has_tangents(x, residual, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_fwd(x, residual, weight, bias, eps, rms, out_dtype);
  }
  const variable_list out = AddNormFunction::apply(x, residual, weight, bias, eps, rms, out_dtype);
  return {out[0], out[1], out[2], out[3]};
}

Tensor4 add_norm_bwd_autograd(const at::Tensor& grad_out, const OptTensor& grad_residual_out,
                              const at::Tensor& s, const at::Tensor& weight, const at::Tensor& mean,
                              const at::Tensor& rstd, bool rms, bool has_residual, bool has_bias,
                              at::ScalarType x_dtype, std::optional<at::ScalarType> residual_dtype,
                              bool grad_input, bool grad_weight) {
  if (!records_grad(grad_out, grad_residual_out, s, weight, mean, rstd)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_bwd(grad_out, grad_residual_out, s, weight, mean, rstd, rms, has_residual, has_bias,
                    x_dtype, residual_dtype, grad_input, grad_weight);
  }
  const auto call = [&] {
    auto [gx, gr, gw, gb] = call_bwd(grad_out, grad_residual_out, s, weight, mean, rstd, rms,
                                     has_residual, has_bias, x_dtype, residual_dtype, grad_input,
                                     grad_weight);
    return variable_list{gx, gr, gw, gb};
  };
  const variable_list out =
      FirstOrderOnly::apply("add_norm", call, grad_out, grad_residual_out, s, weight, mean, rstd);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fmcore, Autograd, m) {
  m.impl("add_norm_fwd", &add_norm_fwd_autograd);
  m.impl("add_norm_bwd", &add_norm_bwd_autograd);
}

}  // namespace fmcore
