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
                     const std::vector<BlendPhase>& phases)
    : sources_(std::move(sources)), first_shard_(std::move(first_shard)) {
  const size_t n = sources_.size();
  if (n == 0) throw std::invalid_argument("a blend needs at least one source");
  if (first_shard_.size() != n)
    throw std::invalid_argument("a blend needs one first shard per source: " + std::to_string(n) +
                                " sources, " + std::to_string(first_shard_.size()) +
                                " first shards");
  if (phases.empty() || phases[0].start != 0)
    throw std::invalid_argument("a blend needs at least one phase, the first starting at sample 0");
  for (size_t k = 0; k < phases.size(); ++k) {
    const std::vector<double>& weights = phases[k].weights;
    // Phase 0 is the blend of a loader that never changed its mix: its messages name no phase.
    const std::string where =
        k == 0 ? "" : "blend phase " + std::to_string(k) + " (from sample " +
                          std::to_string(phases[k].start) + "): ";
    if (k > 0 && phases[k].start <= phases[k - 1].start)
      throw std::invalid_argument(where + "phases must start at increasing samples, the previous " +
                                  "at " + std::to_string(phases[k - 1].start));
    if (weights.size() != n)
      throw std::invalid_argument(where + "a blend needs one weight per source: " +
                                  std::to_string(n) + " sources, " +
                                  std::to_string(weights.size()) + " weights");
    double total = 0;  // summed in order: the Python model of the table sums the same way
    for (size_t s = 0; s < n; ++s) {
      if (!std::isfinite(weights[s]) || !(weights[s] >= 0))
        throw std::invalid_argument(where + "blend weight of source " + std::to_string(s) +
                                    " must be finite and >= 0, got " + std::to_string(weights[s]));
      total += weights[s];
    }
    if (!(total > 0) || !std::isfinite(total))
      throw std::invalid_argument(where + "blend weights must have a finite total > 0");
    Phase p;
    p.start = phases[k].start;
    p.base.assign(n, 0);
    if (k > 0) {
      const Phase& prev = phases_.back();
      for (uint32_t s = 0; s < n; ++s)
        p.base[s] = prev.base[s] + prev.taken(s, p.start - prev.start);
    }
    std::vector<double> share(n);
    for (size_t s = 0; s < n; ++s) share[s] = weights[s] / total;
    p.count.assign(n, 0);
    p.table.resize(kPeriod);
    p.rank.resize(kPeriod);
    p.slots.assign(n, {});
    for (uint64_t i = 0; i < kPeriod; ++i) {
      size_t best = 0;
      double best_deficit = -INFINITY;
      for (size_t s = 0; s < n; ++s) {
        if (share[s] == 0) continue;  // dropped by this phase: no slot (its deficit would be 0)
        const double deficit =
            share[s] * static_cast<double>(i + 1) - static_cast<double>(p.count[s]);
        if (deficit > best_deficit) best = s, best_deficit = deficit;  // strict: ties to lowest s
      }
      p.table[i] = static_cast<uint32_t>(best);
      p.rank[i] = p.count[best]++;
      p.slots[best].push_back(static_cast<uint32_t>(i));
    }
    for (size_t s = 0; s < n; ++s)
      if (share[s] > 0 && p.count[s] == 0)
        throw std::invalid_argument(where + "blend weight of source " + std::to_string(s) + " (" +
                                    std::to_string(share[s]) + " of the total) gets no sample " +
                                    "in a period of " + std::to_string(kPeriod) +
                                    ": weights must be 0 or at least 1/" + std::to_string(kPeriod) +
                                    " of the total");
    phases_.push_back(std::move(p));
  }
}

const BlendPlan::Phase& BlendPlan::phase_of(uint64_t g) const {
  // The last phase starting at or before g (phase 0 starts at 0).
  const auto after = std::upper_bound(phases_.begin(), phases_.end(), g,
                                      [](uint64_t v, const Phase& p) { return v < p.start; });
  return *(after - 1);
}

BlendPlan::Pick BlendPlan::pick(uint64_t g) const {
  const Phase& p = phase_of(g);
  const uint64_t local = g - p.start, slot = local % kPeriod;
  const uint32_t s = p.table[slot];
  return {s, p.base[s] + (local / kPeriod) * p.count[s] + p.rank[slot]};
}

Location BlendPlan::locate(uint64_t g, Cache& cache) const {
  if (cache.sources.size() != sources_.size()) cache.sources.resize(sources_.size());
  const Pick p = pick(g);
  Location loc = sources_[p.source].locate(p.sample, cache.sources[p.source]);
  loc.shard += first_shard_[p.source];
  return loc;
}

uint64_t BlendPlan::Phase::taken(uint32_t s, uint64_t local) const {
  const uint64_t slot = local % kPeriod;
  // Slots of s before `slot` in the period: the rank of its first slot at or after `slot`.
  const auto& mine = slots[s];
  const uint64_t before = static_cast<uint64_t>(
      std::lower_bound(mine.begin(), mine.end(), static_cast<uint32_t>(slot)) - mine.begin());
  return (local / kPeriod) * count[s] + before;
}

uint64_t BlendPlan::samples_before(uint32_t s, uint64_t g) const {
  const Phase& p = phase_of(g);
  return p.base[s] + p.taken(s, g - p.start);
}

uint64_t BlendPlan::windows_per_epoch() const {
  uint64_t most = 0;
  for (uint32_t s = 0; s < sources_.size(); ++s) {
    // One past the global sample that is source s's sample W_s - 1 (its epoch's last): in the
    // phase that draws it, if any does.
    const uint64_t last = sources_[s].windows_per_epoch() - 1;
    for (size_t k = 0; k < phases_.size(); ++k) {
      const Phase& p = phases_[k];
      const bool drawn_later = k + 1 < phases_.size() && last >= phases_[k + 1].base[s];
      if (p.count[s] == 0 || last < p.base[s] || drawn_later) continue;
      const uint64_t j = last - p.base[s];
      most = std::max(most, p.start + (j / p.count[s]) * kPeriod + p.slots[s][j % p.count[s]] + 1);
      break;
    }
  }
  return most;  // > 0: the last phase has a source of weight > 0, and it draws any sample
}

}  // namespace fmcore::data
