// The token loader core: validated mmap'd shards, N worker threads computing batches ahead into a
// ring of host buffers, a blocking consumer. No torch: host memory comes from an Allocator callback
// (the Python binding passes one that returns pinned torch tensors).
//
// Batch i is a pure function of (options, i) (see plan.h): workers claim batch indices in order and
// may finish out of order; the consumer always receives batch i next. The ring holds at most
// `prefetch` finished or in-flight batches. Every batch gets a fresh buffer from the allocator, so
// a batch the caller still holds (or is still copying to the GPU) is never overwritten.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "data/blend.h"
#include "data/plan.h"
#include "data/shard.h"

namespace fmcore::data {

struct HostBuffer {
  void* data = nullptr;
  std::shared_ptr<void> owner;  // keeps the memory alive (a pinned torch tensor in the binding)
};
using Allocator = std::function<HostBuffer(size_t bytes)>;

struct LoaderOptions {
  std::vector<std::string> paths;
  int64_t batch_size = 8;
  int64_t seq_len = 1024;
  Mode mode = Mode::Sequential;
  uint64_t seed = 0;
  int64_t rank = 0;
  int64_t world_size = 1;
  int threads = 1;
  int prefetch = 4;             // batches computed ahead (ring size)
  bool doc_boundaries = false;  // fill positions and cu_seqlens
  int out_bytes = 8;            // x, y, positions as int64 (8) or int32 (4)
  bool check_vocab = false;     // every token read is checked < vocab (a worker error otherwise)
  uint32_t vocab_size = 0;      // for check_vocab; 0: each shard's header
  int64_t eos_id = -1;          // documents end after this token in shards without document offsets
  bool verify = false;          // check each shard's payload CRC when opening
  uint64_t start_sample = 0;    // global sample number of batch 0 (resume)
  // A weighted blend of sources (see blend.h): source s owns the next source_shards[s] paths, in
  // order, and weighs phases[k].weights[s] from global sample phases[k].start on. Both empty: one
  // source of every path.
  std::vector<uint32_t> source_shards;
  std::vector<BlendPhase> phases;
};

// Byte offsets of one batch in its buffer: x (B*T), y (B*T), then with doc_boundaries positions
// (B*T) and cu_seqlens (int32, at most B*T + 1 entries). Every offset is a multiple of out_bytes.
struct BatchLayout {
  size_t x = 0, y = 0, positions = 0, cu_seqlens = 0, bytes = 0;
};

struct Batch {
  uint64_t index = 0;
  HostBuffer buffer;
  int64_t n_segments = 0;  // doc_boundaries: cu_seqlens holds n_segments + 1 entries
  int32_t max_seqlen = 0;  // doc_boundaries: the longest segment
};

class Loader {
 public:
  // Opens and validates every shard (throws ShardError), then starts the workers.
  Loader(LoaderOptions options, Allocator allocator);
  ~Loader();
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;

  // The next batch; blocks until it is ready. Rethrows a worker's error (then every later call
  // does). Callable from several threads at once: each batch goes to exactly one of them.
  // `interrupted`, when given, is called every 100 ms of waiting (without the loader's lock): if it
  // returns true, next() throws Interrupted and takes no batch (Python's binding checks for signals
  // there, so Ctrl-C needs no batch to arrive first).
  struct Interrupted {};
  Batch next(const std::function<bool()>& interrupted = nullptr);
  // Stops and joins the workers; next() then throws. Idempotent.
  void close();
  // Stops the workers, drops prefetched batches and restarts at a global sample number. A next()
  // in another thread meanwhile (waiting, or called mid-restart) throws std::runtime_error naming
  // the restart. A shard changed since it was opened throws ShardError, and so does every next().
  // phases, when not empty, replace the blend's (a resume of a run whose mix changed; checked, and
  // std::invalid_argument thrown, before anything stops).
  void restart(uint64_t start_sample, std::vector<BlendPhase> phases = {});

  // Global sample number where the next batch of rank 0 would start (what state_dict saves).
  uint64_t next_sample() const;
  double wait_seconds() const;
  const BatchLayout& layout() const { return layout_; }
  const LoaderOptions& options() const { return opt_; }
  const BlendPlan& plan() const { return *plan_; }
  size_t num_shards() const { return shards_.size(); }
  const Shard& shard(size_t k) const { return *shards_[k]; }

 private:
  struct Slot {
    bool ready = false;
    uint64_t index = 0;
    Batch batch;
    std::exception_ptr error;
  };
  void start_workers();
  void stop_workers();
  void worker(uint64_t depth);
  // current: the shard a worker read last (its changes are looked for when it moves to another).
  Batch make_batch(uint64_t i, BlendPlan::Cache& cache, size_t& current) const;
  template <typename Out>
  void fill_row(const Shard& shard, uint64_t start, Out* x, Out* y) const;
  template <typename Out>
  void fill_segments(const Shard& shard, uint64_t start, int64_t row, Out* positions, int32_t* cu,
                     int64_t& n_segments, int32_t& max_seqlen) const;

  LoaderOptions opt_;
  Allocator alloc_;
  std::vector<std::unique_ptr<Shard>> shards_;
  std::unique_ptr<BlendPlan> plan_;
  BatchLayout layout_;

  std::mutex control_mu_;  // serializes close() and restart() (both stop and join the workers)
  mutable std::mutex mu_;
  std::condition_variable work_cv_;   // workers wait for ring space
  std::condition_variable ready_cv_;  // the consumer waits for its batch
  std::vector<Slot> slots_;
  uint64_t claimed_ = 0;    // next batch index a worker will take
  uint64_t delivered_ = 0;  // batches handed to the consumer since the last (re)start
  uint64_t generation_ = 0;  // incremented by every (re)start: slots_ and delivered_ were replaced
  bool stop_ = false;
  bool closed_ = false;
  std::exception_ptr failed_;
  double wait_seconds_ = 0;
  std::vector<std::thread> workers_;
};

}  // namespace fmcore::data
