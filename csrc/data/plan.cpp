// Sample -> (shard, window start); see plan.h.
#include "data/plan.h"

#include <algorithm>

namespace fmcore::data {
namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

// Uniform integer in [0, n) from 64 random bits (multiply-high; the bias is below 2^-64 * n).
uint64_t bounded(uint64_t bits, uint64_t n) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(bits) * n) >> 64);
}

// Index k with prefix[k] <= r < prefix[k + 1] (prefix is non-decreasing, prefix[0] = 0 <= r <
// back()).
size_t find_bucket(const std::vector<uint64_t>& prefix, uint64_t r) {
  return static_cast<size_t>(std::upper_bound(prefix.begin(), prefix.end(), r) - prefix.begin()) -
         1;
}

}  // namespace

SamplePlan::SamplePlan(std::vector<uint64_t> shard_tokens, uint64_t seq_len, Mode mode,
                       uint64_t seed)
    : tokens_(std::move(shard_tokens)),
      seq_len_(seq_len),
      mode_(mode),
      seed_(mix64(seed + kGolden)) {
  start_prefix_.assign(1, 0);
  for (uint64_t n : tokens_) {
    windows_ += (n - 1) / seq_len_;
    starts_ += n - seq_len_;
    start_prefix_.push_back(starts_);
  }
}

std::vector<uint32_t> SamplePlan::epoch_order(uint64_t epoch) const {
  std::vector<uint32_t> order(tokens_.size());
  for (size_t k = 0; k < order.size(); ++k) order[k] = static_cast<uint32_t>(k);
  uint64_t state = mix64(seed_ ^ mix64(epoch + 0x5EC0ull));
  for (size_t j = order.size(); j > 1; --j) {  // Fisher-Yates driven by splitmix64
    state += kGolden;
    std::swap(order[j - 1], order[bounded(mix64(state), j)]);
  }
  return order;
}

Location SamplePlan::locate(uint64_t g, EpochCache& cache) const {
  if (mode_ == Mode::Random) {
    uint64_t pos = bounded(mix64(seed_ + (g + 1) * kGolden), starts_);
    size_t k = find_bucket(start_prefix_, pos);
    return {static_cast<uint32_t>(k), pos - start_prefix_[k]};
  }
  uint64_t epoch = g / windows_, r = g % windows_;
  if (cache.epoch != epoch) {
    cache.order = epoch_order(epoch);
    cache.prefix.assign(1, 0);
    for (uint32_t s : cache.order)
      cache.prefix.push_back(cache.prefix.back() + (tokens_[s] - 1) / seq_len_);
    cache.epoch = epoch;
  }
  size_t k = find_bucket(cache.prefix, r);
  return {cache.order[k], (r - cache.prefix[k]) * seq_len_};
}

}  // namespace fmcore::data
