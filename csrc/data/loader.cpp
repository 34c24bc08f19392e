// The token loader core; see loader.h.
#include "data/loader.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <stdexcept>
#include <string>
#include <system_error>
#include <type_traits>

namespace fmcore::data {
namespace {

void check_options(const LoaderOptions& o) {
  auto bad = [](const std::string& what) { throw std::invalid_argument(what); };
  if (o.batch_size < 1) bad("batch_size must be >= 1, got " + std::to_string(o.batch_size));
  if (o.seq_len < 1) bad("seq_len must be >= 1, got " + std::to_string(o.seq_len));
  if (o.world_size < 1) bad("world_size must be >= 1, got " + std::to_string(o.world_size));
  if (o.rank < 0 || o.rank >= o.world_size)
    bad("rank must be in [0, world_size=" + std::to_string(o.world_size) + "), got " +
        std::to_string(o.rank));
  if (o.threads < 1) bad("threads must be >= 1, got " + std::to_string(o.threads));
  if (o.prefetch < 1) bad("prefetch must be >= 1, got " + std::to_string(o.prefetch));
  if (o.out_bytes != 4 && o.out_bytes != 8) bad("out_bytes must be 4 (int32) or 8 (int64)");
  // The batch buffer is about 4 * batch_size * seq_len * 8 bytes, computed in size_t: a product
  // that wrapped gave a small buffer the workers then wrote B * T tokens into (batch_size = 2^61 + 1
  // overflowed the heap). 2^56 tokens keeps every layout offset far below 2^63.
  if (o.batch_size > (int64_t{1} << 56) / o.seq_len)
    bad("batch_size * seq_len must be < 2^56 tokens, got " + std::to_string(o.batch_size) + " * " +
        std::to_string(o.seq_len));
  // cu_seqlens are int32 offsets into the flattened batch.
  if (o.doc_boundaries && o.batch_size * o.seq_len >= (int64_t{1} << 31))
    bad("doc_boundaries needs batch_size * seq_len < 2^31 (cu_seqlens are int32)");
}

// One SamplePlan per source over its contiguous range of the shard list.
std::unique_ptr<BlendPlan> make_blend(const LoaderOptions& o, const std::vector<uint64_t>& sizes) {
  std::vector<uint32_t> counts = o.source_shards;
  std::vector<BlendPhase> phases = o.phases;
  if (counts.empty() && phases.empty()) {
    counts = {static_cast<uint32_t>(sizes.size())};
    phases = {BlendPhase{0, {1.0}}};
  }
  if (counts.empty())
    throw std::invalid_argument("blend phases given without source_shards");
  std::vector<SamplePlan> plans;
  std::vector<uint32_t> first;
  size_t at = 0;
  for (size_t s = 0; s < counts.size(); ++s) {
    if (counts[s] == 0 || counts[s] > sizes.size() - at)
      throw std::invalid_argument(
          "source_shards[" + std::to_string(s) + "] = " + std::to_string(counts[s]) +
          ": each source needs at least one shard, and together exactly the " +
          std::to_string(sizes.size()) + " paths");
    first.push_back(static_cast<uint32_t>(at));
    plans.emplace_back(std::vector<uint64_t>(sizes.begin() + at, sizes.begin() + at + counts[s]),
                       o.seq_len, o.mode, source_seed(o.seed, static_cast<uint32_t>(s)));
    at += counts[s];
  }
  if (at != sizes.size())
    throw std::invalid_argument("source_shards sum to " + std::to_string(at) + ", but there are " +
                                std::to_string(sizes.size()) + " paths");
  return std::make_unique<BlendPlan>(std::move(plans), std::move(first), phases);
}

}  // namespace

Loader::Loader(LoaderOptions options, Allocator allocator)
    : opt_(std::move(options)), alloc_(std::move(allocator)) {
  check_options(opt_);
  if (opt_.paths.empty()) throw ShardError("empty dataset: no shards to load");
  // Open (and, when asked, checksum) the shards in parallel; the first failing shard in list order
  // is reported, so the message does not depend on thread timing.
  size_t n = opt_.paths.size();
  shards_.resize(n);
  std::vector<std::exception_ptr> errors(n);
  std::atomic<size_t> next{0};
  auto open_some = [&] {
    for (size_t k; (k = next.fetch_add(1)) < n;) {
      try {
        shards_[k] = Shard::open(opt_.paths[k], opt_.verify, opt_.mode == Mode::Random);
      } catch (...) {
        errors[k] = std::current_exception();
      }
    }
  };
  std::vector<std::thread> openers;
  for (int t = 1; t < std::min<int>(opt_.threads, static_cast<int>(n)); ++t) {
    try {
      openers.emplace_back(open_some);
    } catch (const std::system_error&) {
      break;  // no more threads to be had: the ones started (and this one) share the shards
    }
  }
  open_some();
  for (auto& t : openers) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);

