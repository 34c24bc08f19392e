// Fused AdamW and the global gradient norm: argument checks, the CPU reference implementations and
// their registration. The CPU code is the readable statement of what the CUDA kernels compute.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "adamw_op.h"
#include "checks.h"
#include "fp64_sum.h"

namespace fmcore {

namespace {

std::string item(const char* list, size_t i) {
  return std::string(list) + "[" + std::to_string(i) + "]";
}

void check_dense(const at::Tensor& t, const std::string& name) {
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, "expected ", name,
                    " to be a dense (strided) tensor, got layout ", t.layout(),
                    " (fused AdamW does not support sparse gradients)");
}

void check_contiguous(const at::Tensor& t, const std::string& name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "expected ", name, " to be contiguous, got shape ",
                    shape_str(t.sizes()), " with strides ", shape_str(t.strides()));
}

void check_device(const at::Tensor& t, const at::Tensor& ref, const std::string& name) {
  TORCH_CHECK(t.device() == ref.device(), "expected ", name, " on the device of params[0] (",
              ref.device(), "), got ", t.device());
}

// A state tensor: fp32, contiguous, of the param's shape, on its device.
void check_state(const at::Tensor& t, const at::Tensor& param, const std::string& name,
                 const std::string& param_name) {
  check_dense(t, name);
  check_device(t, param, name);
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, "expected ", name, " to be float32, got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == param.sizes(), "expected ", name, " of shape ",
                    shape_str(param.sizes()), " (the shape of ", param_name, "), got ",
                    shape_str(t.sizes()));
  check_contiguous(t, name);
}

// A one-element fp32 scalar on the params' device (step counts, lr, the grad norm).
void check_scalar(const at::Tensor& t, const at::Tensor& ref, const std::string& name,
                  at::ScalarType dtype = at::kFloat) {
  check_dense(t, name);
  check_device(t, ref, name);
  TORCH_CHECK_VALUE(t.numel() == 1 && t.scalar_type() == dtype, "expected ", name,
                    " to be a one-element ", dtype, " tensor, got shape ", shape_str(t.sizes()),
                    " of ", t.scalar_type());
}

bool is_kernel_float(at::ScalarType st) {
  return st == at::kFloat || st == at::kBFloat16 || st == at::kHalf;
}

// The CUDA update runs every tensor at once: a step tensor listed twice is bumped by several
// threads in one unsynchronized read-modify-write (updates lost: the bias correction of another
// step count), and a param or state listed twice is updated by two blocks at once. FusedAdamW refuses repeated
// params; the op refuses any overlap of what it writes, on every device alike. A grad is read
// while the others are written: it may be one of its own param's tensors exactly (each element is
// read before the thread that reads it writes it), not another's (b.grad = a.detach() read a as a
// was updated: a race on CUDA, the update order's result on the CPU). (All are contiguous:
// [data_ptr, data_ptr + nbytes) is each one's extent.)
void check_written_apart(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList master_params,
                         at::TensorList steps) {
  std::vector<std::tuple<uintptr_t, uintptr_t, std::string, size_t>> written;  // extent, name, index
  const auto extent = [](const at::Tensor& t) {
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    return std::pair{begin, begin + t.nbytes()};
  };
  const auto add = [&](at::TensorList list, const char* name) {
    for (size_t i = 0; i < list.size(); ++i) {
      if (list[i].numel() == 0) continue;  // (an empty tensor's pointer may be shared or null)
      const auto [begin, end] = extent(list[i]);
      written.emplace_back(begin, end, item(name, i), i);
    }
  };
  add(params, "params");
  add(exp_avgs, "exp_avgs");
  add(exp_avg_sqs, "exp_avg_sqs");
  add(master_params, "master_params");
  add(steps, "steps");
  std::sort(written.begin(), written.end());
  for (size_t j = 1; j < written.size(); ++j) {
    TORCH_CHECK_VALUE(std::get<0>(written[j]) >= std::get<1>(written[j - 1]),
                      "expected the tensors adamw_step_ updates not to share memory, got ",
                      std::get<2>(written[j - 1]), " and ", std::get<2>(written[j]),
                      " overlapping (every param needs its own state and step tensor)");
  }
  for (size_t i = 0; i < grads.size(); ++i) {
    if (grads[i].numel() == 0) continue;
    const auto [begin, end] = extent(grads[i]);
    // The written extents are disjoint and sorted: those meeting [begin, end) end after begin,
    // from the last one starting before end backwards.
    auto it = std::lower_bound(written.begin(), written.end(), end,
                               [](const auto& w, uintptr_t at) { return std::get<0>(w) < at; });
    while (it != written.begin() && std::get<1>(*std::prev(it)) > begin) {
      --it;
      const bool own = std::get<3>(*it) == i && std::get<0>(*it) == begin && std::get<1>(*it) == end;
      TORCH_CHECK_VALUE(own, "expected ", item("grads", i), " not to share memory with a tensor ",
                        "adamw_step_ updates, got it overlapping ", std::get<2>(*it),
                        " (a gradient viewing another param or its state would be read while that is ",
                        "updated)");
    }
  }
}

}  // namespace

