// Global sample -> (source, the source's sample) of a weighted blend; see blend.h.
#include "data/blend.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace fmcore::data {

uint64_t source_seed(uint64_t seed, uint32_t source) {
  return seed + source;  // (SamplePlan mixes its seed: seed + 1 draws an unrelated stream)
}

BlendPlan::BlendPlan(std::vector<SamplePlan> sources, std::vector<uint32_t> first_shard,
                     const std::vector<double>& weights)
    : sources_(std::move(sources)), first_shard_(std::move(first_shard)) {
  const size_t n = sources_.size();
  if (n == 0) throw std::invalid_argument("a blend needs at least one source");
  if (weights.size() != n || first_shard_.size() != n)
    throw std::invalid_argument(
        "a blend needs one weight and one first shard per source: " + std::to_string(n) +
        " sources, " + std::to_string(weights.size()) + " weights, " +
        std::to_string(first_shard_.size()) + " first shards");
  double total = 0;  // summed in order: the Python model of the table sums the same way
  for (size_t s = 0; s < n; ++s) {
    if (!std::isfinite(weights[s]) || !(weights[s] > 0))
      throw std::invalid_argument("blend weight of source " + std::to_string(s) +
                                  " must be finite and > 0, got " + std::to_string(weights[s]));
    total += weights[s];
  }
  std::vector<double> share(n);
  for (size_t s = 0; s < n; ++s) share[s] = weights[s] / total;
  count_.assign(n, 0);
  table_.resize(kPeriod);
  rank_.resize(kPeriod);
  slots_.assign(n, {});
  for (uint64_t i = 0; i < kPeriod; ++i) {
    size_t best = 0;
    double best_deficit = -INFINITY;
    for (size_t s = 0; s < n; ++s) {
      const double deficit =
          share[s] * static_cast<double>(i + 1) - static_cast<double>(count_[s]);
      if (deficit > best_deficit) best = s, best_deficit = deficit;  // strict: ties to the lowest s
    }
    table_[i] = static_cast<uint32_t>(best);
    rank_[i] = count_[best]++;
    slots_[best].push_back(static_cast<uint32_t>(i));
  }
  for (size_t s = 0; s < n; ++s)
    if (count_[s] == 0)
      throw std::invalid_argument("blend weight of source " + std::to_string(s) + " (" +
                                  std::to_string(share[s]) + " of the total) gets no sample in a " +
                                  "period of " + std::to_string(kPeriod) +
                                  ": weights must be at least 1/" + std::to_string(kPeriod) +
                                  " of the total");
}

BlendPlan::Pick BlendPlan::pick(uint64_t g) const {
  const uint64_t slot = g % kPeriod;
  const uint32_t s = table_[slot];
  return {s, (g / kPeriod) * count_[s] + rank_[slot]};
}

Location BlendPlan::locate(uint64_t g, Cache& cache) const {
  if (cache.sources.size() != sources_.size()) cache.sources.resize(sources_.size());
  const Pick p = pick(g);
  Location loc = sources_[p.source].locate(p.sample, cache.sources[p.source]);
  loc.shard += first_shard_[p.source];
  return loc;
}

uint64_t BlendPlan::samples_before(uint32_t s, uint64_t g) const {
  const uint64_t slot = g % kPeriod;
  // Slots of s before `slot` in the period: the rank of its first slot at or after `slot`.
  const auto& mine = slots_[s];
  const uint64_t before = static_cast<uint64_t>(
      std::lower_bound(mine.begin(), mine.end(), static_cast<uint32_t>(slot)) - mine.begin());
  return (g / kPeriod) * count_[s] + before;
}

uint64_t BlendPlan::windows_per_epoch() const {
  uint64_t most = 0;
  for (size_t s = 0; s < sources_.size(); ++s) {
    // One past the global sample that is source s's sample W_s - 1 (its epoch's last).
    const uint64_t last = sources_[s].windows_per_epoch() - 1;
    const uint64_t g = (last / count_[s]) * kPeriod + slots_[s][last % count_[s]] + 1;
    most = std::max(most, g);
  }
  return most;
}

}  // namespace fmcore::data
