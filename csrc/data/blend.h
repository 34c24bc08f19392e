// Which source of a weighted blend global sample g comes from, and which of that source's samples
// it is: a pure function of (g, the weights), O(1) per sample. No I/O, no threads, no torch.
//
// The blend repeats a period of kPeriod slots. Slot i goes, once, at construction, to the source
// furthest below its target share after i slots (the largest w_s * (i + 1) - taken_s, ties to the
// lowest index; weights normalised to sum 1): Megatron's blending rule. Each source then holds
// count_s slots of a period, spread evenly through it, and over any whole number of periods its
// share of the samples is count_s / kPeriod, within 1 / kPeriod of w_s. Sample g belongs to
//   s(g) = table[g % kPeriod]
// and is that source's sample
//   j(g) = (g / kPeriod) * count_s + rank[g % kPeriod]
// (rank[i]: slots of the same source before slot i in the period). The source's own SamplePlan
// locates j; its shards are the range [first_shard_s, first_shard_s + n_s) of the loader's list.
// So every source walks its own epochs independently (one with weight 0.9 cycles faster than one
// with 0.1), and a loader's state stays one number, g.
//
// One source is the same as no blend: s(g) = 0 and j(g) = g.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "data/plan.h"

namespace fmcore::data {

class BlendPlan {
 public:
  static constexpr uint64_t kPeriod = 1000;

  struct Cache {  // per-thread: each source's last epoch order
    std::vector<SamplePlan::EpochCache> sources;
  };
  struct Pick {
    uint32_t source;
    uint64_t sample;  // the source's own sample number j
  };

  // first_shard[s]: index of source s's first shard in the loader's list (its plan's shard k is the
  // loader's first_shard[s] + k). weights: finite and > 0 (throws std::invalid_argument naming the
  // source otherwise, or when a weight is too small to get a slot of the period).
  BlendPlan(std::vector<SamplePlan> sources, std::vector<uint32_t> first_shard,
            const std::vector<double>& weights);

  Pick pick(uint64_t g) const;
  Location locate(uint64_t g, Cache& cache) const;
  // Samples of source s among the global samples [0, g).
  uint64_t samples_before(uint32_t s, uint64_t g) const;
  // Sequential mode: the global samples until every source has read one whole epoch (the source
  // slowest to cycle through its data sets it); for one source, its windows per epoch.
  uint64_t windows_per_epoch() const;

  size_t num_sources() const { return sources_.size(); }
  const SamplePlan& source(size_t s) const { return sources_[s]; }
  const std::vector<uint32_t>& table() const { return table_; }
  uint64_t count(size_t s) const { return count_[s]; }

 private:
  std::vector<SamplePlan> sources_;
  std::vector<uint32_t> first_shard_;
  std::vector<uint32_t> table_;   // source of each slot of the period
  std::vector<uint64_t> rank_;    // slots of the same source before this one in the period
  std::vector<uint64_t> count_;   // slots of each source in a period
  std::vector<std::vector<uint32_t>> slots_;  // slots_[s][r]: the slot of source s's r-th
};

// The seed of source s's SamplePlan: seed + s (mod 2^64). Source 0 reads what a plain loader of
// its shards reads, and source s what one with seed + s reads; the streams are unrelated all the
// same (SamplePlan mixes its seed), where one seed for all would draw the same relative position
// in every source for the same j in random mode.
uint64_t source_seed(uint64_t seed, uint32_t source);

}  // namespace fmcore::data
