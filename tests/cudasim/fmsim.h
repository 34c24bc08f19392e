// fmsim: a small CUDA-on-CPU simulator that runs fmcore's CUDA kernels (rope, cross entropy,
// add_norm, adamw, and flash attention with its inline PTX through fmsim_ptx.h) as ordinary C++ so
// that their index math, bounds, vector alignment, barriers, warp shuffles and tensor-core fragment
// layouts are exercised without a GPU (tests/cudasim/test_kernels_on_cpu.py,
// test_attention_on_cpu.py).
//
// What it models:
// - A launch runs its blocks one after another; inside a block every CUDA thread is a real OS
//   thread (so ASan/TSan see real concurrent accesses), with thread-local threadIdx/blockIdx/
//   blockDim/gridDim. Launches are synchronous and serialized.
// - __syncthreads is a block barrier; a thread that returned counts as arrived (as on Volta+).
// - Warp shuffles and votes (full mask only) and the warp-collective PTX (ldmatrix, mma.sync)
//   exchange values through a per-warp slot array at a 32-lane barrier. A shuffle in a warp with
//   fewer than 32 live lanes (a lane returned, or a partial last warp) is undefined on hardware
//   and reported as an error.
// - The inline PTX attention uses (cp.async, ldmatrix, mma.sync, ex2.approx, Hopper's asynchronous
//   warpgroup MMA wgmma; see the declarations below), and float atomicAdd and the sm_90 float2
//   atomicAdd (attention's atomic_add2) as real atomics.
// - A deadlock (every live thread waits at a barrier, but no barrier can complete: a divergent
//   __syncthreads or shuffle) is detected exactly, at once, and fails the launch with a message
//   naming the kernel, the block and where the threads wait.
// - Launch validation as CUDA does it: block <= 1024 threads (x, y <= 1024, z <= 64), grid x
//   < 2^31, y and z <= 65535, no zero dimension, dynamic shared memory <= 48 KiB unless the kernel
//   opted in with cudaFuncSetAttribute (<= 227 KiB). A failed validation sets the error
//   cudaGetLastError returns; the kernel does not run. A block larger than the kernel's
//   __launch_bounds__ fails the launch (checked at kernel entry).
// - Dynamic shared memory is a fresh allocation of exactly the requested size per launch (ASan
//   catches an access past it), 1024-byte aligned (the 128-byte swizzle's period, so a pointer's
//   swizzle bits and its smem_addr offset agree), filled with NaN bytes (0xff) before every
//   block. Static __shared__ arrays are function statics (one block runs at a time), filled with
//   NaN bytes before every block too, from the second block that declares them on (the first sees
//   zeros).
// - Vector accesses: every reinterpret_cast to a pointer in the kernel files is checked for the
//   pointee's alignment (a 16-byte Vec must be 16-byte aligned, as the hardware demands).
// - The device is an H100 as far as per-block limits go (227 KiB opt-in shared memory, 1024
//   threads) but has only kSimSmCount SMs, so that grid-stride loops and per-block partial sums run
//   several iterations at test sizes. CPU tensors stand for device memory (device index -1 or 0).
//
// - A fault (deadlock, bad shuffle, misaligned access, exceeded launch bounds) throws from the
//   launch: the binding's op raises RuntimeError("fmsim: ...") in Python.
//
// What it does not model: any memory model weaker than sequential consistency (every barrier is a
// full fence here), timing and occupancy (the occupancy query is a simple formula from threads and
// shared memory), registers and local memory, partial warp masks, which thread's fence.proxy.async
// publishes an ordinary store (any thread's does here; see wgmma below), streams and events
// (everything is synchronous), fast-math intrinsics' error (__expf is expf, rsqrtf 1/sqrtf,
// ex2.approx exact but for its flush to zero), the static shared memory's size limit, and
// out-of-bounds global accesses unless built with FMCORE_SIM_SANITIZE=address (then ASan reports
// them).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// cuda_runtime.h declares this C++ overload only for nvcc (it is inside `#if defined __CUDACC__`).
template <class T>
inline cudaError_t cudaFuncSetAttribute(T* func, enum cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(func), attr, value);
}

