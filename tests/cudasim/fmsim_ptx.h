// fmsim stand-in for csrc/kernels/ptx.cuh: the same functions, with the same names and signatures,
// on fmsim's model of each instruction (fmsim.h). transform.py includes this in place of ptx.cuh and
// refuses a kernel file with inline asm left in it.
#pragma once

#include <cstdint>
#include <type_traits>

#include "fmsim.h"

namespace fmcore {

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
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>);
  fmsim::mma_m16n8k16(c, a, b0, b1,
                      std::is_same_v<T, __nv_bfloat16> ? fmsim::MmaIn::kBF16 : fmsim::MmaIn::kF16);
}

inline float ex2_approx(float x) { return fmsim::ex2_approx_ftz(x); }

// The sm_90 form (the H100 runs it): one 8-byte atomic, which faults on a misaligned p.
inline void atomic_add2(float* p, float x, float y) { fmsim::atomic_add_float2(p, x, y); }

}  // namespace fmcore
