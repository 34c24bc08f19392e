// RoPE autograd in C++ (TORCH_LIBRARY_IMPL(fmcore, Autograd, m)), for every device.
//
// Why not torch.library.register_autograd in Python, DESIGN.md's default: that kernel runs on EVERY
// call of the op, with or without grad, and cost ~45 us of Python per call with grad and ~7 us
// without; RoPE runs once per layer in the forward and once in the backward, on small tensors when
// decoding, and the aim is < 15 us per call. Measured numbers: docs/design-notes.md
// ("RoPE autograd is C++").
//
// fmcore::rope: the rotation is linear in (q, k) and orthogonal, so the backward is the inverse
// rotation (the same op with `conjugate` flipped) of the incoming gradients. Saved: cos, sin and
// the three flags; no activations. The backward calls the op through the dispatcher, so under
// create_graph it is recorded again: double backward (a rotation of a rotation) works.
// cos and sin get no gradient (they are tables, not parameters): if they require grad, it raises.
//
// fmcore::rope_: overwrites q and k, which a backward would need, so it refuses inputs that
// require grad while grad mode is on, and bumps q's and k's version counters so that any other
// node that saved them for its backward raises instead of reading rotated values.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "autograd_gate.h"

namespace fmcore {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_rope(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& cos, const at::Tensor& sin,
                                             bool interleaved, bool conjugate, int64_t seq_dim) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fmcore::rope", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, const at::Tensor&, bool,
                                                    bool, int64_t)>();
  return op.call(q, k, cos, sin, interleaved, conjugate, seq_dim);
}

// Autograd may hand the backward an expanded gradient (stride 0 everywhere, from sum()); the
// kernels need a contiguous last dim. Symbolic-size aware: AOT autograd traces this with fake
// tensors of dynamic shape.
at::Tensor dense_last_dim(const at::Tensor& g) {
  return g.sym_stride(-1) == 1 || g.sym_size(-1) <= 1 ? g : g.contiguous();
}

class RopeFunction : public torch::autograd::Function<RopeFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& cos, const at::Tensor& sin, bool interleaved,
                               bool conjugate, int64_t seq_dim) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [q_out, k_out] = call_rope(q, k, cos, sin, interleaved, conjugate, seq_dim);
    // An output whose input needs no gradient needs none either (as torch's own rotation gives):
    // else a frozen k (k_proj frozen, as LoRA leaves it) would get a backward path through SDPA.
    // (One call: each call replaces the set.)
    variable_list constant;
    if (!q.requires_grad()) constant.push_back(q_out);
    if (!k.requires_grad()) constant.push_back(k_out);
    ctx->mark_non_differentiable(constant);
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["interleaved"] = interleaved;
    ctx->saved_data["conjugate"] = conjugate;
    ctx->saved_data["seq_dim"] = seq_dim;
    return {q_out, k_out};
  }

  // grads: (dL/dq_out, dL/dk_out); an output that did not reach the loss arrives as zeros
  // (materialize_grads is on by default).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    auto [dq, dk] = call_rope(dense_last_dim(grads[0]), dense_last_dim(grads[1]), saved[0],
                              saved[1], ctx->saved_data["interleaved"].toBool(),
                              !ctx->saved_data["conjugate"].toBool(),
                              ctx->saved_data["seq_dim"].toInt());
    return {dq, dk, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// cos and sin get no gradient: rather than leave a table that requires grad (one computed from a
// learned parameter) silently without one, refuse it.
void check_tables_need_no_grad(const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK_NOT_IMPLEMENTED(!records_grad(cos, sin), "fmcore rope computes no gradient for cos ",
                              "and sin (rotation tables, not parameters), and they require grad ",
                              "here: pass cos.detach() and sin.detach()");
}

std::tuple<at::Tensor, at::Tensor> rope_autograd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& cos, const at::Tensor& sin,
                                                 bool interleaved, bool conjugate,
                                                 int64_t seq_dim) {
  // Nothing to record (no grad, or grad mode off): skip the Function's node, context and output
  // wrapping, ~2 us of the ~8 us a no-grad call costs. Forward-mode tangents still go through
  // apply(), which raises "jvp is not implemented" rather than silently dropping them.
  if (!records_grad(q, k, cos, sin) && !has_tangents(q, k, cos, sin)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_rope(q, k, cos, sin, interleaved, conjugate, seq_dim);
  }
  check_tables_need_no_grad(cos, sin);
  const variable_list out = RopeFunction::apply(q, k, cos, sin, interleaved, conjugate, seq_dim);
  return {out[0], out[1]};
}

void rope_inplace_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                           const at::Tensor& sin, bool interleaved, bool conjugate,
                           int64_t seq_dim) {
  check_tables_need_no_grad(cos, sin);
  TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad())),
                    "rope_ (apply_rotary inplace=True) overwrites q and k, which autograd needs ",
                    "for q or k that require grad; use inplace=False");
  TORCH_CHECK_NOT_IMPLEMENTED(!q._fw_grad(0).defined() && !k._fw_grad(0).defined(),
                              "rope_ (apply_rotary inplace=True) does not support forward-mode AD");
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fmcore::rope_", "")
                               .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, bool, bool, int64_t)>();
    op.call(q, k, cos, sin, interleaved, conjugate, seq_dim);
  }
  torch::autograd::impl::bump_version(q);
  torch::autograd::impl::bump_version(k);
}

}  // namespace

TORCH_LIBRARY_IMPL(fmcore, Autograd, m) {
  m.impl("rope", &rope_autograd);
  m.impl("rope_", &rope_inplace_autograd);
}

}  // namespace fmcore
