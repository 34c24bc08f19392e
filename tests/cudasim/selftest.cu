// Kernels with known bugs (and one without), for tests/cudasim/test_simulator.py: they prove that
// fmsim reports what it claims to model instead of passing silently. Compiled like fmcore's
// kernels (transform.py), never by nvcc.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "ptx.cuh"  // fmsim_ptx.h here: fmsim's models of attention's inline PTX

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

// Warp 0 writes a shared word and warp 1 reads it with only warp shuffles in between: no barrier
// orders the two, a race on hardware whichever value warp 1 sees. Under TSan (sim-tsan) fmsim
// declares only CUDA's orderings, so TSan reports it (test_simulator.py).
__global__ void unordered_shared_kernel(float* out) {
  __shared__ float word[1];
  if (threadIdx.x == 0) word[0] = 1.f;
  const float v = __shfl_xor_sync(0xffffffffu, 1.f, 1);
  if (threadIdx.x == 32) out[0] = word[0] + v;
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

// Warp votes: out[w] = the bits of the ballot of warp w (lane i votes i % 3 == w), out[2 + w]
// its __all_sync and out[4 + w] its __any_sync of the same predicate.
__global__ void vote_kernel(float* out) {
  const unsigned w = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool vote = lane % 3 == w;
  const unsigned bits = __ballot_sync(0xffffffffu, vote);
  const int all = __all_sync(0xffffffffu, vote), any = __any_sync(0xffffffffu, vote);
  if (lane == 0) {
    std::memcpy(&out[w], &bits, sizeof bits);  // the exact bits
    out[2 + w] = static_cast<float>(all);
    out[4 + w] = static_cast<float>(any);
  }
}

// cp.async: out[0] read before any wait (in flight: NaN), out[1] the first of two groups after
// wait_group 1 (landed), out[2] the second group then (still in flight: NaN), out[3] the second
// group after wait_group 0.
__global__ void cp_async_kernel(const float* in, float* out) {
  extern __shared__ __align__(16) float stage[];
  if (threadIdx.x != 0) return;
  fmcore::cp_async16(stage, in + 4, true);
  fmcore::cp_async_commit();
  out[0] = stage[0];
  fmcore::cp_async16(stage + 4, in + 8, true);
  fmcore::cp_async_commit();
  fmcore::cp_async_wait<1>();
  out[1] = stage[0];
  out[2] = stage[4];
  fmcore::cp_async_wait<0>();
  out[3] = stage[4];
}

// ldmatrix from global memory (a wrong base pointer): undefined on hardware.
__global__ void ldmatrix_global_kernel(const float* in, float* out) {
  uint32_t r[4];
  fmcore::ldsm_x4(r, in + 4 * (threadIdx.x % 8));
  out[threadIdx.x] = static_cast<float>(r[0]);
}

// One m16n8k16 bf16 MMA with the fragments built from the PTX ISA's layout (g = lane / 4,
// t = lane % 4): A[i][k] = (i - k) / 8, B[k][n] = (k + 2n) / 16 (exact in bf16), C = 1; each lane
// writes its four results at their (row, col) of out (16 x 8).
__global__ void mma_kernel(float* out) {
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  auto a_val = [](int i, int k) { return __float2bfloat16_rn((i - k) / 8.f); };
  auto b_val = [](int k, int n) { return __float2bfloat16_rn((k + 2 * n) / 16.f); };
  auto pack = [](__nv_bfloat16 lo, __nv_bfloat16 hi) {
    uint16_t l, h;
    std::memcpy(&l, &lo, 2);
    std::memcpy(&h, &hi, 2);
    return uint32_t{l} | uint32_t{h} << 16;
  };
  const uint32_t a[4] = {pack(a_val(g, 2 * t), a_val(g, 2 * t + 1)),
                         pack(a_val(g + 8, 2 * t), a_val(g + 8, 2 * t + 1)),
                         pack(a_val(g, 2 * t + 8), a_val(g, 2 * t + 9)),
                         pack(a_val(g + 8, 2 * t + 8), a_val(g + 8, 2 * t + 9))};
  const uint32_t b0 = pack(b_val(2 * t, g), b_val(2 * t + 1, g));
  const uint32_t b1 = pack(b_val(2 * t + 8, g), b_val(2 * t + 9, g));
  float c[4] = {1.f, 1.f, 1.f, 1.f};
  fmcore::mma16816<__nv_bfloat16>(c, a, b0, b1);
  for (int e = 0; e < 4; ++e) out[(g + 8 * (e / 2)) * 8 + 2 * t + e % 2] = c[e];
}

// attention's atomic_add2 (the sm_90 float2 atomic) from every thread of 3 blocks into out[pair],
// out[pair + 1]: an odd pair is a misaligned vector atomic.
__global__ void atomic_add2_kernel(float* out, int pair) {
  fmcore::atomic_add2(out + pair, 1.f, 2.f);
}

// ex2.approx.ftz of the inputs in[0..5] into out[0..5].
__global__ void ex2_kernel(const float* in, float* out) {
  out[threadIdx.x] = fmcore::ex2_approx(in[threadIdx.x]);
}

// ---- wgmma (the layouts themselves: csrc/kernels/wgmma_probe.cu, run by test_simulator.py too)

// A descriptor of the 128-byte-swizzled operand at p (fmsim.h gives the bit fields); mode 0: none.
__device__ uint64_t sw128_desc(const void* p, uint32_t lbo, uint32_t sbo, uint64_t mode = 1) {
  return uint64_t{(fmcore::smem_addr(p) & 0x3FFFFu) >> 4} | uint64_t{lbo >> 4} << 16 |
         uint64_t{sbo >> 4} << 32 | mode << 62;
}

// What a wgmma's d holds while it is in flight. Both tiles are all ones; out[thread] = 1 when d
// was NaN after the issue and after a wait that left the chained second step in flight, then 32
// (two k16 steps of ones) after the last wait.
__global__ void wgmma_in_flight_kernel(float* out) {
  extern __shared__ __align__(1024) unsigned char tiles[];
  const uint16_t one = 0x3f80;  // bf16 1.0
  for (int i = threadIdx.x; i < 128 * 64; i += blockDim.x) std::memcpy(tiles + 2 * i, &one, 2);
  fmcore::fence_proxy_async();
  __syncthreads();
  const uint64_t da = sw128_desc(tiles, 16, 1024), db = sw128_desc(tiles + 64 * 128, 16, 1024);
  float d[8][4] = {};
  fmcore::wgmma_fence();
  fmcore::wgmma_ss<__nv_bfloat16, 64, 0, 0>(d, da, db, true);
  fmcore::wgmma_commit();
  const bool nan_issued = std::isnan(d[0][0]);
  fmcore::wgmma_ss<__nv_bfloat16, 64, 0, 0>(d, da + 2, db + 2, true);  // the next k16 step, chained
  fmcore::wgmma_commit();
  fmcore::wgmma_wait<1>();
  const bool nan_chained = std::isnan(d[3][2]);
  fmcore::wgmma_wait<0>();
  out[threadIdx.x] = nan_issued && nan_chained && d[0][0] == 32.f && d[7][3] == 32.f;
}

// Misuses of wgmma fmsim reports, by `mode`: 0 never waits for it, 1 waits without committing it,
// 2 writes d before the wait, 3 gives a descriptor no swizzle, 4 one whose last rows lie past the
// shared memory, 5 takes smem_addr of a static shared array, 6 reads operands written by ordinary
// stores with no fence.proxy.async after them (a barrier only), 7 overwrites an operand between
// issue and wait, 8 issues it with no wgmma.fence before, 9 rewrites wgmma_rs's A registers before
// the wait, 10 issues it from two of the warpgroup's four warps only.
__global__ void wgmma_misuse_kernel(int mode) {
  extern __shared__ __align__(1024) unsigned char tiles[];
  __shared__ float word[4];
  if (mode == 5) fmcore::smem_addr(word);
  if (mode >= 6) {  // zeros in both tiles, published with a fence but for 6
    uint16_t* elems = reinterpret_cast<uint16_t*>(tiles);
    for (int i = threadIdx.x; i < 128 * 64; i += blockDim.x) elems[i] = 0;
    if (mode != 6) fmcore::fence_proxy_async();
    __syncthreads();
  }
  if (mode == 10 && threadIdx.x >= 64) return;  // past every barrier
  float d[8][4] = {};
  const uint64_t da = sw128_desc(tiles, 16, 1024);
  const uint64_t db = sw128_desc(tiles + (mode == 4 ? 72 : 64) * 128, 16, 1024, mode == 3 ? 0 : 1);
  if (mode != 8) fmcore::wgmma_fence();
  uint32_t af[4] = {};
  if (mode == 9) {
    fmcore::wgmma_rs<__nv_bfloat16, 64>(d, af, db);
    af[2] = 0x3f803f80u;
  } else {
    fmcore::wgmma_ss<__nv_bfloat16, 64, 0, 0>(d, da, db, true);
  }
  if (mode != 1) fmcore::wgmma_commit();
  if (mode == 2) d[1][1] = 0.f;
  if (mode == 7) {  // every thread's wait comes after the overwrite (A's first element: 1.0)
    if (threadIdx.x == 0) reinterpret_cast<uint16_t*>(tiles)[0] = 0x3f80;
    __syncthreads();
  }
  if (mode != 0) fmcore::wgmma_wait<0>();
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
  } else if (name == "cp_async") {
    cp_async_kernel<<<1, 32, 64>>>(in, out);
    // 1 when each read saw what the model promises
    *result = std::isnan(out[0]) && out[1] == in[4] && std::isnan(out[2]) && out[3] == in[8];
  } else if (name == "ldmatrix_global") {
    ldmatrix_global_kernel<<<1, 32>>>(in, out);
  } else if (name == "mma") {
    mma_kernel<<<1, 32>>>(out);
    float worst = 0.f;  // against the exact product
    for (int i = 0; i < 16; ++i) {
      for (int n = 0; n < 8; ++n) {
        float want = 1.f;
        for (int k = 0; k < 16; ++k) want += (i - k) / 8.f * ((k + 2 * n) / 16.f);
        worst = std::max(worst, std::fabs(out[i * 8 + n] - want));
      }
    }
    *result = worst;
  } else if (name == "atomic_add2") {
    out[0] = out[1] = 0.f;
    atomic_add2_kernel<<<3, 96>>>(out, 0);
    *result = out[0] == 3 * 96 && out[1] == 2 * 3 * 96;  // no lost update
  } else if (name == "atomic_add2_misaligned") {
    atomic_add2_kernel<<<1, 32>>>(out, 1);
  } else if (name == "ex2") {
    // -inf, +inf, an exact power, a subnormal input (flushed: 2^0) and a subnormal result (flushed)
    const float x[6] = {-INFINITY, INFINITY, 3.f, -2.f, 1e-40f, -130.f};
    const float want[6] = {0.f, INFINITY, 8.f, 0.25f, 1.f, 0.f};
    std::memcpy(in, x, sizeof x);
    ex2_kernel<<<1, 6>>>(in, out);
    *result = std::memcmp(out, want, sizeof want) == 0;
  } else if (name == "wgmma_in_flight") {
    for (int i = 0; i < 128; ++i) out[i] = 0.f;
    wgmma_in_flight_kernel<<<1, 128, 2 * 64 * 128>>>(out);
    bool ok = true;
    for (int i = 0; i < 128; ++i) ok = ok && out[i] == 1.f;
    *result = ok;
  } else if (name.rfind("wgmma_misuse_", 0) == 0) {
    wgmma_misuse_kernel<<<1, 128, 2 * 64 * 128>>>(std::stoi(name.substr(13)));
  } else if (name == "unordered_shared") {
    unordered_shared_kernel<<<1, 64>>>(out);
  } else if (name == "vote") {
    vote_kernel<<<1, 64>>>(out);
    // warp 0: lanes 0, 3, ..., 30 (0x49249249); warp 1: lanes 1, 4, ..., 31 (0x92492492)
    unsigned bits[2];
    std::memcpy(bits, out, sizeof bits);
    *result = bits[0] == 0x49249249u && bits[1] == 0x92492492u && out[2] == 0.f &&
              out[3] == 0.f && out[4] == 1.f && out[5] == 1.f;
  } else if (name == "sum") {
    sum_kernel<<<3, 96>>>(in, out);
    *result = out[0] + out[1] + out[2];
  } else {
    return -1;
  }
  return static_cast<int>(cudaGetLastError());
}
