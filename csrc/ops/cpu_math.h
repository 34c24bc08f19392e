// Elementwise math for the CPU loops that the compiler vectorizes itself: an exponential written
// as plain arithmetic (libm's expf is a call, which stops vectorization), a sigmoid from it, and
// the attribute that builds such a loop for several x86 vector widths.
//
// A file whose loops use these is compiled with -fno-trapping-math (CMakeLists.txt): with
// floating-point traps assumed possible, GCC does not if-convert the selects below, and a loop
// with a branch is not vectorized.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace fmcore {

// FMCORE_CPU_CLONES before a function compiles it for AVX-512, AVX2 + FMA and the baseline, and
// picks the best the CPU has when the library loads (GCC's function multiversioning). The
// baseline x86-64 target vectorizes with 4-wide SSE2 and no FMA: bias_gelu's tanh loop on 1M
// floats, one thread, took 1.64 ms built for it, 0.64 ms for AVX2 and 0.45 ms for AVX-512.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define FMCORE_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FMCORE_CPU_CLONES
#endif

// e^x, saturated: 0 below -80 and +infinity above 80, so that e^x, 1 / e^x, 1 + e^x and their
// quotients are all normal numbers or exactly 0 or infinity (denormal operands cost microcode
// assists, ~100 cycles each); a sigmoid built from it is exactly 0 or 1 past +-80. Relative error
// about 2e-7 in fp32 (the rounding of r; the polynomial's own is 5e-9).
// e^x = 2^n e^r, n = round(x / ln 2), |r| <= ln(2) / 2, e^r by its Taylor series to r^7 (the
// remainder, 0.35^8 / 8!, is 5e-9); ln 2 in two parts so that n ln 2 is exact. A NaN stays NaN.
inline float exp_saturated(float x) {
  const float c = x < -80.f ? -80.f : (x > 80.f ? 80.f : x);
  constexpr float kLog2e = 1.44269504f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  // Adding 1.5 * 2^23 rounds to an integer, n, which then sits in the sum's low mantissa bits: 2^n
  // is built from those bits, with no float-to-integer conversion (undefined for a NaN).
  constexpr float kRound = 12582912.f;
  constexpr uint32_t kRoundBits = 0x4B400000u;
  const float t = c * kLog2e + kRound;
  const float n = t - kRound;
  const float r = (c - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.f / 5040;
  p = p * r + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  uint32_t bits;
  std::memcpy(&bits, &t, sizeof bits);
  bits = (bits - kRoundBits + 127u) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -80.f ? 0.f : (x > 80.f ? std::numeric_limits<float>::infinity() : p * scale);
}

// fp64 (the fp64 paths, for tests): libm's, saturated the same way.
inline double exp_saturated(double x) {
  return x < -80.0 ? 0.0 : (x > 80.0 ? std::numeric_limits<double>::infinity() : std::exp(x));
}

// sigmoid(x) = 1 / (1 + e^-x) and sigmoid(-x) = 1 - sigmoid(x) (computed as 1 / (1 + e^x), exact
// where sigmoid(x) ~ 1) from e = exp_saturated(-x); both exactly 0 or 1 past +-80.
template <typename T>
struct Sigmoid {
  T s, one_minus_s;
  explicit Sigmoid(T e) : s(1 / (1 + e)), one_minus_s(1 / (1 + 1 / e)) {}
};

}  // namespace fmcore
