// Cross-entropy and linear cross-entropy on CUDA: the bindings validate (cross_entropy.cpp,
// linear_cross_entropy.cpp), the framework-free kernels (kernels/cross_entropy.cu) run on the
// current stream.
#include <ATen/EmptyTensor.h>
#include <ATen/cuda/PinnedMemoryAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <memory>

#include "checks.h"
#include "cross_entropy_op.h"
#include "cuda_check.h"
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
  check_cuda_error(err, "cross_entropy");
}

// Marks a point of the stream the host can wait for, without waiting for what is queued after it.
class StreamPoint {
 public:
  explicit StreamPoint(cudaStream_t stream) {
    TORCH_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming) == cudaSuccess &&
                    cudaEventRecord(event_, stream) == cudaSuccess,
                "fmcore cross_entropy: cannot record a CUDA event");
  }
  StreamPoint(const StreamPoint&) = delete;
  StreamPoint& operator=(const StreamPoint&) = delete;
  ~StreamPoint() { cudaEventDestroy(event_); }
  void wait() const {
    check_cuda_error(cudaEventSynchronize(event_), "cross_entropy", "event wait");
  }

 private:
  cudaEvent_t event_ = nullptr;
};

// Why the check is its own launch, queued before the loss kernel: the binding must raise on a bad
// target (issue 3), so the host has to read something the GPU computed. Reading a flag the loss
// kernel wrote made every call wait for the loss kernel, and the GPU then sat idle while the host
// did everything after the wait (the rest of the forward, the whole backward's Python and
// launches): 0.65 ms of a 1.99 ms cross-entropy call on the H200. Here the host waits for an event
// after a few-microsecond scan of the targets and a copy into pinned memory, with the loss kernel
// already queued behind them, so the GPU never runs dry because of the check. The host still waits
// for the work queued before the call (it cannot know the targets sooner) but no longer for the
// loss itself.
//
// A stream being captured into a CUDA graph cannot be waited on: there the check is skipped (the
// kernels still never index with a bad target).
CeTargetCheck check_target_cuda(const at::Tensor& target, int64_t ignore_index, int64_t vocab) {
  const c10::cuda::CUDAGuard guard(target.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) != cudaSuccess ||
      status != cudaStreamCaptureStatusNone) {
    return {};
  }
  // Holds ignore_index until the kernel stores a bad target (never equal to ignore_index) into it.
  at::Tensor flag = at::full({1}, ignore_index, target.options().dtype(at::kLong));
  CrossEntropyParams p;
  p.target = target.const_data_ptr();
  p.target_int64 = target.scalar_type() == at::kLong;
  p.rows = target.numel();
  p.vocab = vocab;
  p.ignore_index = ignore_index;
  p.bad_target = flag.data_ptr<int64_t>();
  check_cuda_error(cross_entropy_check_target(p, stream), "cross_entropy");
  // Pinned: the copy is asynchronous, and copy_ tells the host allocator when its block is free.
  at::Tensor host(at::detail::empty_generic({1}, at::cuda::getPinnedMemoryAllocator(),
                                            c10::DispatchKeySet(c10::DispatchKey::CPU), at::kLong,
                                            std::nullopt));
  host.copy_(flag, /*non_blocking=*/true);
  auto done = std::make_shared<StreamPoint>(stream);
  return [host, done] {
    done->wait();
    return host.const_data_ptr<int64_t>()[0];
  };
}

}  // namespace

constexpr CeDevice kCudaDevice{&run_cuda, &check_target_cuda};

TORCH_LIBRARY_IMPL(fmcore, CUDA, m) { register_cross_entropy<kCudaDevice>(m); }

}  // namespace fmcore
