// Which source of a weighted blend global sample g comes from, and which of that source's samples
// it is: a pure function of (g, the phases' weights), O(1) per sample (O(log phases) to find g's
// phase). No I/O, no threads, no torch.
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
//
// Phases (a mix changed at a resume: an annealing phase on other weights): phase k starts at
// global sample G_k (G_0 = 0, increasing) and has its own weights, so its own period. In phase k,
// with the local sample g' = g - G_k,
//   s(g) = table_k[g' % kPeriod],  j(g) = base_k[s] + (g' / kPeriod) * count_k[s] + rank_k[g' % P]
// where base_k[s] is the samples source s drew before G_k (base_0 = 0). Every source goes on where
// it left off: over a phase change no sample of a source is repeated or skipped, and a source's
// j runs 0, 1, 2, ... across all phases as it would if drawn alone. A weight may be 0 (a source
// dropped by the phase: no slot of its period), as long as one weight of the phase is > 0.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "data/plan.h"

namespace fmcore::data {

struct BlendPhase {
  uint64_t start = 0;           // the phase's first global sample
  std::vector<double> weights;  // one per source, finite and >= 0; normalised to sum 1
};

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
  // loader's first_shard[s] + k). phases: at least one, the first starting at 0, the starts
  // increasing; weights finite and >= 0, one > 0 in each phase (throws std::invalid_argument
  // naming the phase and source otherwise, or when a weight > 0 is too small to get a slot).
  BlendPlan(std::vector<SamplePlan> sources, std::vector<uint32_t> first_shard,
            const std::vector<BlendPhase>& phases);

  Pick pick(uint64_t g) const;
  Location locate(uint64_t g, Cache& cache) const;
  // Samples of source s among the global samples [0, g).
  uint64_t samples_before(uint32_t s, uint64_t g) const;
  // Sequential mode: the global samples until every source has read one whole epoch (the source
  // slowest to cycle through its data sets it; one that a later phase drops before it finished
  // its epoch never does and is not waited for); for one source, its windows per epoch.
  uint64_t windows_per_epoch() const;

  size_t num_sources() const { return sources_.size(); }
  const SamplePlan& source(size_t s) const { return sources_[s]; }
  size_t num_phases() const { return phases_.size(); }
  const std::vector<uint32_t>& table(size_t phase) const { return phases_[phase].table; }

 private:
  struct Phase {
    uint64_t start = 0;
    std::vector<uint64_t> base;    // samples each source drew before `start`
    std::vector<uint32_t> table;   // source of each slot of the period
    std::vector<uint64_t> rank;    // slots of the same source before this one in the period
    std::vector<uint64_t> count;   // slots of each source in a period
    std::vector<std::vector<uint32_t>> slots;  // slots[s][r]: the slot of source s's r-th
    // Samples of source s among the phase's first `local` samples (not counting base).
    uint64_t taken(uint32_t s, uint64_t local) const;
  };
  const Phase& phase_of(uint64_t g) const;

  std::vector<SamplePlan> sources_;
  std::vector<uint32_t> first_shard_;
  std::vector<Phase> phases_;
};

// The seed of source s's SamplePlan: seed + s (mod 2^64). Source 0 reads what a plain loader of
// its shards reads, and source s what one with seed + s reads; the streams are unrelated all the
// same (SamplePlan mixes its seed), where one seed for all would draw the same relative position
// in every source for the same j in random mode.
uint64_t source_seed(uint64_t seed, uint32_t source);

}  // namespace fmcore::data
