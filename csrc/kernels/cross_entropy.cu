// Softmax cross-entropy CUDA kernels: one block per row (grid-stride over rows).
//
// Why this shape: the op is pure memory traffic (V reads per row for the loss, V reads + V writes
// for the gradient), so each block streams one row with 16-byte loads, four in flight per thread,
// and keeps an online (max, sum-exp) pair per thread in fp32, merged across the block at the end.
// The fused loss + gradient pass needs the row twice, after the block-wide max/sum: the first read
// keeps up to kCacheBytes of the row in shared memory and the gradient pass reads it from there.
// Re-reading it from global memory was meant to hit L2, but with 3 rows of 100 KB resident per SM
// (V = 50304 bf16: ~40 MB of rows in flight, as much again of gradient being written, against a
// 50 MB L2) the second read came from DRAM: 1289 us on the H200 = 3 x N V bytes at 3.84 TB/s.
// Rows of any length and alignment vectorise: the few elements before the row's first 16-byte
// boundary and after its last one are handled one by one (V = 50257 makes every row start
// misaligned).
#include <cfloat>
#include <cstdint>

#include "common.cuh"
#include "cross_entropy.h"

namespace fmcore {

namespace {

constexpr int kMaxThreads = 512;
constexpr int kUnroll = 4;  // 16-byte loads in flight per thread
// Row bytes the fused pass keeps in shared memory: two blocks of this (+ their static arrays and
// the 1 KiB per block the hardware reserves) fit the 228 KiB of an H100/H200 SM, so two rows are
// in flight per SM. A whole bf16/fp16 row fits up to V = 56320 (fp32: 28160); past that, the rest
// of the row is read again from global memory.
constexpr int kCacheBytes = 110 << 10;

// ---- kernels

// Elements before the row's first 16-byte boundary (at most VEC - 1, at most the row).
template <typename T, int VEC>
__device__ __forceinline__ int head_len(const T* row, int vocab) {
  const int mis = static_cast<int>((reinterpret_cast<uintptr_t>(row) / sizeof(T)) % VEC);
  return min(vocab, (VEC - mis) % VEC);
}

// Calls f(i, x_i) (x as fp32) for every element of the row this thread owns, and stores the row's
// first `cached` 16-byte vectors (counted from its first 16-byte boundary) into cache. Each vector
// index is visited by the same thread here and in map_row, so a thread reads back only what it
// stored itself: no barrier is needed between the two.
// Element loops that can step past the row's end count in int64: vocab may be up to 2^31 - 1, and
// an int i = vocab - 1 + blockDim.x overflowed (undefined behaviour; a wrapped, negative index read
// and wrote before the row). The vector loops count 16-byte vectors (at most 2^29) and cannot.
template <typename T, int VEC, typename F>
__device__ __forceinline__ void visit_row(const T* row, int vocab, F&& f,
                                          Vec<T, VEC>* cache = nullptr, int cached = 0) {
  using V = Vec<T, VEC>;
  const int head = head_len<T, VEC>(row, vocab);
  const int nvec = (vocab - head) / VEC;
  const V* vrow = reinterpret_cast<const V*>(row + head);
  const int step = blockDim.x;
  for (int i = threadIdx.x; i < head; i += step) f(i, to_float(row[i]));
  int j = threadIdx.x;
  for (; j + (kUnroll - 1) * step < nvec; j += kUnroll * step) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = vrow[j + u * step];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (j + u * step < cached) cache[j + u * step] = v[u];
#pragma unroll
      for (int e = 0; e < VEC; ++e) f(head + (j + u * step) * VEC + e, to_float(v[u].v[e]));
    }
  }
  for (; j < nvec; j += step) {
    const V v = vrow[j];
    if (j < cached) cache[j] = v;
#pragma unroll
    for (int e = 0; e < VEC; ++e) f(head + j * VEC + e, to_float(v.v[e]));
  }
  for (int64_t i = head + nvec * VEC + threadIdx.x; i < vocab; i += step) {
    f(static_cast<int>(i), to_float(row[i]));
  }
}