AdamWCall make_adamw_call(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList master_params,
                          at::TensorList steps, const std::optional<at::Tensor>& lr_tensor,
                          double lr, double beta1, double beta2, double eps, double weight_decay,
                          const std::optional<at::Tensor>& grad_norm,
                          std::optional<double> max_grad_norm, bool skip_nonfinite) {
  const size_t n = params.size();
  auto check_len = [n](at::TensorList list, const char* name) {
    TORCH_CHECK_VALUE(list.size() == n, "expected ", name, " to hold one tensor per param (", n,
                      "), got ", list.size());
  };
  check_len(grads, "grads");
  check_len(exp_avgs, "exp_avgs");
  check_len(exp_avg_sqs, "exp_avg_sqs");
  check_len(steps, "steps");
  TORCH_CHECK_VALUE(master_params.empty() || master_params.size() == n,
                    "expected master_params to be empty or hold one tensor per param (", n,
                    "), got ", master_params.size());
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "expected 0 <= beta1 < 1, got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "expected 0 <= beta2 < 1, got ", beta2);
  TORCH_CHECK_VALUE(eps >= 0.0, "expected eps >= 0, got ", eps);
  TORCH_CHECK_VALUE(weight_decay >= 0.0, "expected weight_decay >= 0, got ", weight_decay);
  TORCH_CHECK_VALUE(!max_grad_norm || *max_grad_norm >= 0.0, "expected max_grad_norm >= 0, got ",
                    max_grad_norm.value_or(0.0));
  TORCH_CHECK_VALUE(grad_norm.has_value() || (!max_grad_norm && !skip_nonfinite),
                    "expected grad_norm (the output of grad_norm_) when max_grad_norm or "
                    "skip_nonfinite is set");

  AdamWCall call;
  AdamWParams& p = call.params;
  p.lr = lr;
  p.beta1 = beta1;
  p.beta2 = beta2;
  p.eps = eps;
  p.weight_decay = weight_decay;
  p.max_grad_norm = max_grad_norm.value_or(-1.0);
  p.skip_nonfinite = skip_nonfinite;
  if (n == 0) return call;

  const at::Tensor& ref = params[0];
  check_dense(ref, "params[0]");
  TORCH_CHECK_VALUE(is_kernel_float(ref.scalar_type()),
                    "expected params[0] to be float32, bfloat16 or float16, got ",
                    ref.scalar_type());
  const bool master = !master_params.empty();
  TORCH_CHECK_VALUE(
      !master || ref.scalar_type() != at::kFloat,
      "expected bfloat16 or float16 params with master_params (an fp32 param is its own "
      "master copy), got float32");
  if (lr_tensor) {
    check_scalar(*lr_tensor, ref, "lr_tensor");
    p.lr_ptr = lr_tensor->data_ptr<float>();
  } else {
    TORCH_CHECK_VALUE(lr >= 0.0, "expected lr >= 0, got ", lr);
  }
  if (grad_norm) {
    check_scalar(*grad_norm, ref, "grad_norm");
    p.grad_norm = grad_norm->data_ptr<float>();
  }
  p.dtype = to_dtype(ref.scalar_type());
  p.master = master;

  call.tensors.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& param = params[i];
    const std::string pname = item("params", i), gname = item("grads", i);
    check_dense(param, pname);
    check_device(param, ref, pname);
    check_same_dtype(param, ref, pname.c_str(), "params[0]");
    check_contiguous(param, pname);
    const at::Tensor& grad = grads[i];
    check_dense(grad, gname);
    check_device(grad, ref, gname);
    check_same_dtype(grad, param, gname.c_str(), pname.c_str());
    TORCH_CHECK_VALUE(grad.sizes() == param.sizes(), "expected ", gname, " of shape ",
                      shape_str(param.sizes()), " (the shape of ", pname, "), got ",
                      shape_str(grad.sizes()));
    check_contiguous(grad, gname);
    check_state(exp_avgs[i], param, item("exp_avgs", i), pname);
    check_state(exp_avg_sqs[i], param, item("exp_avg_sqs", i), pname);
    check_scalar(steps[i], ref, item("steps", i));

    AdamWTensor& t = call.tensors[i];
    t.param = param.data_ptr();
    t.grad = grad.data_ptr();
    t.exp_avg = exp_avgs[i].data_ptr<float>();
    t.exp_avg_sq = exp_avg_sqs[i].data_ptr<float>();
    t.step = steps[i].data_ptr<float>();
    t.numel = param.numel();
    if (master) {
      check_state(master_params[i], param, item("master_params", i), pname);
      t.master = master_params[i].data_ptr<float>();
    }
  }
  check_written_apart(params, grads, exp_avgs, exp_avg_sqs, master_params, steps);
  p.tensors = call.tensors.data();
  p.num_tensors = static_cast<int64_t>(n);
  return call;
}

