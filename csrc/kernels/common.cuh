// Small helpers shared by fmcore's kernels: dtype conversion, vector access, and the launchers'
// dynamic shared-memory opt-in.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <mutex>
#include <vector>

#include "dtype.h"

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

// VEC elements of T from p into fp32, in 16-byte accesses when VEC > 1.
template <typename T, int VEC>
__device__ __forceinline__ void load_t(const T* p, float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    v[0] = to_float(*p);
  } else {
    constexpr int kPer = 16 / sizeof(T);
    static_assert(VEC % kPer == 0, "the vector path moves whole 16-byte accesses");
#pragma unroll
    for (int a = 0; a < VEC / kPer; ++a) {
      const Vec<T, kPer> t = reinterpret_cast<const Vec<T, kPer>*>(p)[a];
#pragma unroll
      for (int e = 0; e < kPer; ++e) v[a * kPer + e] = to_float(t.v[e]);
    }
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_t(T* p, const float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    *p = from_float<T>(v[0]);
  } else {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int a = 0; a < VEC / kPer; ++a) {
      Vec<T, kPer> t;
#pragma unroll
      for (int e = 0; e < kPer; ++e) t.v[e] = from_float<T>(v[a * kPer + e]);
      reinterpret_cast<Vec<T, kPer>*>(p)[a] = t;
    }
  }
}

// Elements i..i+VEC-1 of a tensor whose dtype is known only at run time (uniform per launch).
template <int VEC>
__device__ __forceinline__ void load(const void* base, DType dt, int64_t i, float (&v)[VEC]) {
  switch (dt) {
    case DType::kBFloat16:
      load_t<__nv_bfloat16, VEC>(static_cast<const __nv_bfloat16*>(base) + i, v);
      break;
    case DType::kFloat16: load_t<__half, VEC>(static_cast<const __half*>(base) + i, v); break;
    default: load_t<float, VEC>(static_cast<const float*>(base) + i, v); break;
  }
}

template <int VEC>
__device__ __forceinline__ void store(void* base, DType dt, int64_t i, const float (&v)[VEC]) {
  switch (dt) {
    case DType::kBFloat16:
      store_t<__nv_bfloat16, VEC>(static_cast<__nv_bfloat16*>(base) + i, v);
      break;
    case DType::kFloat16: store_t<__half, VEC>(static_cast<__half*>(base) + i, v); break;
    default: store_t<float, VEC>(static_cast<float*>(base) + i, v); break;
  }
}

// Whether every non-null pointer is 16-byte aligned (the kernels' vector paths need it).
inline bool all_aligned(std::initializer_list<const void*> ptrs) {
  for (const void* q : ptrs) {
    if (q != nullptr && (reinterpret_cast<uintptr_t>(q) & 15) != 0) return false;
  }
  return true;
}

// Column sums of fp32 partial-row workspaces, in a fixed order (bitwise reproducible run to run):
// for each of K outputs, out[k][col] = the sum over r < rows of part[k][r * dim + col], stored in
// dtype; a null out[k] is skipped. sum_partial_rows launches it: (dim + 31) / 32 blocks of 32
// columns x 32 slices; slice y adds rows y, y + 32, ...; then the 32 slice sums add in order.
template <int K>
struct PartialRowSums {
  const float* part[K] = {};  // (rows, dim) each
  void* out[K] = {};          // (dim,) each, or null
  int64_t rows = 0, dim = 0;
  DType dtype = DType::kFloat32;
};

// (Launched with 1024 threads: the bound keeps the compiler at <= 64 registers a thread.)
template <int K>
__global__ void __launch_bounds__(1024) sum_partial_rows_kernel(const PartialRowSums<K> s) {
  __shared__ float tile[K][32][33];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float acc[K] = {};
  if (col < s.dim) {
#pragma unroll 4
    for (int64_t r = threadIdx.y; r < s.rows; r += 32) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        if (s.out[k] != nullptr) acc[k] += s.part[k][r * s.dim + col];
      }
    }
  }
#pragma unroll
  for (int k = 0; k < K; ++k) tile[k][threadIdx.y][threadIdx.x] = acc[k];
  __syncthreads();
  if (threadIdx.y != 0 || col >= s.dim) return;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float v[1] = {0.f};
    for (int y = 0; y < 32; ++y) v[0] += tile[k][y][threadIdx.x];
    if (s.out[k] != nullptr) store<1>(s.out[k], s.dtype, col, v);
  }
}

template <int K>
cudaError_t sum_partial_rows(const PartialRowSums<K>& s, cudaStream_t stream) {
  sum_partial_rows_kernel<K>
      <<<dim3(static_cast<unsigned>((s.dim + 31) / 32)), dim3(32, 32), 0, stream>>>(s);
  return cudaGetLastError();
}

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
