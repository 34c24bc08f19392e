// Kernels with known bugs (and one without), for tests/cudasim/test_simulator.py: they prove that
// fmsim reports what it claims to model instead of passing silently. Compiled like fmcore's
// kernels (transform.py), never by nvcc.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <string>

namespace {

// Lanes 0-15 of warp 1 shuffle while every other thread waits at __syncthreads: neither completes.
__global__ void divergent_kernel(float* out) {
  float v = threadIdx.x;
  if (threadIdx.x >= 32 && threadIdx.x < 48) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = v;
}

// Lane 5 has returned when its warp shuffles with a full mask.
__global__ void exited_lane_kernel(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

__global__ void misaligned_kernel(const float* in, float* out) {
  const float4 v = *reinterpret_cast<const float4*>(in + 1);
  out[threadIdx.x] = v.x;
}

__global__ void __launch_bounds__(128) bounded_kernel(float* out) { out[threadIdx.x] = 1.f; }

__global__ void smem_kernel(float* out) {
  extern __shared__ float buf[];
  out[threadIdx.x] = buf[threadIdx.x];  // read before any write: the simulator's NaN poison
}

// Reads its static shared word before writing it: stale from the previous block on hardware,
// NaN from the simulator (from the second block on; the first sees the static's zero).
__global__ void stale_shared_kernel(float* out) {
  __shared__ float word[1];
  if (threadIdx.x == 0) {
    out[blockIdx.x] = word[0];
    word[0] = 1.f;
  }
}

// A correct block sum: shuffles within warps, warp sums through shared memory, every block's
// total into out[blockIdx.x].
__global__ void sum_kernel(const float* in, float* out) {
  __shared__ float warp_sums[32];
  float v = in[blockIdx.x * blockDim.x + threadIdx.x];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) t += warp_sums[w];
    out[blockIdx.x] = t;
  }
}

}  // namespace

// Runs one case; returns cudaGetLastError() after the launch(es), or the sum kernel's result
// encoded in *result. Faults inside a kernel throw (the launch fails).
int fmsim_selftest(const std::string& name, float* result) {
  alignas(16) static float in[4096];
  alignas(16) static float out[4096];
  for (int i = 0; i < 4096; ++i) in[i] = static_cast<float>(i % 7);
  if (name == "divergent") {
    divergent_kernel<<<1, 64>>>(out);
  } else if (name == "exited_lane") {
    exited_lane_kernel<<<1, 32>>>(out);
  } else if (name == "misaligned") {
    misaligned_kernel<<<1, 32>>>(in, out);
  } else if (name == "launch_bounds") {
    bounded_kernel<<<1, 256>>>(out);
  } else if (name == "block_too_large") {
    bounded_kernel<<<1, 1025>>>(out);
  } else if (name == "smem_no_optin") {
    smem_kernel<<<1, 32, 64 * 1024>>>(out);
  } else if (name == "smem_optin") {
    cudaFuncSetAttribute(smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
    smem_kernel<<<1, 32, 64 * 1024>>>(out);
    *result = out[3];
  } else if (name == "stale_shared") {
    stale_shared_kernel<<<2, 32>>>(out);
    *result = out[1];
  } else if (name == "sum") {
    sum_kernel<<<3, 96>>>(in, out);
    *result = out[0] + out[1] + out[2];
  } else {
    return -1;
  }
  return static_cast<int>(cudaGetLastError());
}
