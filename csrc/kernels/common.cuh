// Small helpers shared by fmcore's kernels: dtype conversion, vector access, and the launchers'
// dynamic shared-memory opt-in.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <mutex>
#include <vector>

namespace fmcore {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// N elements of T moved as one access (16 bytes when N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Lets kKernel be launched with `smem` bytes of dynamic shared memory on the current device.
// - Opted in for any smem > 0, not only past 48 KiB: without the opt-in, static and dynamic shared
//   memory together get 48 KiB, so a kernel's static arrays on top of a dynamic size just under
//   48 KiB failed the launch (add_norm's backward at D 6113..6144).
// - Once per kernel and device, not per launch: the limit belongs to the function as loaded on each
//   device (a single flag would leave a second GPU without it), and setting it is a driver round
//   trip (reported to wait for in-flight host<->device copies).
// - Only ever raised, to the largest size asked for so far: a kernel launched at several sizes (one
//   add_norm instantiation serves a range of D) could otherwise have its limit lowered by a narrow
//   call on another host thread between a wide call's set and its launch ("invalid argument").
// - Not a stream operation, so legal while a stream is captured into a CUDA graph (PyTorch's
//   FlashAttention-2 launcher sets it before every launch, and those kernels are routinely captured).
// The kernel is a template argument so that each kernel has its own limits: many share one type.
template <auto kKernel>
cudaError_t allow_dynamic_smem(size_t smem) {
  if (smem == 0) return cudaSuccess;
  static std::vector<std::atomic<size_t>> limit([] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) (void)cudaGetLastError();  // no device: none to set
    return static_cast<size_t>(n);
  }());
  static std::mutex raising;
  int dev = 0;
  if (const cudaError_t err = cudaGetDevice(&dev); err != cudaSuccess) return err;
  if (dev < 0 || static_cast<size_t>(dev) >= limit.size()) return cudaErrorInvalidDevice;
  if (limit[dev].load(std::memory_order_acquire) >= smem) return cudaSuccess;
  const std::lock_guard<std::mutex> lock(raising);
  if (limit[dev].load(std::memory_order_relaxed) >= smem) return cudaSuccess;  // raised meanwhile
  const cudaError_t err = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));
  if (err == cudaSuccess) limit[dev].store(smem, std::memory_order_release);
  return err;
}

}  // namespace fmcore
