// A hardware check of what attention's Hopper kernels assume about wgmma. Those kernels were
// written and verified on fmsim (tests/cudasim), whose model of wgmma (descriptors, the 128-byte
// swizzle, K- and MN-major operands, fragment layouts) is read off the PTX ISA; a misreading would
// make them wrong on the GPU in a way no simulator test can see. This kernel multiplies known
// matrices with the kernels' own pieces, in the three forms they use (wgmma_probe.h): tiles loaded
// by load_tile_sw, descriptors from sw128_desc and desc_plus at the offsets the kernels step by,
// register A through acc_to_a, two atoms along K (as at D = 128), two commit groups, the first
// wgmma not accumulating. The same source runs on fmsim (tests/cudasim/test_simulator.py) and on
// the GPU (tests/ops/test_wgmma_probe.py), against a @ b: where the attention tile test fails on
// the GPU, this one says whether the layouts are the cause, and which form.
#include "wgmma_probe.h"

#include "attention_wgmma.cuh"

namespace fmcore {
namespace {

constexpr int kK = kWgmmaProbeK;  // two 64-column atoms of a K-major operand; eight k16 steps
// An MN-major B's 64-column tiles lie this far apart: K rows of 128 bytes, then 1024 bytes that
// nothing writes, so a wgmma that ignored the descriptor's LBO would read garbage (fmsim: NaN).
constexpr uint32_t kMnLbo = kK * 128 + 1024;

template <int N, WgmmaProbeForm kForm>
constexpr size_t probe_smem() {
  const size_t b = kForm == WgmmaProbeForm::kSS ? size_t(N) * kK * 2 : N / 64 * size_t(kMnLbo);
  return 64 * kK * 2 + b + 1024;  // A, B, and room to align them to 1024 bytes
}

template <typename T, int N, WgmmaProbeForm kForm>
__global__ void __launch_bounds__(128) wgmma_probe_kernel(const T* x, const T* y, float* out) {
  constexpr bool kSS = kForm == WgmmaProbeForm::kSS, kRS = kForm == WgmmaProbeForm::kRS;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sA = reinterpret_cast<T*>(smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023));
  T* sB = sA + 64 * kK;
  if constexpr (kSS) {
    load_tile_sw<T, kK, 64, 128>(sA, x, kK, 64, x);  // [2][64 m][64 k]
    load_tile_sw<T, kK, N, 128>(sB, y, kK, N, y);    // [2][N n][64 k]
  } else {
    if constexpr (!kRS) load_tile_sw<T, 64, kK, 128>(sA, x, 64, kK, x);  // [128 k][64 m]
#pragma unroll
    for (int t = 0; t < N / 64; ++t) {  // [128 k][64 n] each, kMnLbo bytes apart
      load_tile_sw<T, 64, kK, 128>(sB + t * (kMnLbo / 2), y + 64 * t, N, kK, y);
    }
  }
  cp_async_commit();
  cp_async_wait<0>();
  fence_proxy_async();
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  // Element e of this thread's 8-column tile j of a 64-row matrix in mma16816's c layout (a
  // warpgroup accumulator's): row 16 warp + g + 8 (e / 2), column 8 j + 2 t + e % 2; its offset
  // in a row-major matrix of `cols` columns.
  auto c_at = [&](int cols, int j, int e) {
    return (16 * warp + g + 8 * (e / 2)) * cols + 8 * j + 2 * t + e % 2;
  };
  float d[N / 8][4];
#pragma unroll
  for (auto& tile : d) {
#pragma unroll
    for (float& v : tile) v = kRS ? 0.5f : 7.f;  // kSS, kSSMn: dropped by the first wgmma
  }
  // kRS: this warp's 16 rows of A as a 16 x 128 accumulator (mma16816's c layout), then A
  // fragments, the way the kernels turn P into P V's A.
  uint32_t pa[kK / 16][4];
  if constexpr (kRS) {
    float c[kK / 8][4];
#pragma unroll
    for (int j = 0; j < kK / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        c[j][e] = static_cast<float>(x[c_at(kK, j, e)]);
      }
    }
#pragma unroll
    for (int kk = 0; kk < kK / 16; ++kk) acc_to_a<T>(pa[kk], c, kk);
    fence_regs(pa);
  }
  const uint64_t a_desc = sw128_desc(sA, kSS ? 16 : kK * 128, 1024);
  const uint64_t b_desc = sw128_desc(sB, kSS ? 16 : kMnLbo, 1024);
  fence_regs(d);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    // K-major: 16 columns on is 32 bytes along the row, the next atom after four; MN-major: 16 rows
    const uint32_t a_off = kSS ? kk / 4 * 64 * 128 + kk % 4 * 32 : kk * 16 * 128;
    const uint32_t b_off = kSS ? kk / 4 * N * 128 + kk % 4 * 32 : kk * 16 * 128;
    if constexpr (kRS) {
      wgmma_rs<T, N>(d, pa[kk], desc_plus(b_desc, b_off));
    } else {
      wgmma_ss<T, N, !kSS, !kSS>(d, desc_plus(a_desc, a_off), desc_plus(b_desc, b_off), kk > 0);
    }
    if (kk == 3) wgmma_commit();
  }
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(d);
#pragma unroll
  for (int i = 0; i < N / 8; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) out[c_at(N, i, e)] = d[i][e];
  }
}

template <typename T, int N, WgmmaProbeForm kForm>
cudaError_t launch(const void* x, const void* y, float* out, cudaStream_t stream) {
  constexpr size_t smem = probe_smem<N, kForm>();
  if (const cudaError_t err = allow_dynamic_smem<wgmma_probe_kernel<T, N, kForm>>(smem);
      err != cudaSuccess) {
    return err;
  }
  wgmma_probe_kernel<T, N, kForm>
      <<<1, 128, smem, stream>>>(static_cast<const T*>(x), static_cast<const T*>(y), out);
  return cudaGetLastError();
}

template <typename T, int N>
cudaError_t launch(WgmmaProbeForm form, const void* x, const void* y, float* out,
                   cudaStream_t stream) {
  switch (form) {
    case WgmmaProbeForm::kSS: return launch<T, N, WgmmaProbeForm::kSS>(x, y, out, stream);
    case WgmmaProbeForm::kSSMn: return launch<T, N, WgmmaProbeForm::kSSMn>(x, y, out, stream);
    case WgmmaProbeForm::kRS: return launch<T, N, WgmmaProbeForm::kRS>(x, y, out, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch(WgmmaProbeForm form, int n, const void* x, const void* y, float* out,
                   cudaStream_t stream) {
  if (n == 64) return launch<T, 64>(form, x, y, out, stream);
  if (n == 128) return launch<T, 128>(form, x, y, out, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t wgmma_probe(WgmmaProbeForm form, DType dtype, int n, const void* x, const void* y,
                        float* out, cudaStream_t stream) {
#if defined(FMCORE_SM90A)
  if (dtype == DType::kBFloat16) return launch<__nv_bfloat16>(form, n, x, y, out, stream);
  if (dtype == DType::kFloat16) return launch<__half>(form, n, x, y, out, stream);
  return cudaErrorInvalidValue;
#else
  return cudaErrorNotSupported;
#endif
}

}  // namespace fmcore
