// The CPU implementations' fp64 sums (add_norm's row statistics, grad_norm_'s sum of squares).
#pragma once

#include <cstdint>

namespace fmcore {

// The sum of term(i) for i < n in fp64, in 8 interleaved partial sums added at the end: a fixed
// order whatever the call (deterministic), and 8 independent dependency chains instead of one, so
// the loop runs at the adder's throughput rather than its latency. With one chain, add_norm with a
// residual on (2048, 128) fp32 took 287 us forward and 699 us forward + backward on 2 cores; with
// eight, 182 and 470 (torch's add + LayerNorm: 92 and 375). grad_norm_ over the tiny preset's 54
// parameters (1.1M elements): 430 -> 150 us.
template <typename Term>
double sum_fp64(int64_t n, const Term& term) {
  constexpr int64_t kChains = 8;
  double part[kChains] = {};
  int64_t i = 0;
  for (; i + kChains <= n; i += kChains) {
    for (int64_t j = 0; j < kChains; ++j) part[j] += static_cast<double>(term(i + j));
  }
  for (; i < n; ++i) part[i % kChains] += static_cast<double>(term(i));
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

}  // namespace fmcore