// out[i] = f(i, in[i]) for every element; in and out may be the same row (each element is read and
// written by the same thread). Rows whose 16-byte boundaries differ go element by element. The
// first `cached` vectors of in are taken from cache, where visit_row put them.
template <typename T, int VEC, typename F>
__device__ __forceinline__ void map_row(const T* in, T* out, int vocab, F&& f,
                                        const Vec<T, VEC>* cache = nullptr, int cached = 0) {
  using V = Vec<T, VEC>;
  const int step = blockDim.x;
  const int head = head_len<T, VEC>(in, vocab);
  if (head != head_len<T, VEC>(out, vocab)) {
    for (int64_t i = threadIdx.x; i < vocab; i += step) {
      out[i] = from_float<T>(f(static_cast<int>(i), to_float(in[i])));
    }
    return;
  }
  const int nvec = (vocab - head) / VEC;
  const V* vin = reinterpret_cast<const V*>(in + head);
  V* vout = reinterpret_cast<V*>(out + head);
  for (int i = threadIdx.x; i < head; i += step) out[i] = from_float<T>(f(i, to_float(in[i])));
  int j = threadIdx.x;
  for (; j + (kUnroll - 1) * step < nvec; j += kUnroll * step) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int k = j + u * step;
      v[u] = k < cached ? cache[k] : vin[k];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      V r;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        r.v[e] = from_float<T>(f(head + (j + u * step) * VEC + e, to_float(v[u].v[e])));
      }
      vout[j + u * step] = r;
    }
  }
  for (; j < nvec; j += step) {
    const V v = j < cached ? cache[j] : vin[j];
    V r;
#pragma unroll
    for (int e = 0; e < VEC; ++e) r.v[e] = from_float<T>(f(head + j * VEC + e, to_float(v.v[e])));
    vout[j] = r;
  }
  for (int64_t i = head + nvec * VEC + threadIdx.x; i < vocab; i += step) {
    out[i] = from_float<T>(f(static_cast<int>(i), to_float(in[i])));
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void zero_row(T* out, int vocab) {
  using V = Vec<T, VEC>;
  const int step = blockDim.x;
  const int head = head_len<T, VEC>(out, vocab);
  const int nvec = (vocab - head) / VEC;
  V z;
#pragma unroll
  for (int e = 0; e < VEC; ++e) z.v[e] = from_float<T>(0.f);
  for (int i = threadIdx.x; i < head; i += step) out[i] = z.v[0];
  V* vout = reinterpret_cast<V*>(out + head);
  for (int j = threadIdx.x; j < nvec; j += step) vout[j] = z;
  for (int64_t i = head + nvec * VEC + threadIdx.x; i < vocab; i += step) out[i] = z.v[0];
}

// Online softmax state: running max m, sum of exp(x - m) s, and for label smoothing the sum of
// x - x0, x0 the row's first logit (0 if not finite): a plain sum of x lost the row's spread to a
// common offset (logits 1e4 + randn: 40x torch's error) and overflowed at 3e38.
struct Stats {
  float m, s, sum;
};

__device__ __forceinline__ Stats merge(const Stats& a, const Stats& b) {
  const float m = fmaxf(a.m, b.m);
  // Both empty (or all -inf): exp(-inf - -inf) would be NaN.
  const float s = m == -INFINITY ? 0.f : a.s * __expf(a.m - m) + b.s * __expf(b.m - m);
  return {m, s, a.sum + b.sum};
}

__device__ __forceinline__ Stats warp_merge(Stats v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const Stats o{__shfl_xor_sync(0xffffffffu, v.m, off), __shfl_xor_sync(0xffffffffu, v.s, off),
                  __shfl_xor_sync(0xffffffffu, v.sum, off)};
    v = merge(v, o);
  }
  return v;
}

// Merges every thread's Stats; all threads get the result. blockDim.x is a multiple of 32.
__device__ __forceinline__ Stats block_merge(Stats v) {
  __shared__ Stats partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_merge(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? partial[lane] : Stats{-INFINITY, 0.f, 0.f};
    v = warp_merge(v);
    if (lane == 0) partial[0] = v;
  }
  __syncthreads();
  const Stats r = partial[0];
  __syncthreads();  // partial is reused by this block's next row
  return r;
}

// d loss / d z_i times the row's factor; see cross_entropy.h for the formula.
struct GradTerms {
  float max, logsum, coef, smooth, target_coef, scale;
  int64_t target;
  __device__ __forceinline__ float operator()(int i, float x) const {
    const float prob = __expf((x - max) - logsum);
    return (prob * coef - smooth - (i == target ? target_coef : 0.f)) * scale;
  }
};

