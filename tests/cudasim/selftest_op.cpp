// torch.ops.fmcore_sim.sim_selftest(case) -> (cudaError code, result): runs selftest.cu's case.
#include <string>
#include <tuple>

#include "fmsim_torch.h"

int fmsim_selftest(const std::string& name, float* result);

namespace {

std::tuple<int64_t, double> sim_selftest(const std::string& name) {
  float result = 0.f;
  const int err = fmsim_selftest(name, &result);
  TORCH_CHECK_VALUE(err >= 0, "unknown selftest case ", name);
  return {err, result};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fmcore_sim, m) {
  m.def("sim_selftest(str name) -> (int, float)", &sim_selftest);
}
