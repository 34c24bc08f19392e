// Fused AdamW and the multi-tensor L2 norm on CUDA (the math and the table scheme: adamw.h).
//
// Both are pure memory traffic, so the design goal is the fewest bytes and full-width accesses:
// - the update reads grad, exp_avg, exp_avg_sq and the param (and its fp32 master copy, if any) and
//   writes them back in one pass; the clip factor is applied to the grad in registers, never
//   written back;
// - the norm reads each grad once; its clip factor and the skip decision are read by every update
//   block from the device, so nothing waits on the host;
// - 16-byte accesses (4 fp32 state elements, 4 param elements) whenever every pointer of a
//   tensor is aligned for them; otherwise (views at odd offsets) the scalar loop, per tensor.
#include <algorithm>
#include <atomic>
#include <cstdint>

#include "adamw.h"
#include "common.cuh"

namespace fmcore {

namespace {

constexpr int kThreads = 512;
constexpr int kVecElems = 4;  // elements per vector access in the update

// The launch tables: kernel parameters, read through the constant bank (__grid_constant__ keeps the
// compiler from copying them to local memory when a block indexes them).
struct AdamWTable {
  int64_t chunk_start[kAdamWMaxTensors + 1];  // prefix sums of the tensors' chunk counts
  AdamWTensor t[kAdamWMaxTensors];
  uint8_t vec[kAdamWMaxTensors];  // 1: every pointer of the tensor allows 4-element vector access
  int n;
};

struct AdamWScalars {
  const float* lr_ptr;
  double lr, beta1, beta2, eps, weight_decay;
  const float* grad_norm;
  float max_grad_norm;
  bool clip;
  bool skip_nonfinite;
};

struct L2NormTable {
  int64_t chunk_start[kL2NormMaxTensors + 1];
  const void* data[kL2NormMaxTensors];
  int64_t numel[kL2NormMaxTensors];
  uint8_t vec[kL2NormMaxTensors];
  int n;
};

// CUDA 12.1+ allows 32764 bytes of kernel parameters on sm_70 and newer.
static_assert(sizeof(AdamWTable) + sizeof(AdamWScalars) <= 32764, "AdamW table too large");
static_assert(sizeof(L2NormTable) + sizeof(float*) <= 32764, "L2 norm table too large");

// ---- kernels

// The tensor that holds chunk c: the largest i with chunk_start[i] <= c (empty tensors have
// chunk_start[i] == chunk_start[i + 1] and are never chosen).
__device__ __forceinline__ int find_tensor(const int64_t* chunk_start, int n, int64_t c) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (chunk_start[mid] <= c) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Sum over the block, valid in thread 0. A fixed reduction tree, so the result is deterministic.
template <typename A>
__device__ A block_sum(A x) {
  __shared__ A warp_sums[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  const int nwarps = (blockDim.x + 31) / 32;
  x = threadIdx.x < nwarps ? warp_sums[threadIdx.x] : A(0);
  if (warp == 0) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  }
  return x;
}

// The per-step scalars of one tensor, in fp32 as torch's AdamW applies them.
struct StepScalars {
  float clip, decay, w1, beta2, omb2, neg_step_size, bc2_sqrt, eps;
};

// torch.lerp's formula (ATen/native/Lerp.h), so exp_avg rounds as torch's does.
__device__ __forceinline__ float lerp_like_torch(float self, float end, float w) {
  return fabsf(w) < 0.5f ? self + w * (end - self) : end - (end - self) * (1.f - w);
}

__device__ __forceinline__ void adamw_element(float& p, float& m, float& v, float g,
                                              const StepScalars& k) {
  g *= k.clip;
  p *= k.decay;
  m = lerp_like_torch(m, g, k.w1);
  v = v * k.beta2 + k.omb2 * g * g;
  const float denom = sqrtf(v) / k.bc2_sqrt + k.eps;
  p += k.neg_step_size * m / denom;
}

__device__ __forceinline__ unsigned short bits(__nv_bfloat16 x) { return __nv_bfloat16_raw(x).x; }
__device__ __forceinline__ unsigned short bits(__half x) { return __half_raw(x).x; }

// The master copy, or the param where it was edited since the last step (model.load_state_dict,
// an EMA copy-back, pruning): the last step wrote the master rounded into the param, so a param
// that holds anything else was written by someone else, and the step takes it up (else it would
// undo the edit). 2 more bytes read per element of ~30 moved.
template <typename T>
__device__ __forceinline__ float master_or_edited(float master, T param) {
  return bits(from_float<T>(master)) == bits(param) ? master : to_float(param);
}

template <typename T, bool kMaster>
__device__ __forceinline__ void adamw_scalar(const AdamWTensor& t, int64_t i,
                                             const StepScalars& k) {
  T* param = static_cast<T*>(t.param);
  float p;
  if constexpr (kMaster) {
    p = master_or_edited(t.master[i], param[i]);
  } else {
    p = to_float(param[i]);
  }
  float m = t.exp_avg[i], v = t.exp_avg_sq[i];
  adamw_element(p, m, v, to_float(static_cast<const T*>(t.grad)[i]), k);
  t.exp_avg[i] = m;
  t.exp_avg_sq[i] = v;
  if constexpr (kMaster) t.master[i] = p;
  param[i] = from_float<T>(p);
}

// Adds one to every step counter of the table, unless the step is skipped. Runs before the update,
// which then reads the incremented count.
__global__ void adamw_count_kernel(const __grid_constant__ AdamWTable tab, const AdamWScalars s) {
  if (s.skip_nonfinite && s.grad_norm != nullptr && !isfinite(*s.grad_norm)) return;
  for (int i = threadIdx.x; i < tab.n; i += blockDim.x) *tab.t[i].step += 1.f;
}

// Scalars in double from the run-time lr and step, as torch computes them in Python floats.
__device__ StepScalars step_scalars(const AdamWScalars& s, double lr, float clip,
                                    float step_count) {
  const double step = static_cast<double>(step_count);
  StepScalars k;
  k.clip = clip;
  k.decay = static_cast<float>(1.0 - lr * s.weight_decay);
  k.w1 = static_cast<float>(1.0 - s.beta1);
  k.beta2 = static_cast<float>(s.beta2);
  k.omb2 = static_cast<float>(1.0 - s.beta2);
  k.neg_step_size = static_cast<float>(-(lr / (1.0 - pow(s.beta1, step))));
  k.bc2_sqrt = static_cast<float>(sqrt(1.0 - pow(s.beta2, step)));
  k.eps = static_cast<float>(s.eps);
  return k;
}

// Elements [begin, min(numel, begin + kAdamWChunk)) of one tensor.
template <typename T, bool kMaster>
__device__ __forceinline__ void adamw_chunk(const AdamWTensor& t, bool vec, int64_t begin,
                                            const StepScalars& k) {
  const int64_t end = min(t.numel, begin + kAdamWChunk);
  int64_t scalar_begin = begin;
  if (vec) {
    using VT = Vec<T, kVecElems>;
    using VF = Vec<float, kVecElems>;
    const int64_t vec_end = begin + (end - begin) / kVecElems * kVecElems;
    T* param = static_cast<T*>(t.param);
    const T* grad = static_cast<const T*>(t.grad);
    for (int64_t i = begin + kVecElems * threadIdx.x; i < vec_end; i += kVecElems * blockDim.x) {
      const VT g = *reinterpret_cast<const VT*>(grad + i);
      VF m = *reinterpret_cast<const VF*>(t.exp_avg + i);
      VF v = *reinterpret_cast<const VF*>(t.exp_avg_sq + i);
      VF p;
      const VT pt = *reinterpret_cast<const VT*>(param + i);
      if constexpr (kMaster) {
        p = *reinterpret_cast<const VF*>(t.master + i);
#pragma unroll
        for (int e = 0; e < kVecElems; ++e) p.v[e] = master_or_edited(p.v[e], pt.v[e]);
      } else {
#pragma unroll
        for (int e = 0; e < kVecElems; ++e) p.v[e] = to_float(pt.v[e]);
      }
      VT out;
#pragma unroll
      for (int e = 0; e < kVecElems; ++e) {
        adamw_element(p.v[e], m.v[e], v.v[e], to_float(g.v[e]), k);
        out.v[e] = from_float<T>(p.v[e]);
      }
      *reinterpret_cast<VF*>(t.exp_avg + i) = m;
      *reinterpret_cast<VF*>(t.exp_avg_sq + i) = v;
      if constexpr (kMaster) *reinterpret_cast<VF*>(t.master + i) = p;
      *reinterpret_cast<VT*>(param + i) = out;
    }
    scalar_begin = vec_end;
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < end; i += blockDim.x) {
    adamw_scalar<T, kMaster>(t, i, k);
  }
}

// Blocks stride over the table's chunks in increasing order, so a block recomputes the per-tensor
// scalars only when its next chunk belongs to another tensor.
template <typename T, bool kMaster>
__global__ void __launch_bounds__(kThreads, 2)
    adamw_step_kernel(const __grid_constant__ AdamWTable tab, const AdamWScalars s) {
  float clip = 1.f;
  if (s.grad_norm != nullptr) {
    const float norm = *s.grad_norm;
    if (s.skip_nonfinite && !isfinite(norm)) return;
    if (s.clip) {
      // torch.clamp(coef, max=1) as clip_grad_norm_ does: a NaN norm gives a NaN factor (fminf
      // would return 1 and update every finite element with unclipped grads).
      const float coef = s.max_grad_norm / (norm + 1e-6f);
      clip = coef > 1.f ? 1.f : coef;
    }
  }
  const double lr = s.lr_ptr != nullptr ? static_cast<double>(*s.lr_ptr) : s.lr;
  const int64_t num_chunks = tab.chunk_start[tab.n];
  int ti = -1;
  StepScalars k{};
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const int tc = find_tensor(tab.chunk_start, tab.n, c);
    if (tc != ti) {
      ti = tc;
      k = step_scalars(s, lr, clip, *tab.t[ti].step);
    }
    adamw_chunk<T, kMaster>(tab.t[ti], tab.vec[ti] != 0, (c - tab.chunk_start[ti]) * kAdamWChunk,
                            k);
  }
}

// Squares are accumulated in double: free in a bandwidth-bound pass, and the norm of a billion
// elements then carries no fp32 summation error.
template <typename T>
__global__ void __launch_bounds__(kThreads, 4)
    l2norm_partials_kernel(const __grid_constant__ L2NormTable tab, double* partials) {
  constexpr int kVec = 16 / sizeof(T);
  using V = Vec<T, kVec>;
  double acc = 0.0;
  const int64_t num_chunks = tab.chunk_start[tab.n];
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const int ti = find_tensor(tab.chunk_start, tab.n, c);
    const T* x = static_cast<const T*>(tab.data[ti]);
    const int64_t begin = (c - tab.chunk_start[ti]) * kL2NormChunk;
    const int64_t end = min(tab.numel[ti], begin + kL2NormChunk);
    int64_t scalar_begin = begin;
    if (tab.vec[ti]) {
      const int64_t vec_end = begin + (end - begin) / kVec * kVec;
      for (int64_t i = begin + kVec * threadIdx.x; i < vec_end; i += kVec * blockDim.x) {
        const V xv = *reinterpret_cast<const V*>(x + i);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const double f = to_float(xv.v[e]);
          acc = fma(f, f, acc);
        }
      }
      scalar_begin = vec_end;
    }
    for (int64_t i = scalar_begin + threadIdx.x; i < end; i += blockDim.x) {
      const double f = to_float(x[i]);
      acc = fma(f, f, acc);
    }
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// One block: the partials summed in a fixed order, then the square root.
__global__ void l2norm_finalize_kernel(const double* partials, int64_t n, float* norm,
                                       int64_t* nonfinite_count) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += partials[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    const float r = static_cast<float>(sqrt(acc));
    *norm = r;
    if (nonfinite_count != nullptr && !isfinite(r)) *nonfinite_count += 1;
  }
}

