// Fused AdamW binding shared by the CPU and CUDA implementations: validates the tensor lists and
// fills the kernels' parameter structs (kernels/adamw.h).
#pragma once

#include <torch/types.h>

#include <optional>
#include <vector>

#include "kernels/adamw.h"

namespace fmcore {

// AdamWParams points into `tensors`; keep the struct alive while the params are used.
struct AdamWCall {
  std::vector<AdamWTensor> tensors;
  AdamWParams params;
};

// Checks every list (lengths, devices, dtypes, shapes, contiguity, sparse grads) and the scalars.
// Raises ValueError/RuntimeError naming the argument, e.g. "expected grads[3] of shape (4, 8) ...".
AdamWCall make_adamw_call(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList master_params,
                          at::TensorList steps, const std::optional<at::Tensor>& lr_tensor,
                          double lr, double beta1, double beta2, double eps, double weight_decay,
                          const std::optional<at::Tensor>& grad_norm,
                          std::optional<double> max_grad_norm, bool skip_nonfinite);

struct L2NormCall {
  std::vector<L2NormTensor> tensors;
  L2NormParams params;  // partials left null: the device file allocates them
};

L2NormCall make_l2norm_call(at::TensorList tensors, const at::Tensor& norm,
                            const std::optional<at::Tensor>& nonfinite_count);

}  // namespace fmcore
