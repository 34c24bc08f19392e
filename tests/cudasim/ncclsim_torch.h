// Included first by the ncclsim build of csrc/dist/communicator.cpp (build.py's build_nccl): the
// headers that file includes, then the tensor checks redirected so CPU tensors stand for tensors
// on device 0. Every header the communicator includes must be in this list: the macros below
// would rename the declarations of a header included after them.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <nccl.h>
#include <torch/csrc/utils/pybind.h>

#define is_cuda() is_cpu()
#define get_device() get_device() + 1  // a CPU tensor's -1 becomes the simulated device 0
