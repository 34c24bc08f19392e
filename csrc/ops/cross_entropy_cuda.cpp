// Cross-entropy and linear cross-entropy on CUDA: the bindings validate (cross_entropy.cpp,
// linear_cross_entropy.cpp), the framework-free kernels (kernels/cross_entropy.cu) run on the
// current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "cross_entropy_op.h"
#include "kernels/cross_entropy.h"

namespace fmcore {

namespace {

void run_cuda(const CeTensors& t, const CeOptions& o, CeMode mode) {
  CrossEntropyParams p;
  p.logits = t.logits.const_data_ptr();
  if (t.target.defined()) {  // not for kScale
    p.target = t.target.const_data_ptr();
    p.target_int64 = t.target.scalar_type() == at::kLong;
  }
  p.rows = t.logits.size(0);
  p.vocab = t.logits.size(1);
  p.logits_stride = t.logits.stride(0);
  p.dtype = to_dtype(t.logits.scalar_type());
  p.ignore_index = o.ignore_index;
  p.label_smoothing = static_cast<float>(o.label_smoothing);
  p.z_loss = static_cast<float>(o.z_loss);
  if (t.loss.defined()) p.loss = t.loss.data_ptr<float>();
  if (t.stats.defined()) p.stats = t.stats.data_ptr<float>();
  if (t.grad.defined()) {
    p.grad = t.grad.data_ptr();
    p.grad_stride = t.grad.stride(0);
  }
  if (t.grad_scale.defined()) {
    p.grad_scale = t.grad_scale.const_data_ptr<float>();
    p.grad_scale_stride = t.grad_scale.stride(0);
  }
  if (t.bad.defined()) p.bad_target = t.bad.data_ptr<int64_t>();

  const c10::cuda::CUDAGuard guard(t.logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  if (mode == CeMode::kScale) {
    err = cross_entropy_scale(p, stream);
  } else if (mode == CeMode::kBwd) {
    err = cross_entropy_bwd(p, stream);
  } else {
    err = cross_entropy_fwd(p, mode == CeMode::kFwdGrad, stream);
  }
  TORCH_CHECK(err == cudaSuccess,
              "fmcore cross_entropy: CUDA launch failed: ", cudaGetErrorString(err));
}

// Reading the bad-target flag synchronises the stream, which a CUDA graph capture forbids: there
// the check is skipped (the kernels still never index with a bad target).
bool cuda_may_sync(const at::Tensor& on) {
  const c10::cuda::CUDAGuard guard(on.device());
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t err = cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &status);
  return err == cudaSuccess && status == cudaStreamCaptureStatusNone;
}

}  // namespace

constexpr CeDevice kCudaDevice{&run_cuda, &cuda_may_sync};

TORCH_LIBRARY_IMPL(fmcore, CUDA, m) { register_cross_entropy<kCudaDevice>(m); }

}  // namespace fmcore
