// Included first by every torch binding file of the simulator build (csrc/ops/*.cpp): the torch
// headers those files use, then a TORCH_LIBRARY_IMPL that puts the CUDA registrations on the CPU
// dispatch key of the renamed library (fmcore_sim; the build passes -Dfmcore=fmcore_sim) and drops
// the CPU and Autograd ones, so torch.ops.fmcore_sim.<op>(cpu tensors) runs the CUDA binding and
// its kernels under fmsim. Every torch header the sources include must be in this list: the
// is_cuda() macro below would rename the declarations of a header included after it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>
#include <torch/types.h>

#include "fmsim.h"

#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) FMSIM_LIBRARY_IMPL_##k(ns, m)
#define FMSIM_LIBRARY_IMPL_CUDA(ns, m) _TORCH_LIBRARY_IMPL(ns, CPU, m, C10_UID)
#define FMSIM_LIBRARY_IMPL_UNUSED(m) \
  [[maybe_unused]] static void C10_CONCATENATE(fmsim_unused_impl_, C10_UID)(torch::Library & m)
#define FMSIM_LIBRARY_IMPL_CPU(ns, m) FMSIM_LIBRARY_IMPL_UNUSED(m)
#define FMSIM_LIBRARY_IMPL_Autograd(ns, m) FMSIM_LIBRARY_IMPL_UNUSED(m)

// The bindings' device checks: a CPU tensor is on the simulated device.
#define is_cuda() is_cpu()
