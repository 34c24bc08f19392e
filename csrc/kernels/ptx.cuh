// The instructions fmcore's attention kernels use whose form depends on the hardware (sm_80+):
// inline PTX for cp.async global->shared copies, ldmatrix fragment loads, m16n8k16 tensor-core
// MMAs and the approximate 2^x, the sm_90 vector float2 atomic and sm_90a's warpgroup MMA (wgmma).
// Kept apart from the kernels so that the CPU simulator (tests/cudasim/fmsim_ptx.h) can stand in
// for exactly these functions, with the same names and signatures, and run the rest of the attention
// kernels (attention.cu and its parts) unchanged.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace fmcore {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; src_bytes 0 zero-fills the destination (no read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
// 4 bytes, likewise (through L1: the .cg form takes 16-byte copies only).
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 4 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, and register i of lane
// l receives elements (l/4, 2(l%4)) and (l/4, 2(l%4)+1) of matrix i (transposed with .trans).
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// c (16x8 fp32) += a (16x16, row) * b (16x8, col). Fragments (g = lane/4, t = lane%4):
//   a: {A[g][2t..2t+1], A[g+8][2t..2t+1], A[g][2t+8..2t+9], A[g+8][2t+8..2t+9]}
//   b: {B[2t..2t+1][g], B[2t+8..2t+9][g]}
//   c: {C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]}
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                 uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 2^x as one MUFU.EX2 (a relative error of about 2 ulp). exp2f (without --use_fast_math) wraps the
// same instruction in a range fixup so that results below 2^-126 come out as subnormals; here
// subnormal inputs and results are flushed to zero instead. 2^-inf = +0, 2^+inf = +inf.
__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// p[0] += x, p[1] += y atomically; p must be 8-byte aligned (the vector atomic faults otherwise).
// One vector atomic on sm_90, two scalar ones before.
__device__ __forceinline__ void atomic_add2(float* p, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(x, y));
#else
  atomicAdd(p, x);
  atomicAdd(p + 1, y);
#endif
}

// ---- Hopper warpgroup MMA (wgmma; sm_90a only: compiled for another arch the bodies trap, and the
// forward that uses them is launched only on sm_90 devices)
//
// A warpgroup (4 consecutive warps, the first a multiple of 4) computes D (64 x N, fp32) += A (64 x
// 16) * B (16 x N) asynchronously: issue, commit_group, then wait_group before D is read. Warp w of
// the group holds rows 16w..16w+15 of D in mma16816's c layout, n-tiles in order (d[j]: columns
// 8j..8j+7), and, for the register-A form, rows 16w..16w+15 of A in mma16816's a layout. Shared
// memory operands are read through 64-bit descriptors (attention_wgmma.cuh builds the one layout it
// uses). Shared memory written by ordinary stores or cp.async must pass fence_proxy_async() before
// a wgmma reads it.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FMCORE_WGMMA_ASM(...) asm volatile(__VA_ARGS__)
#else
#define FMCORE_WGMMA_ASM(...) __trap()
#endif

template <typename T, int N>
struct Wgmma;  // the instructions, per type and N (64 or 128), specialized below
// d (64 x N) = A * B (+ d when accumulate); A (64 x 16) and B (16 x N) in shared memory, each
// K-major (trans 0: A stored as 64 rows of 16, B as N rows of 16) or MN-major (trans 1: A stored
// as 16 rows of 64, B as 16 rows of N).
template <typename T, int N, int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b,
                                         bool accumulate) {
  Wgmma<T, N>::template ss<kTransA, kTransB>(d, desc_a, desc_b, accumulate);
}
// d (64 x N) += A * B; A (64 x 16) from registers, B (16 x N) in shared memory, MN-major.
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4],
                                         uint64_t desc_b) {
  Wgmma<T, N>::rs(d, a, desc_b);
}

#define FMCORE_D32_REGS                                                                       \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define FMCORE_D64_REGS                                                                       \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "  \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "  \
  "%56, %57, %58, %59, %60, %61, %62, %63}"
#define FMCORE_F4(j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define FMCORE_D32_OUTS                                                                    \
  FMCORE_F4(0), FMCORE_F4(1), FMCORE_F4(2), FMCORE_F4(3), FMCORE_F4(4), FMCORE_F4(5),      \
      FMCORE_F4(6), FMCORE_F4(7)
