// torch.ops.fmcore_sim.sim_selftest(case) -> (cudaError code, result): runs selftest.cu's case;
// sim_wgmma_probe(form, x, y): csrc/kernels/wgmma_probe.cu on fmsim (what fmcore._C._wgmma_probe
// runs on the GPU).
#include <optional>
#include <string>
#include <tuple>

#include "fmsim_torch.h"
#include "ops/checks.h"
#include "ops/cuda_check.h"
#include "wgmma_probe.h"

int fmsim_selftest(const std::string& name, float* result);

namespace {

std::tuple<int64_t, double> sim_selftest(const std::string& name) {
  float result = 0.f;
  const int err = fmsim_selftest(name, &result);
  TORCH_CHECK_VALUE(err >= 0, "unknown selftest case ", name);
  return {err, result};
}

// The shapes are fmcore._C._wgmma_probe's (checked there; tests/ops/test_wgmma_probe.py lays
// x and y out), the launcher checks n and the dtype.
at::Tensor sim_wgmma_probe(const std::string& form, const at::Tensor& x, const at::Tensor& y) {
  const std::optional<fmcore::WgmmaProbeForm> f = fmcore::wgmma_probe_form(form);
  TORCH_CHECK_VALUE(f.has_value(), "sim_wgmma_probe: unknown form ", form);
  const int64_t n = *f == fmcore::WgmmaProbeForm::kSS ? y.size(0) : y.size(1);
  at::Tensor out = at::empty({64, n}, x.options().dtype(at::kFloat));
  fmcore::check_cuda_error(
      fmcore::wgmma_probe(*f, fmcore::to_dtype(x.scalar_type()), static_cast<int>(n),
                          x.contiguous().data_ptr(), y.contiguous().data_ptr(),
                          out.data_ptr<float>(), nullptr),
      "sim_wgmma_probe");
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fmcore_sim, m) {
  m.def("sim_selftest(str name) -> (int, float)", &sim_selftest);
  m.def("sim_wgmma_probe(str form, Tensor x, Tensor y) -> Tensor", &sim_wgmma_probe);
}