namespace fmsim {

inline constexpr int kSimSmCount = 4;

// <<<grid, block, smem, stream>>>
struct Config {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  Config(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr)
      : grid(g), block(b), smem(s), stream(st) {}
};

// Runs body(ctx) once in every CUDA thread of every block (fmsim.cpp). Throws std::runtime_error
// when a thread faults (deadlock, bad shuffle, misaligned vector access, ...).
void run(const void* kernel, std::string name, const Config& c, void (*body)(void*), void* ctx);

// The name fault messages give a kernel launched as `expr` in `function` (its __PRETTY_FUNCTION__):
// `expr` itself, or, when it is a template parameter of that function (attention's generic
// launch<kKernel>), the kernel it stands for there.
std::string kernel_name(const char* expr, const char* function);

// kernel<<<c>>>(args...): the arguments are converted to the kernel's parameter types once, then
// every thread gets its own copy (kernel parameters are by value).
template <class... P, class... A>
void launch(void (*kernel)(P...), std::string name, const Config& c, A&&... args) {
  using Params = std::tuple<std::decay_t<P>...>;
  struct Ctx {
    void (*kernel)(P...);
    Params params;
  } ctx{kernel, Params(std::forward<A>(args)...)};
  run(
      reinterpret_cast<const void*>(kernel), std::move(name), c,
      [](void* p) {
        Ctx* x = static_cast<Ctx*>(p);
        Params copy = x->params;
        std::apply(x->kernel, std::move(copy));
      },
      &ctx);
}

// The calling CUDA thread fails the launch with this message (or, outside a kernel, throws).
[[noreturn]] void fault(const char* what);

// The launch's dynamic shared memory (extern __shared__ T name[]).
void* dynamic_smem_bytes();
template <class T>
T* dynamic_smem() {
  return static_cast<T*>(dynamic_smem_bytes());
}

// A static __shared__ array (the transform calls this after its declaration): poisoned with NaN
// bytes before every later block.
void shared_region(void* p, size_t bytes);

// __launch_bounds__(max_threads, ...): launching more threads per block fails on hardware.
void launch_bounds(int max_threads, int min_blocks = 0, int max_blocks_per_cluster = 0);

void syncthreads();
void syncwarp(unsigned mask);
enum class Shfl { kIdx, kUp, kDown, kXor };
// Exchanges `bytes` (<= 16) bytes at value among the 32 lanes; writes the source lane's into out.
void shuffle(unsigned mask, const void* value, void* out, size_t bytes, Shfl mode, int arg,
             int width);
// __ballot_sync: bit i of the result is lane i's predicate, for every lane of the warp.
unsigned ballot(unsigned mask, bool pred);

// The inline PTX of csrc/kernels/ptx.cuh, which fmsim_ptx.h maps onto these.
// - cp.async: a copy is in flight from issue to the cp.async.wait_group that covers its group.
//   Its destination is filled with NaN bytes at issue and written (the source, or zeros past
//   src_bytes) only at that wait: a read before the wait, or a copy issued into a tile another warp
//   still reads, shows up as NaN. Destination: shared memory, `bytes`-aligned; source likewise
//   aligned when read.
// - ldmatrix.x4 (.trans): a warp collective over the 32 lanes' row addresses (16-byte aligned,
//   in shared memory), with the fragment layout of the PTX ISA.
// - mma.sync m16n8k16 (f32 += bf16/f16 x bf16/f16): a warp collective; the 16 products are summed
//   in double and rounded once (the hardware's fp32 accumulation order is unspecified).
// - ex2.approx.ftz.f32: exp2 of the input, with subnormal inputs and results flushed to zero (the
//   hardware's approximation error, about 2 ulp, is not modelled).
// - smem_addr (cvta.to.shared): the byte offset of p from the dynamic shared memory's base; p
//   elsewhere (a static __shared__ array included) faults.
// - wgmma.mma_async m64nNk16 (f32 += bf16/f16 x bf16/f16, N = 64 or 128): D (64 x N) of the
//   warpgroup (4 consecutive warps, warp index / 4), warp w % 4 holding rows 16(w % 4).. + 15 in
//   mma.sync's c layout (d[i]: columns 8i..8i+7) and, for the register-A form, A's same rows in
//   mma.sync's a layout (exchanged within the warp at issue). Shared-memory operands through
//   descriptors: start address, LBO and SBO >> 4 in bits 0-13, 16-29, 32-45, the 128-byte swizzle
//   (mode 1 in bits 62-63) the only layout modelled (any other mode, or another bit set, faults);
//   byte addr lies at addr ^ ((addr >> 7) % 8) << 4 of the dynamic shared memory. Element (i, k),
//   i the M (A) or N (B) index: K-major (trans 0) at start + (i % 8) 128 + (i / 8) SBO + 2k;
//   MN-major (trans 1; wgmma_rs's B always) at start + 2 (i % 64) + (i / 64) LBO + (k % 8) 128 +
//   (k / 8) SBO.
//   Asynchronous as on hardware: an issued wgmma only records its operands (register A and the
//   input accumulators as they are then) and fills d with NaN; it runs, reading shared memory
//   then, at the wgmma.wait_group that covers its commit group (ops run in issue order; one
//   issued on a d that an earlier pending one writes takes that one's result). So d read before
//   the wait is NaN, d or wgmma_rs's A registers written before the wait fault (checked when the
//   op runs; A must then still be in scope, as its registers must stay allocated on hardware), and
//   a wgmma never committed and waited for when the thread returns faults. Products summed as in
//   mma.sync. Register ordering is not modelled (the model orders by program order within a
//   thread; reg_fence is a no-op), but a wgmma issued with no wgmma.fence since the thread's last
//   wgmma.wait_group, or before its first wgmma, faults: stricter than the PTX ISA, which needs
//   the fence only once the thread has accessed the wgmma's registers (fmcore's kernels read the
//   accumulators after every wait). The async proxy (through which wgmma reads shared
//   memory): a wgmma that reads a byte a landed cp.async wrote faults unless the copying thread
//   ran fence.proxy.async after the copy landed (its cp.async.wait) and before the read; and a
//   wgmma reads shared memory as it was at the first wgmma issued after the latest
//   fence.proxy.async of any thread, faulting on an operand byte written since (an ordinary store
//   with no fence after it, or a write to an operand while the wgmma was in flight).
void fence_proxy_async();
void cp_async(void* dst, const void* src, size_t bytes, size_t src_bytes);
void cp_async_commit();
void cp_async_wait(int n);  // every group but the n most recently committed is complete
void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans);
enum class MmaIn { kBF16, kF16 };
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, MmaIn in);
float ex2_approx_ftz(float x);
uint32_t smem_offset(const void* p);
// d: the N / 8 x 4 accumulators (float (&)[N / 8][4] flattened).
void wgmma_ss(float* d, int n, uint64_t desc_a, uint64_t desc_b, bool accumulate, bool a_mn,
              bool b_mn, MmaIn in);
