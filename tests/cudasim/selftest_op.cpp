// torch.ops.fmcore_sim.sim_selftest(case) -> (cudaError code, result): runs selftest.cu's case;
// sim_wgmma(form, a, b) -> a @ b through selftest.cu's wgmma kernels.
#include <string>
#include <tuple>

#include "fmsim_torch.h"

int fmsim_selftest(const std::string& name, float* result);
int fmsim_wgmma_selftest(const std::string& form, bool f16, int n, const void* a, const void* b,
                         float* out);

namespace {

std::tuple<int64_t, double> sim_selftest(const std::string& name) {
  float result = 0.f;
  const int err = fmsim_selftest(name, &result);
  TORCH_CHECK_VALUE(err >= 0, "unknown selftest case ", name);
  return {err, result};
}

// (64 x n fp32) = a (64 x 64) b (64 x n), bf16 or f16, through one warpgroup's wgmma_ss or wgmma_rs
// (form "ss": A and B K-major, "ss_mn_k": A MN-major, "ss_mn_mn": A and B MN-major, "rs"; n 64 or
// 128).
at::Tensor sim_wgmma(const std::string& form, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dtype() == b.dtype() && (a.dtype() == at::kBFloat16 || a.dtype() == at::kHalf),
              "sim_wgmma: a and b both bf16 or both f16");
  TORCH_CHECK(a.sizes() == at::IntArrayRef({64, 64}) && b.dim() == 2 && b.size(0) == 64,
              "sim_wgmma: a 64 x 64, b 64 x n");
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  at::Tensor out = at::empty({64, b.size(1)}, a.options().dtype(at::kFloat));
  const int err = fmsim_wgmma_selftest(form, a.dtype() == at::kHalf, static_cast<int>(b.size(1)),
                                       ac.data_ptr(), bc.data_ptr(), out.data_ptr<float>());
  TORCH_CHECK_VALUE(err >= 0, "sim_wgmma: unknown form ", form, " or n ", b.size(1));
  TORCH_CHECK(err == 0, "sim_wgmma: launch error ", err);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fmcore_sim, m) {
  m.def("sim_selftest(str name) -> (int, float)", &sim_selftest);
  m.def("sim_wgmma(str form, Tensor a, Tensor b) -> Tensor", &sim_wgmma);
}
