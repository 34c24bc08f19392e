// When an op's C++ Autograd kernel (rope_autograd.cpp, norm_autograd.cpp) must go through its
// torch::autograd::Function, and when it may call the op below autograd directly, skipping the
// Function's node, context and output wrapping (a few us of a ~10 us call).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/GradMode.h>

#include <optional>

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

}  // namespace fmcore