// ---- launchers

bool aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Blocks of kKernel that run at once on the current device: the grid of a grid-stride launch.
// Cached per device after the first query, so a step captured in a CUDA graph (after an eager
// warm-up step) makes no occupancy queries while capturing.
template <auto kKernel>
cudaError_t resident_blocks(int* blocks) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];  // 0: not measured yet
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable && (*blocks = cache[device].load(std::memory_order_relaxed)) > 0)
    return cudaSuccess;
  int sms = 0, per_sm = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kKernel, kThreads, 0);
  if (err != cudaSuccess) return err;
  *blocks = std::max(per_sm, 1) * std::max(sms, 1);
  if (cacheable) cache[device].store(*blocks, std::memory_order_relaxed);
  return cudaSuccess;
}

template <typename T, bool kMaster>
cudaError_t launch_adamw(const AdamWParams& p, const AdamWScalars& s, cudaStream_t stream) {
  int resident = 0;
  cudaError_t err = resident_blocks<adamw_step_kernel<T, kMaster>>(&resident);
  if (err != cudaSuccess) return err;
  AdamWTable tab{};
  int64_t i = 0;
  while (i < p.num_tensors) {
    tab.n = 0;
    tab.chunk_start[0] = 0;
    for (; i < p.num_tensors && tab.n < kAdamWMaxTensors; ++i) {
      const AdamWTensor& t = p.tensors[i];
      if (t.numel < 0) return cudaErrorInvalidValue;
      constexpr size_t kParamBytes = kVecElems * sizeof(T), kStateBytes = kVecElems * sizeof(float);
      tab.vec[tab.n] = aligned(t.param, kParamBytes) && aligned(t.grad, kParamBytes) &&
                       aligned(t.exp_avg, kStateBytes) && aligned(t.exp_avg_sq, kStateBytes) &&
                       (!kMaster || aligned(t.master, kStateBytes));
      tab.t[tab.n] = t;
      tab.chunk_start[tab.n + 1] =
          tab.chunk_start[tab.n] + (t.numel + kAdamWChunk - 1) / kAdamWChunk;
      ++tab.n;
    }
    adamw_count_kernel<<<1, 128, 0, stream>>>(tab, s);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    const int64_t grid = std::min<int64_t>(tab.chunk_start[tab.n], resident);
    if (grid == 0) continue;  // only empty tensors: their steps still count
    adamw_step_kernel<T, kMaster><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(tab, s);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_l2norm_table(const L2NormTable& tab, double* partials, int64_t* written,
                                cudaStream_t stream) {
  int resident = 0;
  const cudaError_t err = resident_blocks<l2norm_partials_kernel<T>>(&resident);
  if (err != cudaSuccess) return err;
  const int64_t grid = std::min<int64_t>({tab.chunk_start[tab.n], resident, kL2NormBlocks});
  if (grid == 0) return cudaSuccess;
  l2norm_partials_kernel<T>
      <<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(tab, partials + *written);
  *written += grid;
  return cudaGetLastError();
}

cudaError_t launch_l2norm_dtype(const L2NormParams& p, DType dtype, int64_t* written,
                                cudaStream_t stream) {
  L2NormTable tab{};
  auto flush = [&]() -> cudaError_t {
    if (tab.n == 0) return cudaSuccess;
    cudaError_t err = cudaErrorInvalidValue;
    switch (dtype) {
      case DType::kFloat32:
        err = launch_l2norm_table<float>(tab, p.partials, written, stream);
        break;
      case DType::kBFloat16:
        err = launch_l2norm_table<__nv_bfloat16>(tab, p.partials, written, stream);
        break;
      case DType::kFloat16:
        err = launch_l2norm_table<__half>(tab, p.partials, written, stream);
        break;
    }
    tab.n = 0;
    return err;
  };
  for (int64_t i = 0; i < p.num_tensors; ++i) {
    const L2NormTensor& t = p.tensors[i];
    if (t.dtype != dtype || t.numel <= 0) continue;
    if (tab.n == 0) tab.chunk_start[0] = 0;
    tab.data[tab.n] = t.data;
    tab.numel[tab.n] = t.numel;
    tab.vec[tab.n] = aligned(t.data, 16);
    tab.chunk_start[tab.n + 1] =
        tab.chunk_start[tab.n] + (t.numel + kL2NormChunk - 1) / kL2NormChunk;
    if (++tab.n == kL2NormMaxTensors) {
      const cudaError_t err = flush();
      if (err != cudaSuccess) return err;
    }
  }
  return flush();
}

}  // namespace

cudaError_t adamw_step(const AdamWParams& p, cudaStream_t stream) {
  if (p.num_tensors == 0) return cudaSuccess;
  AdamWScalars s;
  s.lr_ptr = p.lr_ptr;
  s.lr = p.lr;
  s.beta1 = p.beta1;
  s.beta2 = p.beta2;
  s.eps = p.eps;
  s.weight_decay = p.weight_decay;
  s.grad_norm = p.grad_norm;
  s.clip = p.grad_norm != nullptr && p.max_grad_norm >= 0.0;
  s.max_grad_norm = static_cast<float>(p.max_grad_norm);
  s.skip_nonfinite = p.skip_nonfinite;
  const bool master = p.master;
  switch (p.dtype) {
    case DType::kFloat32:
      if (master) return cudaErrorInvalidValue;  // a master copy of an fp32 param is the param
      return launch_adamw<float, false>(p, s, stream);
    case DType::kBFloat16:
      return master ? launch_adamw<__nv_bfloat16, true>(p, s, stream)
                    : launch_adamw<__nv_bfloat16, false>(p, s, stream);
    case DType::kFloat16:
      return master ? launch_adamw<__half, true>(p, s, stream)
                    : launch_adamw<__half, false>(p, s, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t l2norm(const L2NormParams& p, cudaStream_t stream) {
  int64_t written = 0;
  for (DType d : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
    const cudaError_t err = launch_l2norm_dtype(p, d, &written, stream);
    if (err != cudaSuccess) return err;
  }
  l2norm_finalize_kernel<<<1, kThreads, 0, stream>>>(p.partials, written, p.norm,
                                                     p.nonfinite_count);
  return cudaGetLastError();
}

}  // namespace fmcore