void wgmma_rs(float* d, int n, const uint32_t (&a)[4], uint64_t desc_b, MmaIn in);
void wgmma_commit();
void wgmma_wait(int n);  // every group but the n most recently committed is complete
void wgmma_fence();

// reinterpret_cast with the alignment check of the target (kernel files use it through the source
// transform): a pointer's pointee, or the object a reference cast views (`from` is taken by
// reference so that such a cast still names the caller's object, not a copy).
template <class To, class From>
inline To rcast(From&& from) {
  using F = std::remove_cvref_t<From>;
  auto check = [](const void* at, size_t align) {
    if (reinterpret_cast<uintptr_t>(at) % align != 0) {
      fault("misaligned vector access: a pointer cast to a type that needs more alignment");
    }
  };
  if constexpr (std::is_pointer_v<To> && std::is_pointer_v<F>) {
    using E = std::remove_cv_t<std::remove_pointer_t<To>>;
    if constexpr (!std::is_void_v<E> && !std::is_function_v<E>) check(from, alignof(E));
  } else if constexpr (std::is_reference_v<To>) {
    check(&from, alignof(std::remove_reference_t<To>));
  }
  return reinterpret_cast<To>(from);
}

}  // namespace fmsim

// ---- device code: only in the transformed kernel files (FMSIM_KERNEL_TU), after the CUDA
// headers above have used the attribute macros it redefines.
#ifdef FMSIM_KERNEL_TU

