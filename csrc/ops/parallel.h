// at::parallel_for for bodies that call ATen ops.
//
// ATen's OpenMP parallel_for does not give its worker threads the caller's thread-local state, so an
// ATen op called on a worker dispatches as if from a fresh thread: through Autograd although an op's
// CPU kernel runs below it (the attention reference's at::mm / copy_ on views of inputs that require
// grad then raised "a leaf Variable that requires grad is being used in an in-place operation" once
// a call used 4 threads), outside inference mode, without the caller's dispatch-key exclusions. Bodies
// that only touch raw pointers can use at::parallel_for directly.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <cstdint>

namespace fmcore {

template <typename F>
void parallel_for_aten(int64_t begin, int64_t end, int64_t grain_size, const F& f) {
  const at::ThreadLocalState caller;
  at::parallel_for(begin, end, grain_size, [&](int64_t b, int64_t e) {
    const at::ThreadLocalStateGuard guard(caller);
    f(b, e);
  });
}

}  // namespace fmcore