__device__ __forceinline__ GradTerms grad_terms(const CrossEntropyParams& p, int64_t row,
                                                int64_t target, float max, float logsum) {
  const float lse = max + logsum;
  return {max,
          logsum,
          1.f + 2.f * p.z_loss * lse,
          p.label_smoothing / static_cast<float>(p.vocab),
          1.f - p.label_smoothing,
          p.grad_scale[row * p.grad_scale_stride],
          target};
}

// cache_vecs: 16-byte vectors of each row kept in dynamic shared memory for the gradient pass.
template <typename T, typename TI, int VEC, bool kGrad>
__global__ void __launch_bounds__(kMaxThreads)
    cross_entropy_fwd_kernel(const CrossEntropyParams p, int cache_vecs) {
  extern __shared__ __align__(16) unsigned char smem[];
  Vec<T, VEC>* cache = reinterpret_cast<Vec<T, VEC>*>(smem);
  const int vocab = static_cast<int>(p.vocab);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t t = static_cast<int64_t>(static_cast<const TI*>(p.target)[row]);
    const T* x = static_cast<const T*>(p.logits) + row * p.logits_stride;
    T* g = kGrad ? static_cast<T*>(p.grad) + row * p.grad_stride : nullptr;
    if (t == p.ignore_index) {  // block-uniform: the whole block skips the row
      if (threadIdx.x == 0) p.loss[row] = p.stats[2 * row] = p.stats[2 * row + 1] = 0.f;
      if constexpr (kGrad) zero_row<T, VEC>(g, vocab);
      continue;
    }
    // Read z_t before block_merge's barrier: the fused pass may overwrite the row after it. An
    // out-of-range target (cross_entropy_check_target reports it) is never used as an index.
    float zt = 0.f;
    if (threadIdx.x == 0 && t >= 0 && t < vocab) zt = to_float(x[t]);
    float x0 = to_float(x[0]);
    x0 = isfinite(x0) ? x0 : 0.f;
    Stats st{-INFINITY, 0.f, 0.f};
    // The loss-only kernel (!kGrad) passes a constant empty cache: no cache code in it.
    visit_row<T, VEC>(x, vocab, [&](int, float v) {
      if (v > st.m) {
        st.s = st.s * __expf(st.m - v) + 1.f;
        st.m = v;
      } else {
        st.s += v == -INFINITY ? 0.f : __expf(v - st.m);  // NaN still propagates
      }
      st.sum += v - x0;
    }, kGrad ? cache : nullptr, kGrad ? cache_vecs : 0);
    st = block_merge(st);
    const float logsum = logf(st.s);
    if (threadIdx.x == 0) {
      // lse - z as logsum - (z - max): the subtraction of nearby values comes first, exactly
      float loss = logsum - (zt - st.m);
      if (p.label_smoothing != 0.f) {
        loss = (1.f - p.label_smoothing) * loss +
               p.label_smoothing * (logsum - (st.sum / static_cast<float>(vocab) + (x0 - st.m)));
      }
      if (p.z_loss != 0.f) loss += p.z_loss * (st.m + logsum) * (st.m + logsum);
      p.loss[row] = loss;
      p.stats[2 * row] = st.m;
      p.stats[2 * row + 1] = logsum;
    }
    if constexpr (kGrad) {
      map_row<T, VEC>(x, g, vocab, grad_terms(p, row, t, st.m, logsum), cache, cache_vecs);
    }
  }
}

template <typename T, typename TI, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    cross_entropy_bwd_kernel(const CrossEntropyParams p) {
  const int vocab = static_cast<int>(p.vocab);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t t = static_cast<int64_t>(static_cast<const TI*>(p.target)[row]);
    T* g = static_cast<T*>(p.grad) + row * p.grad_stride;
    const GradTerms terms = grad_terms(p, row, t, p.stats[2 * row], p.stats[2 * row + 1]);
    if (t == p.ignore_index || terms.scale == 0.f) {  // nothing to read: write zeros
      zero_row<T, VEC>(g, vocab);
      continue;
    }
    map_row<T, VEC>(static_cast<const T*>(p.logits) + row * p.logits_stride, g, vocab, terms);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    cross_entropy_scale_kernel(const CrossEntropyParams p) {
  const int vocab = static_cast<int>(p.vocab);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const float s = p.grad_scale[row * p.grad_scale_stride];
    if (s == 1.f) continue;  // block-uniform
    T* g = static_cast<T*>(p.grad) + row * p.grad_stride;
    map_row<T, VEC>(g, g, vocab, [s](int, float x) { return x * s; });
  }
}

