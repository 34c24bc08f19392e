// Plain definitions shared by every kernel header. Includable from CPU-only builds: the CUDA
// runtime (and so the launcher declarations, behind FMCORE_CUDA_API) only when nvcc compiles or the
// CUDA build of the extension includes the header.
#pragma once

#if defined(__CUDACC__) || defined(FMCORE_WITH_CUDA)
#include <cuda_runtime.h>
#define FMCORE_CUDA_API 1
#endif

namespace fmcore {

// Element types the kernels are instantiated for.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace fmcore
