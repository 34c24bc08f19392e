// fmcore._C._wgmma_probe(form, x, y): kernels/wgmma_probe.cu's check of attention's wgmma
// building blocks on the current GPU, for tests/ops/test_wgmma_probe.py (which lays the operands
// out per form, wgmma_probe.h). Not an op: a device self-check, bound with pybind11 like the build
// facts.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>
#include <string>

#include "checks.h"
#include "cuda_check.h"
#include "kernels/wgmma_probe.h"

namespace fmcore {

namespace {

at::Tensor wgmma_probe_op(const std::string& form, const at::Tensor& x, const at::Tensor& y) {
  const std::optional<WgmmaProbeForm> parsed = wgmma_probe_form(form);
  TORCH_CHECK_VALUE(parsed.has_value(), "expected form 'ss', 'ss_mn' or 'rs', got '", form, "'");
  const WgmmaProbeForm f = *parsed;
  TORCH_CHECK_VALUE(x.is_cuda() && y.device() == x.device(), "expected x and y on one CUDA device");
  TORCH_CHECK_VALUE(x.scalar_type() == y.scalar_type() &&
                        (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf),
                    "expected x and y both bfloat16 or both float16, got ", x.scalar_type(),
                    " and ", y.scalar_type());
  TORCH_CHECK_VALUE(x.is_contiguous() && y.is_contiguous(), "expected contiguous x and y");
  TORCH_CHECK_VALUE(y.dim() == 2, "expected a 2-d y, got ", y.dim(), " dimensions");
  const int64_t k = kWgmmaProbeK, n = f == WgmmaProbeForm::kSS ? y.size(0) : y.size(1);
  const bool x_ok = x.sizes() == (f == WgmmaProbeForm::kSSMn ? at::IntArrayRef{k, 64}
                                                              : at::IntArrayRef{64, k});
  const bool y_ok = (n == 64 || n == 128) &&
                    y.sizes() == (f == WgmmaProbeForm::kSS ? at::IntArrayRef{n, k}
                                                           : at::IntArrayRef{k, n});
  TORCH_CHECK_VALUE(x_ok && y_ok, "form '", form, "': unexpected shapes x ", x.sizes(), ", y ",
                    y.sizes(), " (see csrc/kernels/wgmma_probe.h)");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({64, n}, x.options().dtype(at::kFloat));
  check_cuda_error(
      wgmma_probe(f, to_dtype(x.scalar_type()), static_cast<int>(n), x.data_ptr(), y.data_ptr(),
                  out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
      "wgmma probe");
  return out;
}

}  // namespace

void register_wgmma_probe(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("_wgmma_probe", &wgmma_probe_op, py::arg("form"), py::arg("x"), py::arg("y"),
        "out (64 x N, fp32) = A (64 x 128) B (128 x N) through one warpgroup's wgmmas laid out as "
        "attention's Hopper kernels lay them (csrc/kernels/wgmma_probe.h gives x and y per form).");
}

}  // namespace fmcore
