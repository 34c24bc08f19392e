// The one Python module, fmcore._C. Loading it runs the TORCH_LIBRARY registrations of every op
// (csrc/ops). pybind11 here is only for stateful objects, build facts and the device self-check
// (_wgmma_probe); tensor ops go through torch.ops.fmcore.
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include "dist/communicator.h"
#include "kernels/attention.h"

#ifdef FMCORE_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace py = pybind11;

namespace fmcore::data {
void register_loader(py::module_& m);  // csrc/data/loader_binding.cpp
}
#ifdef FMCORE_WITH_CUDA
namespace fmcore {
void register_wgmma_probe(py::module_& m);  // csrc/ops/wgmma_probe_cuda.cpp
}
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "fmcore native extension: CUDA kernels, CPU references, loader and communicator";
  m.def("build_info", [] {
    py::dict info;
    info["torch_version"] = TORCH_VERSION;  // the torch the extension was compiled against
#ifdef FMCORE_WITH_CUDA
    info["with_cuda"] = true;
    info["cuda_runtime"] = std::to_string(CUDART_VERSION / 1000) + "." +
                           std::to_string(CUDART_VERSION % 1000 / 10);
#else
    info["with_cuda"] = false;
    info["cuda_runtime"] = py::none();
#endif
    info["cuda_archs"] = FMCORE_CUDA_ARCHS;
    return info;
  }, "Facts fixed when the extension was compiled.");
  // flash attention's tile configurations: `tiles` of fmcore.ops.flash_attention is in [0, this)
  m.attr("attention_tile_configs") = fmcore::kAttnTileConfigs;
  fmcore::data::register_loader(m);
#ifdef FMCORE_WITH_CUDA
  fmcore::register_wgmma_probe(m);
#endif
  fmcore::dist::register_dist(m);
}
