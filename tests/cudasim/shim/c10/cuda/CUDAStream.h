// fmsim stand-in for c10/cuda/CUDAStream.h: the simulator has one synchronous null stream.
#pragma once

#include <c10/core/Device.h>
#include <cuda_runtime_api.h>

namespace c10::cuda {

class CUDAStream {
 public:
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return stream(); }
  DeviceIndex device_index() const { return 0; }
};

inline CUDAStream getCurrentCUDAStream(DeviceIndex = -1) { return {}; }

}  // namespace c10::cuda
