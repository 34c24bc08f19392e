// ncclsim stand-in for c10/cuda/CUDAStream.h: every thread has its own stream, served by its own
// worker (ncclsim.cpp), so ranks that are threads of one process wait for each other the way
// ranks on separate GPUs do. (fmsim's shim, one synchronous null stream, suits kernels, not this.)
#pragma once

#include <c10/core/Device.h>
#include <cuda_runtime_api.h>

cudaStream_t ncclsim_current_stream();

namespace c10::cuda {

class CUDAStream {
 public:
  explicit CUDAStream(cudaStream_t s) : stream_(s) {}
  cudaStream_t stream() const { return stream_; }
  operator cudaStream_t() const { return stream_; }

 private:
  cudaStream_t stream_;
};

inline CUDAStream getCurrentCUDAStream(DeviceIndex = -1) { return CUDAStream(ncclsim_current_stream()); }

}  // namespace c10::cuda
