// fmsim stand-in for ATen/cuda/PinnedMemoryAllocator.h: CPU tensors stand for device memory and
// copies are synchronous, so "pinned" host memory is plain CPU memory.
#pragma once

#include <c10/core/CPUAllocator.h>

namespace at::cuda {

inline at::Allocator* getPinnedMemoryAllocator() { return c10::GetCPUAllocator(); }

}  // namespace at::cuda