L2NormCall make_l2norm_call(at::TensorList tensors, const at::Tensor& norm,
                            const std::optional<at::Tensor>& nonfinite_count) {
  check_dense(norm, "norm");
  TORCH_CHECK_VALUE(norm.numel() == 1 && norm.scalar_type() == at::kFloat,
                    "expected norm to be a one-element float32 tensor, got shape ",
                    shape_str(norm.sizes()), " of ", norm.scalar_type());
  L2NormCall call;
  call.tensors.resize(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const std::string name = item("tensors", i);
    check_dense(t, name);
    TORCH_CHECK(t.device() == norm.device(), "expected ", name, " on the device of norm (",
                norm.device(), "), got ", t.device());
    TORCH_CHECK_VALUE(is_kernel_float(t.scalar_type()), "expected ", name,
                      " to be float32, bfloat16 or float16, got ", t.scalar_type());
    check_contiguous(t, name);
    call.tensors[i] = {t.data_ptr(), t.numel(), to_dtype(t.scalar_type())};
  }
  call.params.tensors = call.tensors.data();
  call.params.num_tensors = static_cast<int64_t>(tensors.size());
  call.params.norm = norm.data_ptr<float>();
  if (nonfinite_count) {
    check_dense(*nonfinite_count, "nonfinite_count");
    TORCH_CHECK(nonfinite_count->device() == norm.device(),
                "expected nonfinite_count on the device of norm (", norm.device(), "), got ",
                nonfinite_count->device());
    TORCH_CHECK_VALUE(nonfinite_count->numel() == 1 && nonfinite_count->scalar_type() == at::kLong,
                      "expected nonfinite_count to be a one-element int64 tensor, got shape ",
                      shape_str(nonfinite_count->sizes()), " of ", nonfinite_count->scalar_type());
    call.params.nonfinite_count = nonfinite_count->data_ptr<int64_t>();
  }
  return call;
}