  const uint64_t window = static_cast<uint64_t>(opt_.seq_len) + 1;
  std::vector<uint64_t> sizes;
  for (auto& s : shards_) {
    const ShardInfo& info = s->info();
    if (info.n_tokens < window)
      throw ShardError(info.path + ": window longer than the shard: seq_len + 1 = " +
                       std::to_string(window) + " tokens, the shard holds " +
                       std::to_string(info.n_tokens) + " (token count at offset 8)");
    if (opt_.check_vocab && opt_.vocab_size == 0 && info.vocab_size == 0)
      throw ShardError(info.path +
                       ": check_vocab needs a vocab size, and the header's (offset 24) is 0");
    if (opt_.doc_boundaries && info.n_docs == 0 && opt_.eos_id < 0)
      throw ShardError(
          info.path +
          ": doc_boundaries needs document offsets (count 0 at offset 16) or an EOS id");
    sizes.push_back(info.n_tokens);
  }
  plan_ = make_blend(opt_, sizes);

  const size_t bt = static_cast<size_t>(opt_.batch_size) * static_cast<size_t>(opt_.seq_len);
  const size_t ob = static_cast<size_t>(opt_.out_bytes);
  layout_.x = 0;
  layout_.y = bt * ob;
  layout_.bytes = 2 * bt * ob;
  if (opt_.doc_boundaries) {
    layout_.positions = layout_.bytes;
    layout_.cu_seqlens = layout_.positions + bt * ob;
    layout_.bytes = layout_.cu_seqlens + (bt + 1) * sizeof(int32_t);
  }
  if (!alloc_) {
    alloc_ = [](size_t bytes) {
      auto mem = std::shared_ptr<void>(::operator new(bytes, std::align_val_t{64}),
                                       [](void* p) { ::operator delete(p, std::align_val_t{64}); });
      return HostBuffer{mem.get(), mem};
    };
  }
  start_workers();
}

Loader::~Loader() { close(); }

void Loader::start_workers() {
  const uint64_t depth = static_cast<uint64_t>(opt_.prefetch);
  // mu_ is held until every worker has started, so no worker claims a batch before then. When the
  // system refuses a thread (address space or thread limit reached), the workers already started
  // have done nothing but wait for mu_: they see stop_ and return. Before, they built batches while
  // memory ran out, and glibc aborted the process allocating torch's thread-local data for them.
  std::unique_lock<std::mutex> lk(mu_);
  slots_.assign(depth, Slot{});
  claimed_ = delivered_ = 0;
  ++generation_;
  stop_ = false;
  failed_ = nullptr;
  for (int t = 0; t < opt_.threads; ++t) {
    try {
      workers_.emplace_back([this, depth] { worker(depth); });
    } catch (const std::system_error& e) {
      // Without this, the constructor's unwinding destroyed joinable std::threads: std::terminate.
      // The workers already started are stopped and joined; next() raises the same error.
      lk.unlock();  // stop_workers() takes mu_, and the workers need it to see stop_
      stop_workers();
      const std::runtime_error err("could not start loader worker thread " + std::to_string(t + 1) +
                                   " of " + std::to_string(opt_.threads) + " (" + e.what() +
                                   "); lower `threads`");
      lk.lock();
      failed_ = std::make_exception_ptr(err);
      throw err;
    }
  }
}

void Loader::stop_workers() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  ready_cv_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
  std::vector<Slot> dropped;
  {
    std::lock_guard<std::mutex> lk(mu_);
    dropped.swap(slots_);  // buffers are released outside the lock
  }
}

void Loader::close() {
  // close() and restart() from two threads would otherwise both join the same std::threads (UB),
  // or restart workers on a closed loader that nothing joins (std::terminate at destruction).
  std::lock_guard<std::mutex> control(control_mu_);
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (closed_) return;
    closed_ = true;
  }
  stop_workers();
}