template <typename TI>
__global__ void cross_entropy_check_target_kernel(const CrossEntropyParams p) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.rows;
       i += step) {
    const int64_t t = static_cast<int64_t>(static_cast<const TI*>(p.target)[i]);
    // Any one of several bad targets may win: the binding reports one.
    if (t != p.ignore_index && (t < 0 || t >= p.vocab)) *p.bad_target = t;
  }
}

// ---- launchers

dim3 grid_for(const CrossEntropyParams& p) {
  // Grid-stride over rows: any row count fits the grid limit.
  return dim3(static_cast<unsigned>(p.rows < (1 << 30) ? p.rows : (1 << 30)));
}

template <int VEC>
int threads_for(int64_t vocab) {
  // Enough threads that each holds kUnroll vectors of the row, 32..512.
  const int64_t want = (vocab + VEC * kUnroll - 1) / (VEC * kUnroll);
  const int64_t warps = (want + 31) / 32;
  return static_cast<int>(warps >= kMaxThreads / 32 ? kMaxThreads : (warps < 1 ? 32 : warps * 32));
}

template <typename T, typename TI>
cudaError_t launch(const CrossEntropyParams& p, int mode, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int threads = threads_for<kVec>(p.vocab);
  if (mode == 0) {
    cross_entropy_fwd_kernel<T, TI, kVec, false><<<grid_for(p), threads, 0, stream>>>(p, 0);
  } else if (mode == 1) {
    const int64_t row_vecs = p.vocab / kVec;  // at least the row's vectors after its head
    const int cache_vecs = static_cast<int>(
        row_vecs < kCacheBytes / 16 ? row_vecs : kCacheBytes / 16);
    const size_t smem = static_cast<size_t>(cache_vecs) * 16;
    constexpr auto kKernel = cross_entropy_fwd_kernel<T, TI, kVec, true>;
    if (const cudaError_t err = allow_dynamic_smem<kKernel>(smem); err != cudaSuccess) return err;
    kKernel<<<grid_for(p), threads, smem, stream>>>(p, cache_vecs);
  } else if (mode == 2) {
    cross_entropy_bwd_kernel<T, TI, kVec><<<grid_for(p), threads, 0, stream>>>(p);
  } else {
    cross_entropy_scale_kernel<T, kVec><<<grid_for(p), threads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_target(const CrossEntropyParams& p, int mode, cudaStream_t stream) {
  return p.target_int64 ? launch<T, int64_t>(p, mode, stream) : launch<T, int32_t>(p, mode, stream);
}

cudaError_t dispatch(const CrossEntropyParams& p, int mode, cudaStream_t stream) {
  // Nothing to do; for the scale (whose binding admits V = 0, as the CPU path does) a zero-width
  // gradient too, which must not fail as an invalid launch.
  if (p.rows == 0 || (mode == 3 && p.vocab == 0)) return cudaSuccess;
  // The binding guarantees 1 <= vocab < 2^31 (row-local indices are int).
  if (p.vocab <= 0 || p.vocab > INT32_MAX) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32:
      return dispatch_target<float>(p, mode, stream);
    case DType::kBFloat16:
      return dispatch_target<__nv_bfloat16>(p, mode, stream);
    case DType::kFloat16:
      return dispatch_target<__half>(p, mode, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t cross_entropy_fwd(const CrossEntropyParams& p, bool with_grad, cudaStream_t stream) {
  return dispatch(p, with_grad ? 1 : 0, stream);
}

cudaError_t cross_entropy_bwd(const CrossEntropyParams& p, cudaStream_t stream) {
  return dispatch(p, 2, stream);
}

cudaError_t cross_entropy_scale(const CrossEntropyParams& p, cudaStream_t stream) {
  return dispatch(p, 3, stream);  // the target type is not read
}

cudaError_t cross_entropy_check_target(const CrossEntropyParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  // One target per thread up to 256K targets, grid-stride beyond (a launch of 1024 blocks fills
  // the GPU; more would only add blocks that each read a few bytes).
  const int64_t blocks = (p.rows + kThreads - 1) / kThreads;
  const dim3 grid(static_cast<unsigned>(blocks < 1024 ? blocks : 1024));
  if (p.target_int64) {
    cross_entropy_check_target_kernel<int64_t><<<grid, kThreads, 0, stream>>>(p);
  } else {
    cross_entropy_check_target_kernel<int32_t><<<grid, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace fmcore