#include <math.h>

#include <atomic>
#include <cmath>
#include <cstring>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __noinline__
#undef __shared__
#undef __grid_constant__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
// Blocks run one at a time, so a function-local static is exactly one block's shared memory.
#define __shared__ static
#define __grid_constant__
#define __launch_bounds__(...)  // the transform turns it into an fmsim::launch_bounds check

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
inline constexpr int warpSize = 32;

inline void __syncthreads() { fmsim::syncthreads(); }
[[noreturn]] inline void __trap() { fmsim::fault("__trap() called"); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { fmsim::syncwarp(mask); }

template <class T>
T fmsim_shfl(unsigned mask, T v, fmsim::Shfl mode, int arg, int width) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>);
  T out;
  fmsim::shuffle(mask, &v, &out, sizeof(T), mode, arg, width);
  return out;
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return fmsim_shfl(mask, v, fmsim::Shfl::kIdx, src, width);
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return fmsim_shfl(mask, v, fmsim::Shfl::kUp, static_cast<int>(delta), width);
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return fmsim_shfl(mask, v, fmsim::Shfl::kDown, static_cast<int>(delta), width);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return fmsim_shfl(mask, v, fmsim::Shfl::kXor, lane_mask, width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return fmsim::ballot(mask, pred != 0); }
inline int __all_sync(unsigned mask, int pred) { return fmsim::ballot(mask, pred != 0) == mask; }
inline int __any_sync(unsigned mask, int pred) { return fmsim::ballot(mask, pred != 0) != 0; }

// Global atomics: real atomics between the OS threads of a block (blocks run one at a time).
inline float atomicAdd(float* p, float v) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(float) != 0) fmsim::fault("misaligned atomicAdd");
  return std::atomic_ref<float>(*p).fetch_add(v);
}

namespace fmsim {
// sm_90's atomicAdd(float2*, float2): both halves in one atomic step, on an 8-byte aligned address.
inline void atomic_add_float2(float* p, float x, float y) {
  if (reinterpret_cast<uintptr_t>(p) % 8 != 0) fault("misaligned float2 atomicAdd");
  std::atomic_ref<uint64_t> word(*reinterpret_cast<uint64_t*>(p));
  uint64_t seen = word.load();
  for (;;) {
    float v[2];
    std::memcpy(v, &seen, sizeof(v));
    v[0] += x;
    v[1] += y;
    uint64_t sum;
    std::memcpy(&sum, v, sizeof(sum));
    if (word.compare_exchange_weak(seen, sum)) return;
  }
}
}  // namespace fmsim

// Fast-math intrinsics: the exact functions (the hardware's are a few ulp off).
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }

// CUDA's device min/max overloads, with the usual arithmetic conversions.
template <class A, class B>
  requires std::is_arithmetic_v<A> && std::is_arithmetic_v<B>
constexpr std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <class A, class B>
  requires std::is_arithmetic_v<A> && std::is_arithmetic_v<B>
constexpr std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}

#endif  // FMSIM_KERNEL_TU