void Loader::restart(uint64_t start_sample, std::vector<BlendPhase> phases) {
  std::lock_guard<std::mutex> control(control_mu_);
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (closed_) throw std::runtime_error("the loader is closed");
  }
  std::unique_ptr<BlendPlan> plan;
  if (!phases.empty()) {  // built (and checked) while the workers still run
    LoaderOptions o = opt_;
    o.phases = std::move(phases);
    std::vector<uint64_t> sizes;
    for (auto& s : shards_) sizes.push_back(s->info().n_tokens);
    plan = make_blend(o, sizes);
    phases = std::move(o.phases);
  }
  stop_workers();
  {
    std::lock_guard<std::mutex> lk(mu_);
    opt_.start_sample = start_sample;
    if (plan) {  // (no worker reads plan_ now)
      plan_ = std::move(plan);
      opt_.phases = std::move(phases);
    }
  }
  try {
    for (auto& s : shards_) s->check_unchanged();  // (a resume: the workers read anywhere next)
  } catch (...) {
    std::lock_guard<std::mutex> lk(mu_);
    failed_ = std::current_exception();
    throw;
  }
  start_workers();
}

uint64_t Loader::next_sample() const {
  std::lock_guard<std::mutex> lk(mu_);
  // In uint64 like the workers' sample numbers (make_batch): the int64 product could overflow (UB).
  return opt_.start_sample + delivered_ * static_cast<uint64_t>(opt_.world_size) *
                                 static_cast<uint64_t>(opt_.batch_size);
}

double Loader::wait_seconds() const {
  std::lock_guard<std::mutex> lk(mu_);
  return wait_seconds_;
}

void Loader::worker(uint64_t depth) {
  BlendPlan::Cache cache;
  size_t current = shards_.size();
  for (;;) {
    uint64_t i;
    {
      std::unique_lock<std::mutex> lk(mu_);
      work_cv_.wait(lk, [&] { return stop_ || claimed_ < delivered_ + depth; });
      if (stop_) return;
      i = claimed_++;
    }
    Slot slot;
    slot.index = i;
    try {
      slot.batch = make_batch(i, cache, current);
    } catch (...) {
      slot.error = std::current_exception();
    }
    slot.ready = true;
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (stop_) return;  // `slot` (and its buffer) is released on the way out
      // Slot i % depth is free: batch i - depth was delivered before i could be claimed.
      std::swap(slots_[i % depth], slot);
    }
    ready_cv_.notify_all();
  }
}

Batch Loader::next(const std::function<bool()>& interrupted) {
  auto t0 = std::chrono::steady_clock::now();
  Batch out;
  {
    std::unique_lock<std::mutex> lk(mu_);
    if (failed_) std::rethrow_exception(failed_);
    if (closed_) throw std::runtime_error("the loader is closed");
    // Everything is re-read under the lock at each wake-up, nothing kept across the wait: another
    // consumer thread may have taken batch delivered_ meanwhile (waiting for the number read on
    // entry then waited forever), and restart() replaces slots_ (a Slot* kept across the wait
    // dangled) and empties it while the workers stop (slots_.size() was 0 here: a division by
    // zero). The stop_ test comes first for that reason.
    const uint64_t generation = generation_;
    Slot* slot = nullptr;
    const auto arrived = [&] {
      if (stop_ || generation_ != generation || failed_) return true;
      slot = &slots_[delivered_ % slots_.size()];
      return slot->ready && slot->index == delivered_;
    };
    while (!ready_cv_.wait_for(lk, std::chrono::milliseconds(100), arrived)) {
      if (!interrupted) continue;
      lk.unlock();  // (the callback takes Python's GIL: a thread holding it may want mu_ first)
      const bool stop = interrupted();
      lk.lock();
      if (stop) {
        wait_seconds_ +=
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        throw Interrupted{};
      }
    }
    wait_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (closed_) throw std::runtime_error("the loader was closed while waiting for a batch");
    if (stop_ || generation_ != generation)
      throw std::runtime_error("the loader was restarted while waiting for a batch");
    if (failed_) std::rethrow_exception(failed_);  // another consumer thread received the error
    slot->ready = false;
    if (slot->error) {
      failed_ = slot->error;
      slot->error = nullptr;
      ready_cv_.notify_all();  // the other consumer threads waiting get the error too
      std::rethrow_exception(failed_);
    }
    out = std::move(slot->batch);
    ++delivered_;
  }
  work_cv_.notify_all();
  ready_cv_.notify_all();  // another consumer thread may wait for the batch after this one
  return out;
}

