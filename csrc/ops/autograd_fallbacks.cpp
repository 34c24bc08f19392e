// Autograd-side registrations of the ops whose autograd formula is in Python or that have none:
// the backward ops that formula calls, and the in-place ops' version counters.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <vector>

namespace fmcore {

// The backward ops that the Python autograd formulas call (ops/attention.py, cross_entropy.py) have
// no derivative. Called directly on inputs that require grad, they run below autograd (the CPU
// implementations call ATen ops, which would otherwise be recorded: the attention reference's
// copies into views of its gradients then raised "a leaf Variable that requires grad is being used
// in an in-place operation"), and a gradient taken through their outputs raises.
TORCH_LIBRARY_IMPL(fmcore, Autograd, m) {
  for (const char* op : {"flash_attn_bwd", "flash_attn_qkvpacked_bwd", "cross_entropy_bwd"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}

namespace {

// The ADInplaceOrView kernel of the in-place ops without a C++ autograd kernel of their own: runs
// the op, then bumps the version counter of every tensor it wrote (each argument its schema marks
// Tensor(a!), alone or in a list), as ATen's in-place ops do. torch's fallback for this key bumps
// only mutable outputs, and these ops return none. A tensor saved for a backward and then
// overwritten (parameters stepped by FusedAdamW before the backward that needs them, logits that
// another node saved and cross_entropy(inplace_backward=True) writes its gradient over) then raises
// "modified by an inplace operation" instead of giving wrong gradients.
void bump_written_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                           torch::jit::Stack* stack) {
  const c10::FunctionSchema& schema = op.schema();
  const size_t n_args = schema.arguments().size(), first = stack->size() - n_args;
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < n_args; ++i) {
    if (!schema.is_mutable({c10::SchemaArgType::input, i})) continue;
    const c10::IValue& arg = (*stack)[first + i];
    if (arg.isTensor()) {
      written.push_back(arg.toTensor());
    } else if (arg.isTensorList()) {
      for (const at::Tensor& t : arg.toTensorVector()) written.push_back(t);
    }
  }
  {
    const at::AutoDispatchBelowADInplaceOrView below;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) {
    if (t.defined()) torch::autograd::impl::bump_version(t);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fmcore, ADInplaceOrView, m) {
  for (const char* op : {"cross_entropy_bwd_", "cross_entropy_fwd_bwd_", "cross_entropy_scale_",
                         "grad_norm_", "adamw_step_"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
  }
}

}  // namespace fmcore
