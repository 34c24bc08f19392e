// What the CUDA bindings (csrc/ops/*_cuda.cpp) share: a CUDA error as a RuntimeError that names the
// op, and the SM count of a tensor's device (for the kernels that size their grids by it).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace fmcore {

// Raises "fmcore <op>: CUDA <what> failed: <CUDA's message>" unless err is cudaSuccess.
inline void check_cuda_error(cudaError_t err, const char* op, const char* what = "launch") {
  TORCH_CHECK(err == cudaSuccess, "fmcore ", op, ": CUDA ", what, " failed: ",
              cudaGetErrorString(err));
}

inline int sm_count(const at::Tensor& t) {
  int n = 0;
  check_cuda_error(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, t.get_device()),
                   "sm_count", "attribute query");
  return n;
}

}  // namespace fmcore