namespace {

// ---- CPU reference: the CUDA kernels' arithmetic, one tensor at a time.

constexpr int64_t kGrain = 16384;

// torch.lerp's formula, so exp_avg rounds as torch's does.
float lerp_like_torch(float self, float end, float w) {
  return std::fabs(w) < 0.5f ? self + w * (end - self) : end - (end - self) * (1.f - w);
}

template <typename T>
void adamw_tensor_cpu(const AdamWTensor& t, const AdamWParams& p, float clip) {
  const double lr = p.lr_ptr != nullptr ? static_cast<double>(*p.lr_ptr) : p.lr;
  const double step = static_cast<double>(*t.step);  // already incremented
  const float decay = static_cast<float>(1.0 - lr * p.weight_decay);
  const float w1 = static_cast<float>(1.0 - p.beta1);
  const float beta2 = static_cast<float>(p.beta2), omb2 = static_cast<float>(1.0 - p.beta2);
  const float neg_step_size = static_cast<float>(-(lr / (1.0 - std::pow(p.beta1, step))));
  const float bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(p.beta2, step)));
  const float eps = static_cast<float>(p.eps);
  T* param = static_cast<T*>(t.param);
  const T* grad = static_cast<const T*>(t.grad);
  at::parallel_for(0, t.numel, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      // (as the kernel: the master, or the param where it no longer holds the master rounded,
      // i.e. was edited since the last step)
      float pv = static_cast<float>(param[i]);
      if constexpr (!std::is_floating_point_v<T>) {  // (bf16, fp16: the params with masters)
        if (t.master != nullptr && static_cast<T>(t.master[i]).x == param[i].x) pv = t.master[i];
      }
      const float g = static_cast<float>(grad[i]) * clip;
      pv *= decay;
      const float m = lerp_like_torch(t.exp_avg[i], g, w1);
      const float v = t.exp_avg_sq[i] * beta2 + omb2 * g * g;
      const float denom = std::sqrt(v) / bc2_sqrt + eps;
      pv += neg_step_size * m / denom;
      t.exp_avg[i] = m;
      t.exp_avg_sq[i] = v;
      if (t.master != nullptr) t.master[i] = pv;
      param[i] = static_cast<T>(pv);
    }
  });
}

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList master_params, at::TensorList steps,
                    const std::optional<at::Tensor>& lr_tensor, double lr, double beta1,
                    double beta2, double eps, double weight_decay,
                    const std::optional<at::Tensor>& grad_norm, std::optional<double> max_grad_norm,
                    bool skip_nonfinite) {
  const AdamWCall call =
      make_adamw_call(params, grads, exp_avgs, exp_avg_sqs, master_params, steps, lr_tensor, lr,
                      beta1, beta2, eps, weight_decay, grad_norm, max_grad_norm, skip_nonfinite);
  const AdamWParams& p = call.params;
  if (p.num_tensors == 0) return;
  float clip = 1.f;
  if (p.grad_norm != nullptr) {
    const float norm = *p.grad_norm;
    if (p.skip_nonfinite && !std::isfinite(norm)) return;  // params, state and steps untouched
    if (p.max_grad_norm >= 0.0) {
      // torch.clamp(coef, max=1), as clip_grad_norm_: NaN stays NaN (std::fmin would give 1).
      const float coef = static_cast<float>(p.max_grad_norm) / (norm + 1e-6f);
      clip = coef > 1.f ? 1.f : coef;
    }
  }
  for (const AdamWTensor& t : call.tensors) *t.step += 1.f;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "adamw_cpu",
                                  [&] {
                                    for (const AdamWTensor& t : call.tensors)
                                      adamw_tensor_cpu<scalar_t>(t, p, clip);
                                  });
}

// Sum of squares in double, in fixed chunks added in order: the result does not depend on the
// thread count.
void grad_norm_cpu(at::TensorList tensors, const at::Tensor& norm,
                   const std::optional<at::Tensor>& nonfinite_count) {
  const L2NormCall call = make_l2norm_call(tensors, norm, nonfinite_count);
  double total = 0.0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int64_t numel = tensors[i].numel();
    const int64_t chunks = (numel + kL2NormChunk - 1) / kL2NormChunk;
    std::vector<double> partial(chunks);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, tensors[i].scalar_type(), "grad_norm_cpu", [&] {
          const scalar_t* x = tensors[i].const_data_ptr<scalar_t>();
          at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
            for (int64_t c = c0; c < c1; ++c) {
              const scalar_t* xc = x + c * kL2NormChunk;
              const int64_t n = std::min(numel - c * kL2NormChunk, kL2NormChunk);
              partial[c] = sum_fp64(n, [&](int64_t j) {
                const double f = static_cast<double>(xc[j]);
                return f * f;
              });
            }
          });
        });
    for (double s : partial) total += s;
  }
  const float r = static_cast<float>(std::sqrt(total));
  *call.params.norm = r;
  if (call.params.nonfinite_count != nullptr && !std::isfinite(r))
    *call.params.nonfinite_count += 1;
}

}  // namespace

TORCH_LIBRARY_IMPL(fmcore, CPU, m) {
  m.impl("adamw_step_", &adamw_step_cpu);
  m.impl("grad_norm_", &grad_norm_cpu);
}

}  // namespace fmcore
