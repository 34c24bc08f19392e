// When an op's C++ Autograd kernel (rope_autograd.cpp, norm_autograd.cpp, activation_autograd.cpp)
// must go through its torch::autograd::Function, and when it may call the op below autograd
// directly, skipping the Function's node, context and output wrapping (a few us of a ~10 us call);
// and FirstOrderOnly, the Function of their backward ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/GradMode.h>
#include <torch/autograd.h>

#include <optional>
#include <string>

namespace fmcore {

inline bool requires_grad(const at::Tensor& t) { return t.requires_grad(); }
inline bool requires_grad(const std::optional<at::Tensor>& t) { return t.has_value() && t->requires_grad(); }
inline bool has_tangent(const at::Tensor& t) { return t._fw_grad(0).defined(); }
inline bool has_tangent(const std::optional<at::Tensor>& t) { return t.has_value() && t->_fw_grad(0).defined(); }

// Grad mode is on and some input requires grad: autograd has a node to record.
template <typename... Ts>
bool records_grad(const Ts&... inputs) {
  return at::GradMode::is_enabled() && (requires_grad(inputs) || ...);
}

// Some input carries a forward-mode tangent: the Function's apply() then raises "jvp is not
// implemented" rather than the tangent being silently dropped.
template <typename... Ts>
bool has_tangents(const Ts&... inputs) {
  return (has_tangent(inputs) || ...);
}

// A backward op (fmcore::<op>_bwd) run through this Function: `call` runs it below autograd and
// returns its outputs; `inputs` are its tensor arguments. Under create_graph the outputs get a node
// whose backward raises, so double backward through <op> fails loudly, where torch's fallback for
// an op without autograd only warned and gave zero second-order gradients.
class FirstOrderOnly : public torch::autograd::Function<FirstOrderOnly> {
 public:
  template <typename Call, typename... Inputs>
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const char* op, const Call& call,
                                                const Inputs&... /*inputs*/) {
    ctx->saved_data["op"] = std::string(op);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call();
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list) {
    const std::string op = ctx->saved_data["op"].toStringRef();
    TORCH_CHECK_NOT_IMPLEMENTED(false, "fmcore ", op, " supports first-order gradients only: its "
                                "backward (fmcore::", op, "_bwd) has no derivative, so double "
                                "backward (differentiating a gradient taken with create_graph=True) "
                                "through ", op, " is not implemented");
    return {};
  }
};

}  // namespace fmcore