Batch Loader::make_batch(uint64_t i, BlendPlan::Cache& cache, size_t& current) const {
  Batch b;
  b.index = i;
  b.buffer = alloc_(layout_.bytes);
  if (!b.buffer.data) throw std::bad_alloc();
  char* base = static_cast<char*>(b.buffer.data);
  const uint64_t B = static_cast<uint64_t>(opt_.batch_size),
                 T = static_cast<uint64_t>(opt_.seq_len);
  const uint64_t first =
      opt_.start_sample + (i * static_cast<uint64_t>(opt_.world_size) + opt_.rank) * B;
  int32_t* cu =
      opt_.doc_boundaries ? reinterpret_cast<int32_t*>(base + layout_.cu_seqlens) : nullptr;
  if (cu) cu[0] = 0;
  for (uint64_t row = 0; row < B; ++row) {
    Location loc = plan_->locate(first + row, cache);
    const Shard& shard = *shards_[loc.shard];
    // A shard truncated since it was opened would raise SIGBUS at its first page past the new
    // end: looked for when the worker moves to another shard (sequential mode: once a shard;
    // random mode: at a batch's first row only, a stat per row would cost as much as the row).
    if (loc.shard != current && (row == 0 || opt_.mode == Mode::Sequential)) {
      shard.check_unchanged();
      current = loc.shard;
    }
    if (opt_.check_vocab)
      shard.check_vocab(loc.start, T + 1,
                        opt_.vocab_size ? opt_.vocab_size : shard.info().vocab_size);
    const size_t off = row * T;
    // x, y and positions share the output element type (int64 or int32).
    auto fill = [&](auto* typed) {
      using Out = std::remove_pointer_t<decltype(typed)>;
      fill_row(shard, loc.start, reinterpret_cast<Out*>(base + layout_.x) + off,
               reinterpret_cast<Out*>(base + layout_.y) + off);
      if (cu)
        fill_segments(shard, loc.start, static_cast<int64_t>(row),
                      reinterpret_cast<Out*>(base + layout_.positions) + off, cu, b.n_segments,
                      b.max_seqlen);
    };
    if (opt_.out_bytes == 8) {
      fill(static_cast<int64_t*>(nullptr));
    } else {
      fill(static_cast<int32_t*>(nullptr));
    }
  }
  return b;
}

template <typename Out>
void Loader::fill_row(const Shard& shard, uint64_t start, Out* x, Out* y) const {
  // The plan guarantees start + T + 1 <= shard size (checked per shard at construction).
  const uint64_t T = static_cast<uint64_t>(opt_.seq_len);
  shard.copy(start, T, x);
  shard.copy(start + 1, T, y);
}

// Splits the row's window [start, start + T) at document starts: from the shard's offsets when it
// has them, else after every EOS token. positions restart at 0 in every segment; cu_seqlens gets
// the end of each segment as an offset into the flattened (B*T) batch. The row's start always opens
// a segment.
template <typename Out>
void Loader::fill_segments(const Shard& shard, uint64_t start, int64_t row, Out* positions,
                           int32_t* cu, int64_t& n_segments, int32_t& max_seqlen) const {
  const int64_t T = opt_.seq_len;
  int64_t seg = 0;  // start of the current segment within the row
  auto close_segment = [&](int64_t end) {
    for (int64_t t = seg; t < end; ++t) positions[t] = static_cast<Out>(t - seg);
    cu[++n_segments] = static_cast<int32_t>(row * T + end);
    max_seqlen = std::max(max_seqlen, static_cast<int32_t>(end - seg));
    seg = end;
  };
  const ShardInfo& info = shard.info();
  if (info.n_docs) {
    const uint64_t* d = shard.doc_starts();
    const uint64_t* it = std::upper_bound(d, d + info.n_docs, start);
    for (; it != d + info.n_docs && *it < start + static_cast<uint64_t>(T); ++it)
      close_segment(static_cast<int64_t>(*it - start));
  } else {
    const uint32_t eos = static_cast<uint32_t>(opt_.eos_id);
    for (int64_t t = 1; t < T; ++t)
      if (shard.token(start + static_cast<uint64_t>(t) - 1) == eos) close_segment(t);
  }
  close_segment(T);
}

}  // namespace fmcore::data
