// fmsim stand-in for csrc/kernels/ptx.cuh: the same functions, with the same names and signatures,
// on fmsim's model of each instruction (fmsim.h). transform.py includes this in place of ptx.cuh and
// refuses a kernel file with inline asm left in it.
#pragma once

#include <cstdint>
#include <type_traits>

#include "fmsim.h"

namespace fmsim {
// The MMA input type of the kernel's element type T.
template <typename T>
constexpr MmaIn mma_in() {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>);
  return std::is_same_v<T, __nv_bfloat16> ? MmaIn::kBF16 : MmaIn::kF16;
}
}  // namespace fmsim

namespace fmcore {

inline uint32_t smem_addr(const void* p) { return fmsim::smem_offset(p); }

inline void cp_async16(void* dst, const void* src, bool valid) {
  fmsim::cp_async(dst, src, 16, valid ? 16 : 0);
}
inline void cp_async4(void* dst, const void* src, bool valid) {
  fmsim::cp_async(dst, src, 4, valid ? 4 : 0);
}
inline void cp_async_commit() { fmsim::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  fmsim::cp_async_wait(N);
}

inline void ldsm_x4(uint32_t (&r)[4], const void* p) { fmsim::ldmatrix_x4(r, p, false); }
inline void ldsm_x4_trans(uint32_t (&r)[4], const void* p) { fmsim::ldmatrix_x4(r, p, true); }

template <typename T>
inline void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  fmsim::mma_m16n8k16(c, a, b0, b1, fmsim::mma_in<T>());
}

inline float ex2_approx(float x) { return fmsim::ex2_approx_ftz(x); }

// The sm_90 form (the H100 runs it): one 8-byte atomic, which faults on a misaligned p.
inline void atomic_add2(float* p, float x, float y) { fmsim::atomic_add_float2(p, x, y); }

// wgmma: ptx.cuh specializes N = 64 and 128 only (another N fails to link there, to compile here).
template <typename T, int N, int kTransA, int kTransB>
inline void wgmma_ss(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  static_assert(N == 64 || N == 128);
  fmsim::wgmma_ss(&d[0][0], N, desc_a, desc_b, accumulate, kTransA == 1, kTransB == 1,
                  fmsim::mma_in<T>());
}
template <typename T, int N>
inline void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc_b) {
  static_assert(N == 64 || N == 128);
  fmsim::wgmma_rs(&d[0][0], N, a, desc_b, fmsim::mma_in<T>());
}
inline void wgmma_commit() { fmsim::wgmma_commit(); }
template <int N>
inline void wgmma_wait() {
  fmsim::wgmma_wait(N);
}
// The model takes a wgmma's register operands at issue and writes d only at the wait, so there is
// no register access for reg_fence to order (a no-op); a wgmma with no wgmma.fence since the
// thread's last wait faults, as does one that reads shared memory not published to the async
// proxy by fence.proxy.async (fmsim.h).
inline void wgmma_fence() { fmsim::wgmma_fence(); }
inline void fence_proxy_async() { fmsim::fence_proxy_async(); }
inline void reg_fence(float&) {}
inline void reg_fence(uint32_t&) {}
template <typename T>
inline T* opaque(T* p) {
  return p;
}

}  // namespace fmcore
