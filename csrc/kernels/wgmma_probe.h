// A check of the wgmma building blocks that attention's Hopper kernels are made of, one warpgroup
// multiplying known matrices (wgmma_probe.cu says why and how).
#pragma once

#include <optional>
#include <string_view>

#include "dtype.h"

namespace fmcore {

// The three ways attention_wgmma.cuh feeds a wgmma, out (64 x N) = A (64 x 128) B (128 x N):
//  kSS:   A and B K-major in shared memory (S = Q K^T; the backward's S^T and dP^T);
//         x = A (64 x 128), y = B transposed (N x 128).
//  kSSMn: A and B MN-major in shared memory (the backward's dQ = dS K);
//         x = A transposed (128 x 64), y = B (128 x N).
//  kRS:   A from registers (acc_to_a), B MN-major in shared memory (O += P V; dV, dK), onto an
//         accumulator of 0.5s; x = A (64 x 128), y = B (128 x N).
// x and y contiguous, row-major; out 64 x N fp32, row-major.
enum class WgmmaProbeForm : int { kSS = 0, kSSMn = 1, kRS = 2 };
constexpr int kWgmmaProbeK = 128;

// The form of a name as the tests give it ("ss", "ss_mn", "rs"); none for another name.
inline std::optional<WgmmaProbeForm> wgmma_probe_form(std::string_view name) {
  if (name == "ss") return WgmmaProbeForm::kSS;
  if (name == "ss_mn") return WgmmaProbeForm::kSSMn;
  if (name == "rs") return WgmmaProbeForm::kRS;
  return std::nullopt;
}

#ifdef FMCORE_CUDA_API
// dtype bf16 or fp16, n 64 or 128 (cudaErrorInvalidValue otherwise). cudaErrorNotSupported when the
// build has no sm_90a code; the caller makes sure the device is a 9.x one.
cudaError_t wgmma_probe(WgmmaProbeForm form, DType dtype, int n, const void* x, const void* y,
                        float* out, cudaStream_t stream);
#endif

}  // namespace fmcore
