// Which window of which shard the loader reads for global sample g: a pure function of
// (g, shard sizes, seq_len, mode, seed). No I/O, no threads, no torch.
//
// Samples are numbered globally: batch i of rank r (of world ranks, batch size B) holds samples
// start + (i*world + r)*B + b for b in [0, B). So ranks are disjoint, every step consumes world*B
// consecutive samples, and a batch's content does not depend on which thread computed it.
//
// Sequential mode: epoch e = g / W (W = windows per epoch) visits the shards in a permutation
// seeded by (seed, e); within a shard, windows of T+1 tokens start every T tokens, in order (window
// k reads tokens [k*T, k*T + T + 1): x = the first T, y = the last T). Epoch e+1 follows e with no
// gap, so every epoch's windows are each read exactly once, by exactly one rank. Random mode:
// sample g starts at a token position drawn uniformly (by a counter-based hash of (seed, g)) over
// every valid start of every shard.
#pragma once

#include <cstdint>
#include <vector>

namespace fmcore::data {

enum class Mode { Sequential, Random };

struct Location {
  uint32_t shard;  // index into the shard list
  uint64_t start;  // first token of the window (T + 1 tokens are read)
};

// splitmix64's finalizer: a bijective 64-bit mix.
inline uint64_t mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

class SamplePlan {
 public:
  // Per-thread memo of the last epoch's shard order (sequential mode).
  struct EpochCache {
    uint64_t epoch = ~uint64_t{0};
    std::vector<uint32_t> order;   // shard visited k-th
    std::vector<uint64_t> prefix;  // windows before the k-th visited shard; size n_shards + 1
  };

  // shard_tokens[k] >= seq_len + 1 for every k (the loader checks and names the file otherwise).
  SamplePlan(std::vector<uint64_t> shard_tokens, uint64_t seq_len, Mode mode, uint64_t seed);

  Location locate(uint64_t g, EpochCache& cache) const;
  std::vector<uint32_t> epoch_order(uint64_t epoch) const;  // the seeded shard permutation
  uint64_t windows_per_epoch() const { return windows_; }   // sequential mode
  uint64_t random_starts() const { return starts_; }        // random mode

 private:
  std::vector<uint64_t> tokens_;
  uint64_t seq_len_;
  Mode mode_;
  uint64_t seed_;
  uint64_t windows_ = 0;
  uint64_t starts_ = 0;
  std::vector<uint64_t> start_prefix_;  // random mode: valid starts before shard k (shard order)
};

}  // namespace fmcore::data
