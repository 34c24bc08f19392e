// Argument checks shared by the op bindings. Every failure names the argument and what was
// expected, and raises before anything is launched. Shape and dtype errors surface in Python as
// ValueError, device errors as RuntimeError.
#pragma once

#include <string>

#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/types.h>

#include "kernels/dtype.h"

namespace fmcore {

inline std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + (sizes.size() == 1 ? ",)" : ")");
}

// A floating-point tensor fmcore kernels handle: fp32, bf16 or fp16; float64 too on the CPU, where
// the reference implementations serve gradcheck.
inline void check_float(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  const bool ok = st == at::kFloat || st == at::kBFloat16 || st == at::kHalf ||
                  (st == at::kDouble && t.device().is_cpu());
  TORCH_CHECK_VALUE(ok, "expected ", name, " to be float32, bfloat16 or float16",
                    t.device().is_cpu() ? " (or float64 on the CPU)" : "", ", got ", st);
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* what) {
  TORCH_CHECK_VALUE(t.dim() == dim, "expected ", name, " of ", dim, " dims ", what, ", got shape ",
                    shape_str(t.sizes()));
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "expected ", name, " on the same device as ", ref_name,
              " (", ref.device(), "), got ", t.device());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name,
                             const char* ref_name) {
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), "expected ", name, " to have the dtype of ",
                    ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

// (An empty tensor has nothing to read: an expanded one, strides 0, or the zero-element gradient
// autograd hands a backward, whose contiguous() is itself.)
inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1 || t.numel() == 0, "expected ", name,
                    " to be contiguous in its last dim (stride 1), got strides ",
                    shape_str(t.strides()));
}

// CPU references that call ATen ops (at::mm ...) run below the dispatcher's autocast layer, but
// autocast is still on in the thread: without this guard their internal fp32 matmuls would be recast
// to bf16. Declare one at the top of such an implementation.
struct NoAutocastGuard {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

inline DType to_dtype(at::ScalarType st) {
  switch (st) {
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: return DType::kFloat32;
  }
}

}  // namespace fmcore