#define FMCORE_D64_OUTS                                                                    \
  FMCORE_D32_OUTS, FMCORE_F4(8), FMCORE_F4(9), FMCORE_F4(10), FMCORE_F4(11), FMCORE_F4(12), \
      FMCORE_F4(13), FMCORE_F4(14), FMCORE_F4(15)

// Operands after the N / 2 accumulators: ss: desc_a, desc_b, accumulate (the scale-d predicate p),
// trans-a, trans-b; rs: a[0..3], desc_b. The immediates scale-a, scale-b are 1 (no negation); rs's
// trans-b is 1 (MN-major).
#define FMCORE_WGMMA(TYPE, PT, N, REGS, OUTS, SS_OPS, SS_ACC, RS_OPS)                           \
  template <>                                                                                   \
  struct Wgmma<TYPE, N> {                                                                       \
    template <int kTransA, int kTransB>                                                         \
    __device__ __forceinline__ static void ss(float (&d)[N / 8][4], uint64_t desc_a,            \
                                              uint64_t desc_b, bool accumulate) {               \
      FMCORE_WGMMA_ASM("{\n.reg .pred p;\nsetp.ne.b32 p, " SS_ACC ", 0;\n"                      \
                       "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PT "." PT " " REGS     \
                       ", " SS_OPS ";\n}\n"                                                      \
                       : OUTS                                                                   \
                       : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)),           \
                         "n"(kTransA), "n"(kTransB));                                           \
    }                                                                                           \
    __device__ __forceinline__ static void rs(float (&d)[N / 8][4], const uint32_t(&a)[4],      \
                                              uint64_t desc_b) {                                \
      FMCORE_WGMMA_ASM("wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PT "." PT " " REGS     \
                       ", " RS_OPS ";\n"                                                         \
                       : OUTS                                                                   \
                       : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));              \
    }                                                                                           \
  };
#define FMCORE_WGMMA_TYPE(TYPE, PT)                                                             \
  FMCORE_WGMMA(TYPE, PT, 64, FMCORE_D32_REGS, FMCORE_D32_OUTS, "%32, %33, p, 1, 1, %35, %36",   \
               "%34", "{%32, %33, %34, %35}, %36, 1, 1, 1, 1")                                  \
  FMCORE_WGMMA(TYPE, PT, 128, FMCORE_D64_REGS, FMCORE_D64_OUTS, "%64, %65, p, 1, 1, %67, %68",  \
               "%66", "{%64, %65, %66, %67}, %68, 1, 1, 1, 1")
FMCORE_WGMMA_TYPE(__nv_bfloat16, "bf16")
FMCORE_WGMMA_TYPE(__half, "f16")
#undef FMCORE_WGMMA_TYPE
#undef FMCORE_WGMMA
#undef FMCORE_D64_OUTS
#undef FMCORE_D32_OUTS
#undef FMCORE_F4
#undef FMCORE_D64_REGS
#undef FMCORE_D32_REGS

// Orders the register accesses around wgmma: before the first wgmma that reads registers other
// instructions wrote (accumulators, register A), and commit / wait of the issued ones.
__device__ __forceinline__ void wgmma_fence() {
  FMCORE_WGMMA_ASM("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  FMCORE_WGMMA_ASM("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>  // every group but the N most recently committed is complete
__device__ __forceinline__ void wgmma_wait() {
  FMCORE_WGMMA_ASM("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Makes this thread's earlier shared-memory writes (stores, completed cp.async) visible to the
// async proxy that wgmma reads through.
__device__ __forceinline__ void fence_proxy_async() {
  FMCORE_WGMMA_ASM("fence.proxy.async.shared::cta;\n" ::: "memory");
}
#undef FMCORE_WGMMA_ASM

// No instruction: tells the compiler that r is read and rewritten here, so that accesses to
// registers an in-flight wgmma reads or writes are not moved across a wgmma_wait (placed right
// after it), and registers it reads stay allocated until then.
__device__ __forceinline__ void reg_fence(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void reg_fence(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }

// No instruction: hides how p was computed, so that p + constant addresses a memory instruction as
// [p + immediate]. Without it nvcc folds the constants of a row's accesses into the row's 64-bit
// index arithmetic and recomputes a full address (four or five instructions) for each of them.
template <typename T>
__device__ __forceinline__ T* opaque(T* p) {
  asm("" : "+l"(p));
  return p;
}

}  // namespace fmcore
