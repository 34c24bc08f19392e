// Cross-entropy bindings shared by the CPU and CUDA registrations: argument checks and the op
// bodies, which take the device's pass runner (CPU reference or CUDA launcher) as a parameter.
#pragma once

#include <torch/library.h>
#include <torch/types.h>

#include <functional>
#include <tuple>

namespace fmcore {

struct CeOptions {
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  double z_loss = 0.0;
};

// kScale: grad[n, :] *= grad_scale[n], skipping rows whose factor is 1 (logits and target unused).
enum class CeMode { kFwd, kFwdGrad, kBwd, kScale };

// One pass over validated tensors. logits (N, V), target (N,) contiguous int32/int64; loss (N,)
// and stats (N, 2) (row max, log-sum-exp minus the max) contiguous in the accumulation dtype
// (ce_acc_type); grad (N, V) (may be logits);
// grad_scale (N,) any stride. Unused: undefined.
struct CeTensors {
  at::Tensor logits, target, loss, stats, grad, grad_scale;
};

// The result of a target check: waits for the check (not for the work queued after it) and returns
// an out-of-range target it found, or ignore_index. Empty when no check could be made.
using CeTargetCheck = std::function<int64_t()>;

struct CeDevice {
  void (*run)(const CeTensors& t, const CeOptions& o, CeMode mode);
  // Queues a check of target (N,) contiguous for values outside [0, vocab) that are not
  // ignore_index, ahead of the work queued after it.
  CeTargetCheck (*check_target)(const at::Tensor& target, int64_t ignore_index, int64_t vocab);
};

// Raises ValueError naming label_smoothing or z_loss when out of range.
void check_ce_options(const CeOptions& o);

// float64 for float64 logits (the CPU reference, for gradcheck), float32 otherwise.
at::ScalarType ce_acc_type(const at::Tensor& logits);

// Raises ValueError naming target when the check found an out-of-range target (a no-op for an
// empty check).
void raise_if_bad_target(const CeTargetCheck& check, const CeOptions& o, int64_t vocab);

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_op(const at::Tensor& logits,
                                                        const at::Tensor& target,
                                                        const CeOptions& o, const CeDevice& dev);
at::Tensor cross_entropy_bwd_op(const at::Tensor& logits, const at::Tensor& target,
                                const at::Tensor& stats, const at::Tensor& grad_loss,
                                const CeOptions& o, bool inplace, const CeDevice& dev);
std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_bwd_op(const at::Tensor& logits,
                                                            const at::Tensor& target,
                                                            const at::Tensor& grad_scale,
                                                            const CeOptions& o,
                                                            const CeDevice& dev);

void cross_entropy_scale_op(const at::Tensor& grad, const at::Tensor& factor, const CeDevice& dev);

// loss, lse, grad_hidden, grad_weight, grad_bias (empty (0,) tensors for gradients not asked for).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_op(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& grad_rows,
    const CeOptions& o, int64_t reduction, int64_t chunk_size, bool need_grad_hidden,
    bool need_grad_weight, bool need_grad_bias, const CeDevice& dev);

// The schema-shaped implementations for one device, registered by register_cross_entropy<kDevice>.
template <const CeDevice& D>
struct CeImpls {
  static std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& logits, const at::Tensor& target,
                                                int64_t ignore_index, double label_smoothing,
                                                double z_loss,
                                                bool /*inplace_backward: autograd's*/) {
    return cross_entropy_fwd_op(logits, target, {ignore_index, label_smoothing, z_loss}, D);
  }
  static at::Tensor bwd(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& stats,
                        const at::Tensor& grad_loss, int64_t ignore_index, double label_smoothing,
                        double z_loss) {
    return cross_entropy_bwd_op(logits, target, stats, grad_loss,
                                {ignore_index, label_smoothing, z_loss}, false, D);
  }
  static void bwd_(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& stats,
                   const at::Tensor& grad_loss, int64_t ignore_index, double label_smoothing,
                   double z_loss) {
    cross_entropy_bwd_op(logits, target, stats, grad_loss, {ignore_index, label_smoothing, z_loss},
                         true, D);
  }
  static std::tuple<at::Tensor, at::Tensor> fwd_bwd_(const at::Tensor& logits,
                                                     const at::Tensor& target,
                                                     const at::Tensor& grad_scale,
                                                     int64_t ignore_index, double label_smoothing,
                                                     double z_loss) {
    return cross_entropy_fwd_bwd_op(logits, target, grad_scale,
                                    {ignore_index, label_smoothing, z_loss}, D);
  }
  static void scale_(const at::Tensor& grad, const at::Tensor& factor) {
    cross_entropy_scale_op(grad, factor, D);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear(
      const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& grad_rows,
      int64_t ignore_index, double label_smoothing, double z_loss, int64_t reduction,
      int64_t chunk_size, bool grad_hidden, bool grad_weight, bool grad_bias) {
    return linear_cross_entropy_op(hidden, weight, target, bias, grad_rows,
                                   {ignore_index, label_smoothing, z_loss}, reduction, chunk_size,
                                   grad_hidden, grad_weight, grad_bias, D);
  }
};

template <const CeDevice& D>
void register_cross_entropy(torch::Library& m) {
  m.impl("cross_entropy_fwd", &CeImpls<D>::fwd);
  m.impl("cross_entropy_bwd", &CeImpls<D>::bwd);
  m.impl("cross_entropy_bwd_", &CeImpls<D>::bwd_);
  m.impl("cross_entropy_fwd_bwd_", &CeImpls<D>::fwd_bwd_);
  m.impl("cross_entropy_scale_", &CeImpls<D>::scale_);
  m.impl("linear_cross_entropy", &CeImpls<D>::linear);
}

}  // namespace fmcore
