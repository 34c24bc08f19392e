// fmsim's execution model and the CUDA runtime functions fmcore's launchers and bindings call (see
// fmsim.h for what is modelled). Built with -fvisibility=hidden: these cuda* definitions bind only
// inside libfmcore_sim, never in place of the real libcudart torch has loaded.
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <shared_mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#define FMSIM_KERNEL_TU  // threadIdx & co. are set here
#include "fmsim.h"

// ---- what ThreadSanitizer sees (FMCORE_SIM_SANITIZE=thread)
// fmsim's own bookkeeping orders far more than CUDA does: every barrier and warp collective of every
// thread takes the one launch mutex, so TSan would see almost any two accesses of a block as ordered.
// Under TSan that bookkeeping runs Hidden (no synchronization, reads or writes seen), and only the
// orderings CUDA defines are declared, as release/acquire pairs on sync objects: __syncthreads among
// the block's threads, __syncwarp among a warp's lanes, and the end of a block before the start of
// the next (shuffles, ldmatrix and mma exchange registers and order no memory). Two accesses to
// shared memory by different CUDA threads that no barrier orders are then reported, whatever
// collectives either thread ran in between.
#if defined(__SANITIZE_THREAD__)
extern "C" {
void AnnotateIgnoreSyncBegin(const char* file, int line);
void AnnotateIgnoreSyncEnd(const char* file, int line);
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
namespace {
struct Hidden {
  Hidden() {
    AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  ~Hidden() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
    AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
  }
  Hidden(const Hidden&) = delete;
  Hidden& operator=(const Hidden&) = delete;
};
void hb_release(void* sync) { __tsan_release(sync); }
void hb_acquire(void* sync) { __tsan_acquire(sync); }
}  // namespace
#else
namespace {
struct Hidden {
  Hidden() {}  // user-provided: `const Hidden hidden;` is then well-formed
};
void hb_release(void*) {}
void hb_acquire(void*) {}
}  // namespace
#endif

namespace fmsim {

namespace {

constexpr size_t kDefaultSmem = 48 * 1024;
constexpr size_t kOptinSmem = 227 * 1024;
constexpr size_t kSmemPerSm = 228 * 1024;
constexpr int kThreadsPerSm = 2048;

// A fault inside a CUDA thread: unwinds that thread's kernel.
struct Fault {};

// What waiting threads sleep on: a generation counter (a futex, through C++20 atomic wait). The
// bookkeeping happens under Launch::mu; a waiter releases the mutex before it sleeps, so opening
// the gate wakes each waiter without handing the mutex from one to the next (1024 threads at a
// __syncthreads otherwise queue on it).
struct Gate {
  std::atomic<uint32_t> gen{0};
  void open() {
    gen.fetch_add(1, std::memory_order_acq_rel);
    gen.notify_all();
  }
};

// Bytes each lane contributes to a warp collective: a shuffle's value (<= 16), an ldmatrix row
// address (8), an mma's A and B fragments (24).
constexpr size_t kSlotBytes = 32;
using Slots = unsigned char (*)[kSlotBytes];

struct Warp {
  Gate gate;
  unsigned lanes = 0;  // threads of the block in this warp (32 but for a partial last warp)
  unsigned arrived = 0, exited = 0;
  unsigned char slot[2][32][kSlotBytes];  // double buffered: see warp_barrier()
  char syncwarp_hb[2];                    // TSan sync objects of __syncwarp (by lane parity)
};

// One launch's shared state. Everything below the mutex is guarded by it (but the *_hb members,
// which are only addresses that TSan sync objects are keyed by).
struct Launch {
  std::string name;
  Config cfg{dim3(), dim3()};
  unsigned nthreads = 0;
  uint64_t nblocks = 0;
  void (*body)(void*);
  void* ctx;
  struct Free {
    void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t(1024)); }
  };
  std::unique_ptr<unsigned char[], Free> smem;
  // The async proxy, for cp.async's copies: per byte of the dynamic shared memory, 1 + the thread
  // whose landed cp.async wrote it and which has not run fence.proxy.async since (0: none).
  std::unique_ptr<std::atomic<uint16_t>[]> unfenced;
  // And for every write (ordinary stores included, which fmsim does not see one by one): what the
  // async proxy reads, a copy of the dynamic shared memory taken at the first wgmma issued after a
  // fence.proxy.async (view_stale). A byte written since the copy, with no fence after it, is not
  // in it; a wgmma operand byte that differs between the two at the wgmma's execution faults.
  std::unique_ptr<unsigned char[], Free> view;
  std::shared_mutex view_mu;
  bool view_stale = false;  // guarded by view_mu; cleared with the view at each block's start

  std::mutex mu;
  // Per thread, the wgmmas it issued in the current block (set as it returns): wgmma is
  // warpgroup-wide, so the threads of a warpgroup must agree when the block ends.
  std::vector<uint64_t> wgmma_issued;
  Gate block_gate;  // __syncthreads
  std::vector<Warp> warps;
  // The block running now (linear index); kFailedBit is or-ed in when the launch fails.
  std::atomic<uint32_t> block{0};
  static constexpr uint32_t kFailedBit = 0x80000000u;
  unsigned block_arrived = 0, exited = 0, blocked = 0;
  std::atomic<bool> failed{false};
  std::string error;
  char barrier_hb[2];  // TSan sync objects of __syncthreads (by the thread's barrier parity)
  char block_hb[2];    // TSan: a block's end before the next block's start (by block parity)
};

thread_local Launch* tl_launch = nullptr;
thread_local unsigned tl_tid = 0;
thread_local int tl_parity = 0;  // which slot buffer this lane's next shuffle uses
thread_local int tl_barrier_parity = 0;  // flips at each __syncthreads (barrier_hb)
thread_local cudaError_t tl_last_error = cudaSuccess;

// This thread's cp.async copies in flight (cp_async), and how many groups it has committed.
struct Copy {
  void* dst;
  const void* src;
  size_t bytes, src_bytes;
  uint64_t group;  // the commit count when issued: the group it joins at the next commit
};
thread_local std::vector<Copy> tl_copies;
thread_local uint64_t tl_groups = 0;
// Shared-memory byte ranges (offset, bytes) this thread's landed copies wrote since its last
// fence.proxy.async (Launch::unfenced).
thread_local std::vector<std::pair<uint32_t, uint32_t>> tl_unfenced;

uint16_t unfenced_mark() { return static_cast<uint16_t>(tl_tid + 1); }

// Lands the in-flight copies of groups < `below`, in issue order.
void complete_copies(uint64_t below) {
  size_t kept = 0;
  const auto smem = reinterpret_cast<uintptr_t>(tl_launch->smem.get());
  for (const Copy& c : tl_copies) {
    if (c.group < below) {
      std::memcpy(c.dst, c.src, c.src_bytes);
      std::memset(static_cast<unsigned char*>(c.dst) + c.src_bytes, 0, c.bytes - c.src_bytes);
      const auto at = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(c.dst) - smem);
      if (reinterpret_cast<uintptr_t>(c.dst) >= smem && at < tl_launch->cfg.smem) {
        const auto bytes = static_cast<uint32_t>(c.bytes);
        for (uint32_t b = at; b < at + bytes; ++b) {
          tl_launch->unfenced[b].store(unfenced_mark(), std::memory_order_relaxed);
        }
        tl_unfenced.emplace_back(at, bytes);
      }
    } else {
      tl_copies[kept++] = c;
    }
  }
  tl_copies.resize(kept);
}

// This thread's wgmmas issued and not yet run (wgmma_ss, wgmma_rs), in issue order, and how many
// groups it has committed.
struct Wgmma {
  float* d;  // the N / 8 x 4 accumulators
  int n;
  MmaIn in;
  bool reg_a;  // wgmma_rs: A from registers (a); wgmma_ss: A through desc_a
  bool a_mn, b_mn;  // wgmma_ss's A, and B: MN-major (else K-major); wgmma_rs's B is MN-major
  uint64_t desc_a, desc_b;
  float a[2][16];  // wgmma_rs: rows g and g + 8 of the warp's A (this lane's rows of D)
  // wgmma_rs: this lane's A registers (the kernel's array) and their bits at issue: the hardware
  // reads them while in flight, so a write to them before the wait faults when the op runs.
  const uint32_t* a_regs = nullptr;
  uint32_t a_bits[4] = {};
  bool accumulate;
  bool chained;          // an earlier pending op writes d: its result is the input
  std::vector<float> c;  // otherwise the input accumulators as they were at issue (if accumulate)
  uint64_t group;        // the commit count when issued
};
thread_local std::vector<Wgmma> tl_wgmmas;
thread_local uint64_t tl_wgmma_groups = 0;
// Whether this thread ran wgmma.fence since its last wgmma.wait_group (or since the block began).
thread_local bool tl_wgmma_fenced = false;
thread_local uint64_t tl_wgmma_issued = 0;  // wgmmas this thread issued in the current block

std::mutex g_launch_mu;  // launches are serialized

// Every static __shared__ array seen so far (address, bytes); poisoned between blocks.
std::mutex g_regions_mu;
std::map<void*, size_t> g_regions;
thread_local std::vector<void*> tl_regions_seen;  // this thread's registrations (no lock after)

// Fills the block's shared memory with NaN bytes. No CUDA thread runs kernel code meanwhile.
void poison_shared(Launch& L);
std::mutex g_attr_mu;
std::map<const void*, size_t>& max_dynamic_smem() {
  static std::map<const void*, size_t> m;
  return m;
}

std::string where(const Launch& L) {
  const dim3 g = L.cfg.grid;
  const uint64_t b = L.block.load(std::memory_order_relaxed) & ~Launch::kFailedBit;
  return L.name + " block (" + std::to_string(b % g.x) + "," +
         std::to_string(b / g.x % g.y) + "," + std::to_string(b / g.x / g.y) + ") thread " +
         std::to_string(tl_tid);
}

// Records the launch's first error and wakes every waiting thread. Caller holds L.mu.
void fail_locked(Launch& L, const std::string& what) {
  if (L.failed.load(std::memory_order_relaxed)) return;
  L.error = what;
  L.failed.store(true, std::memory_order_release);
  L.block_gate.open();
  for (Warp& w : L.warps) w.gate.open();
  L.block.fetch_or(Launch::kFailedBit, std::memory_order_acq_rel);
  L.block.notify_all();
}

// Every live thread waits, yet the barrier just arrived at did not complete: none ever will.
void check_deadlock_locked(Launch& L) {
  if (L.blocked == 0 || L.blocked + L.exited != L.nthreads) return;
  unsigned in_warp = 0;
  for (const Warp& w : L.warps) in_warp += w.arrived;
  fail_locked(L, "deadlock: divergent barrier/shuffle in " + where(L) + ": " +
                     std::to_string(L.block_arrived) + " threads wait at __syncthreads, " +
                     std::to_string(in_warp) + " in warp shuffles, " + std::to_string(L.exited) +
                     " returned");
}

// The caller arrived at a barrier (__syncthreads or a warp's) that `gate` opens, and is not the
// last to arrive: it counts as blocked, a deadlock is reported if no barrier can complete any
// more, and it sleeps without the lock until the gate opens. Throws Fault when the launch failed.
void block_until_open(Launch& L, Gate& gate, std::unique_lock<std::mutex>& lk) {
  ++L.blocked;
  // the generation before a deadlock report opens every gate
  const uint32_t gen = gate.gen.load(std::memory_order_relaxed);
  check_deadlock_locked(L);
  lk.unlock();
  while (gate.gen.load(std::memory_order_acquire) == gen)
    gate.gen.wait(gen, std::memory_order_acquire);
  if (L.failed.load(std::memory_order_acquire)) throw Fault{};
}

Launch& current() {
  if (tl_launch == nullptr)
    throw std::runtime_error("fmsim: device function called outside a kernel");
  return *tl_launch;
}

void release_block_barrier_locked(Launch& L) {
  L.blocked -= L.block_arrived - 1;  // the releasing thread never counted itself as blocked
  L.block_arrived = 0;
  L.block_gate.open();
}

// At a block's end: a warpgroup some of whose threads issued more wgmmas than others ("" if none).
std::string wgmma_divergence_locked(const Launch& L) {
  for (unsigned g = 0; 128 * (g + 1) <= L.nthreads; ++g) {
    for (unsigned t = 128 * g + 1; t < 128 * (g + 1); ++t) {
      if (L.wgmma_issued[t] != L.wgmma_issued[128 * g]) {
        return "wgmma issued " + std::to_string(L.wgmma_issued[t]) + " times by thread " +
               std::to_string(t) + " but " + std::to_string(L.wgmma_issued[128 * g]) +
               " times by thread " + std::to_string(128 * g) + " of its warpgroup in " + L.name +
               " (wgmma is .sync.aligned: every thread of the four warps issues each one)";
      }
    }
  }
  return "";
}

// The calling thread returned from the kernel for the current block.
void exit_thread_locked(Launch& L) {
  Warp& w = L.warps[tl_tid / 32];
  L.wgmma_issued[tl_tid] = tl_wgmma_issued;
  ++L.exited;
  ++w.exited;
  if (w.arrived > 0) {
    fail_locked(L, "full-mask warp shuffle/sync with a returned lane in " + where(L) +
                       " (the lane returned while its siblings wait: undefined on hardware)");
    return;
  }
  if (L.block_arrived > 0 && L.block_arrived + L.exited == L.nthreads) {
    L.blocked += 1;  // release subtracts arrived - 1; the exiting thread was not among them
    release_block_barrier_locked(L);
  }
  if (L.exited == L.nthreads) {  // the block is done: set up the next one
    if (const std::string diverged = wgmma_divergence_locked(L); !diverged.empty()) {
      fail_locked(L, diverged);
      return;
    }
    L.exited = 0;
    for (Warp& x : L.warps) x.exited = 0;
    poison_shared(L);
    L.block.fetch_add(1, std::memory_order_acq_rel);
    L.block.notify_all();
    return;
  }
  check_deadlock_locked(L);
}

void thread_main(Launch& L, unsigned tid) {
  tl_launch = &L;
  tl_tid = tid;
  const dim3 g = L.cfg.grid, b = L.cfg.block;
  blockDim = b;
  gridDim = g;
  threadIdx = make_uint3(tid % b.x, tid / b.x % b.y, tid / b.x / b.y);
  for (uint64_t blk = 0; blk < L.nblocks; ++blk) {
    uint32_t now;
    {
      const Hidden hidden;
      while ((now = L.block.load(std::memory_order_acquire)) != blk) {
        if (now & Launch::kFailedBit) break;
        L.block.wait(now, std::memory_order_acquire);
      }
    }
    if (now != blk) break;
    if (blk > 0) hb_acquire(&L.block_hb[(blk - 1) % 2]);  // not this block's: it runs unordered
    blockIdx = make_uint3(static_cast<unsigned>(blk % g.x), static_cast<unsigned>(blk / g.x % g.y),
                          static_cast<unsigned>(blk / g.x / g.y));
    tl_parity = 0;
    tl_barrier_parity = 0;
    tl_copies.clear();
    tl_groups = 0;
    tl_unfenced.clear();
    tl_wgmmas.clear();
    tl_wgmma_groups = 0;
    tl_wgmma_fenced = false;
    tl_wgmma_issued = 0;
    std::string error;
    try {
      L.body(L.ctx);
      complete_copies(UINT64_MAX);  // copies still in flight at exit land all the same
      fence_proxy_async();          // the next block's shared memory is a fresh one
      // but a wgmma's d is the returned kernel's registers: its result is lost (and its shared
      // memory operands may be overwritten by the next block), a bug whatever the timing
      if (!tl_wgmmas.empty()) {
        fault("wgmma issued but never waited for (no wgmma_commit + wgmma_wait covers it before "
              "the thread returns)");
      }
    } catch (const Fault&) {
      // the launch has failed already (recorded by whoever raised it)
    } catch (const std::exception& e) {
      error = std::string(e.what()) + " in " + where(L);
    } catch (...) {
      error = "unknown exception in " + where(L);
    }
    hb_release(&L.block_hb[blk % 2]);
    const Hidden hidden;
    std::lock_guard<std::mutex> lk(L.mu);
    if (!error.empty()) fail_locked(L, error);
    if (L.failed.load(std::memory_order_relaxed)) break;
    exit_thread_locked(L);
  }
  tl_launch = nullptr;
}

cudaError_t validate(const void* kernel, const Config& c) {
  const dim3 b = c.block, g = c.grid;
  const uint64_t threads = uint64_t{b.x} * b.y * b.z;
  if (b.x == 0 || b.y == 0 || b.z == 0 || g.x == 0 || g.y == 0 || g.z == 0) {
    return cudaErrorInvalidConfiguration;
  }
  if (threads > 1024 || b.x > 1024 || b.y > 1024 || b.z > 64) return cudaErrorInvalidConfiguration;
  if (g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535) return cudaErrorInvalidConfiguration;
  if (uint64_t{g.x} * g.y * g.z >= Launch::kFailedBit) {
    fault("grids of 2^31 or more blocks are not simulated");
  }
  size_t limit = kDefaultSmem;
  {
    std::lock_guard<std::mutex> lk(g_attr_mu);
    const auto it = max_dynamic_smem().find(kernel);
    if (it != max_dynamic_smem().end()) limit = std::max(limit, it->second);
  }
  if (c.smem > limit) return cudaErrorInvalidValue;
  return cudaSuccess;
}

}  // namespace

std::string kernel_name(const char* expr, const char* function) {
  // GCC: "... [with auto kKernel = attention_fwd_kernel<64, true>; Args = {}]"
  const std::string f(function), key = " " + std::string(expr) + " = ";
  const size_t at = f.find(key, f.find(" [with "));
  if (at == std::string::npos) return expr;
  const size_t from = at + key.size();
  return f.substr(from, f.find_first_of(";]", from) - from);
}

void run(const void* kernel, std::string name, const Config& c, void (*body)(void*), void* ctx) {
  if (tl_launch != nullptr) fault("kernel launch from inside a kernel (dynamic parallelism)");
  if (const cudaError_t err = validate(kernel, c); err != cudaSuccess) {
    tl_last_error = err;
    return;
  }
  const std::lock_guard<std::mutex> serial(g_launch_mu);
  Launch L;
  L.name = std::move(name);
  L.cfg = c;
  L.nthreads = c.block.x * c.block.y * c.block.z;
  L.wgmma_issued.assign(L.nthreads, 0);
  L.nblocks = uint64_t{c.grid.x} * c.grid.y * c.grid.z;
  L.body = body;
  L.ctx = ctx;
  // Exactly the requested size (an access past it is a heap overflow under ASan), 1024-aligned:
  // the 128-byte swizzle's period, so that the swizzle bits of a pointer into it (which a kernel
  // may compute a swizzled offset from) and of its smem_addr offset (what wgmma's swizzle sees)
  // agree.
  L.smem.reset(static_cast<unsigned char*>(
      ::operator new[](c.smem > 0 ? c.smem : 1, std::align_val_t(1024))));
  L.unfenced.reset(new std::atomic<uint16_t>[c.smem > 0 ? c.smem : 1]());
  L.view.reset(static_cast<unsigned char*>(
      ::operator new[](c.smem > 0 ? c.smem : 1, std::align_val_t(1024))));
  poison_shared(L);
  L.warps = std::vector<Warp>((L.nthreads + 31) / 32);
  for (size_t w = 0; w < L.warps.size(); ++w) {
    L.warps[w].lanes = std::min<unsigned>(32, L.nthreads - 32 * static_cast<unsigned>(w));
  }
  {
    std::vector<std::thread> threads;
    threads.reserve(L.nthreads);
    for (unsigned t = 0; t < L.nthreads; ++t) threads.emplace_back(thread_main, std::ref(L), t);
    for (std::thread& t : threads) t.join();
  }
  if (L.failed.load()) throw std::runtime_error("fmsim: " + L.error);
}

void fault(const char* what) {
  if (tl_launch == nullptr) throw std::runtime_error(std::string("fmsim: ") + what);
  Launch& L = *tl_launch;
  {
    const Hidden hidden;
    std::lock_guard<std::mutex> lk(L.mu);
    fail_locked(L, std::string(what) + " in " + where(L));
  }
  throw Fault{};
}

namespace {

void poison_shared(Launch& L) {
  std::memset(L.smem.get(), 0xff, L.cfg.smem);  // NaN in every fp32/fp16/bf16 lane
  {
    // The async proxy sees the fresh poison too, and nothing the block writes before its first
    // fence.proxy.async.
    const Hidden hidden;  // view_mu is fmsim's own lock: it orders nothing for TSan
    const std::unique_lock<std::shared_mutex> lk(L.view_mu);
    std::memset(L.view.get(), 0xff, L.cfg.smem);
    L.view_stale = false;
  }
  const std::lock_guard<std::mutex> lk(g_regions_mu);
  for (const auto& [p, bytes] : g_regions) std::memset(p, 0xff, bytes);
}

}  // namespace

void* dynamic_smem_bytes() { return current().smem.get(); }

void shared_region(void* p, size_t bytes) {
  for (void* q : tl_regions_seen) {
    if (q == p) return;
  }
  tl_regions_seen.push_back(p);
  const Hidden hidden;
  const std::lock_guard<std::mutex> lk(g_regions_mu);
  g_regions.emplace(p, bytes);
}

void launch_bounds(int max_threads, int, int) {
  const dim3 b = current().cfg.block;
  if (static_cast<int64_t>(b.x) * b.y * b.z > max_threads) {
    fault(("launch of " + std::to_string(b.x * b.y * b.z) +
           " threads a block exceeds __launch_bounds__(" + std::to_string(max_threads) +
           ") (too many resources requested for launch)")
              .c_str());
  }
}

void syncthreads() {
  Launch& L = current();
  char* hb = &L.barrier_hb[tl_barrier_parity];
  tl_barrier_parity ^= 1;  // a thread can be one barrier ahead of another, never two
  hb_release(hb);
  {
    const Hidden hidden;
    std::unique_lock<std::mutex> lk(L.mu);
    if (L.failed.load(std::memory_order_relaxed)) throw Fault{};
    ++L.block_arrived;
    if (L.block_arrived + L.exited == L.nthreads) {
      release_block_barrier_locked(L);
    } else {
      block_until_open(L, L.block_gate, lk);
    }
  }
  hb_acquire(hb);
}

// All 32 lanes of the caller's warp arrive; `write` runs before the arrival (under the lock) and
// `read` after the last lane arrived. Lane values live in the slot buffer of the caller's parity:
// a lane overwrites that buffer two warp barriers later, when every lane has passed the barrier in
// between and so has read it.
template <class Write, class Read>
void warp_barrier(unsigned mask, Write&& write, Read&& read) {
  Launch& L = current();
  const Hidden hidden;  // exchanges registers: orders no memory (syncwarp declares its own)
  std::unique_lock<std::mutex> lk(L.mu);
  if (L.failed.load(std::memory_order_relaxed)) throw Fault{};
  if (mask != 0xffffffffu) {
    fail_locked(L, "partial warp mask (not modelled by fmsim) in " + where(L));
    throw Fault{};
  }
  Warp& w = L.warps[tl_tid / 32];
  if (w.lanes < 32 || w.exited > 0) {
    fail_locked(L, std::string("full-mask warp shuffle/sync with ") +
                       (w.exited > 0 ? "a returned lane" : "a partial warp") + " (" +
                       std::to_string(w.lanes - w.exited) + " of 32 lanes present) in " + where(L) +
                       " (undefined on hardware)");
    throw Fault{};
  }
  write(w.slot[tl_parity][tl_tid % 32]);
  ++w.arrived;
  if (w.arrived == w.lanes) {
    L.blocked -= w.arrived - 1;
    w.arrived = 0;
    w.gate.open();
    lk.unlock();
  } else {
    block_until_open(L, w.gate, lk);
  }
  read(w.slot[tl_parity]);
  tl_parity ^= 1;
}

void syncwarp(unsigned mask) {
  char* hb = &current().warps[tl_tid / 32].syncwarp_hb[tl_parity];
  hb_release(hb);
  warp_barrier(mask, [](unsigned char*) {}, [](Slots) {});
  hb_acquire(hb);
}

void shuffle(unsigned mask, const void* value, void* out, size_t bytes, Shfl mode, int arg,
             int width) {
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
    fault("shuffle width not a power of 2 <= 32");
  const int lane = static_cast<int>(tl_tid % 32);
  const int seg = lane & ~(width - 1);  // first lane of the caller's width-segment
  int src = lane;
  switch (mode) {
    case Shfl::kIdx:
      src = seg + (arg & (width - 1));
      break;
    case Shfl::kUp:
      src = lane - arg >= seg ? lane - arg : lane;
      break;
    case Shfl::kDown:
      src = lane + arg < seg + width ? lane + arg : lane;
      break;
    case Shfl::kXor:
      src = (lane ^ arg) < seg + width && (lane ^ arg) >= seg ? lane ^ arg : lane;
      break;
  }
  warp_barrier(
      mask, [&](unsigned char* mine) { std::memcpy(mine, value, bytes); },
      [&](Slots slots) { std::memcpy(out, slots[src], bytes); });
}

unsigned ballot(unsigned mask, bool pred) {
  unsigned bits = 0;
  warp_barrier(
      mask, [&](unsigned char* mine) { mine[0] = pred; },
      [&](Slots slots) {
        for (int lane = 0; lane < 32; ++lane) bits |= unsigned{slots[lane][0] != 0} << lane;
      });
  return bits;
}

// ---- inline PTX (fmsim.h)

namespace {

// p .. p + bytes lies in the block's shared memory (dynamic, or a static __shared__ array) and is
// `align`-byte aligned; otherwise the calling thread faults with `what`.
void check_shared(const void* p, size_t bytes, size_t align, const char* what) {
  const auto at = reinterpret_cast<uintptr_t>(p);
  if (at % align != 0) fault((std::string(what) + ": address not " + std::to_string(align) +
                              "-byte aligned").c_str());
  const Launch& L = current();
  const auto dyn = reinterpret_cast<uintptr_t>(L.smem.get());
  if (at >= dyn && at + bytes <= dyn + L.cfg.smem) return;
  {
    const Hidden hidden;
    const std::lock_guard<std::mutex> lk(g_regions_mu);
    for (const auto& [q, n] : g_regions) {
      const auto base = reinterpret_cast<uintptr_t>(q);
      if (at >= base && at + bytes <= base + n) return;
    }
  }
  fault((std::string(what) + ": address outside shared memory").c_str());
}

float bits_to_float(uint16_t bits, MmaIn in) {
  if (in == MmaIn::kBF16) {
    const uint32_t w = uint32_t{bits} << 16;
    float f;
    std::memcpy(&f, &w, sizeof f);
    return f;
  }
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

}  // namespace

void cp_async(void* dst, const void* src, size_t bytes, size_t src_bytes) {
  check_shared(dst, bytes, bytes, "cp.async destination");
  if (src_bytes > bytes) fault("cp.async: src-size larger than cp-size");
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % bytes != 0) {
    fault("cp.async source: address not aligned to the copy size");
  }
  std::memset(dst, 0xff, bytes);  // in flight: undefined until waited for
  tl_copies.push_back({dst, src, bytes, src_bytes, tl_groups});
}

void cp_async_commit() { ++tl_groups; }

void fence_proxy_async() {
  Launch& L = *tl_launch;
  for (const auto& [at, bytes] : tl_unfenced) {
    for (uint32_t b = at; b < at + bytes; ++b) {
      uint16_t mine = unfenced_mark();  // a later copy by another thread keeps its own mark
      L.unfenced[b].compare_exchange_strong(mine, 0, std::memory_order_relaxed);
    }
  }
  tl_unfenced.clear();
  const Hidden hidden;
  const std::unique_lock<std::shared_mutex> lk(L.view_mu);
  L.view_stale = true;  // what was written so far reaches the async proxy's view at the next wgmma
}

void cp_async_wait(int n) {
  if (n < 0) fault("cp.async.wait_group with a negative count");
  complete_copies(tl_groups > static_cast<uint64_t>(n) ? tl_groups - n : 0);
}

void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  check_shared(row, 16, 16, "ldmatrix row address");
  const int lane = static_cast<int>(tl_tid % 32), g = lane / 4, t = lane % 4;
  const uint16_t* rows[32];
  warp_barrier(
      0xffffffffu, [&](unsigned char* mine) { std::memcpy(mine, &row, sizeof row); },
      [&](Slots slots) {
        for (int l = 0; l < 32; ++l) std::memcpy(&rows[l], slots[l], sizeof rows[l]);
      });
  // element (i, j) of matrix m: column j of the row lane 8m + i addressed (read after the
  // exchange, where TSan sees it)
  auto at = [&](int m, int i, int j) { return uint32_t{rows[8 * m + i][j]}; };
  for (int m = 0; m < 4; ++m) {
    r[m] = trans ? at(m, 2 * t, g) | at(m, 2 * t + 1, g) << 16
                 : at(m, g, 2 * t) | at(m, g, 2 * t + 1) << 16;
  }
}

void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, MmaIn in) {
  struct Frag {
    uint32_t a[4], b[2];
  };
  const Frag mine{{a[0], a[1], a[2], a[3]}, {b0, b1}};
  const int lane = static_cast<int>(tl_tid % 32), g = lane / 4, t = lane % 4;
  warp_barrier(
      0xffffffffu, [&](unsigned char* slot) { std::memcpy(slot, &mine, sizeof mine); },
      [&](Slots slots) {
        Frag f[32];
        for (int l = 0; l < 32; ++l) std::memcpy(&f[l], slots[l], sizeof(Frag));
        auto half = [&](uint32_t reg, int k) { return bits_to_float(reg >> (16 * (k % 2)), in); };
        // A (16x16, row-major): lane (row % 8) * 4 + (k % 8) / 2, register row / 8 + 2 (k / 8).
        auto A = [&](int row, int k) {
          return half(f[row % 8 * 4 + k % 8 / 2].a[row / 8 + 2 * (k / 8)], k);
        };
        // B (16x8, column-major): lane n * 4 + (k % 8) / 2, register k / 8.
        auto B = [&](int k, int n) { return half(f[n * 4 + k % 8 / 2].b[k / 8], k); };
        for (int e = 0; e < 4; ++e) {  // C[g + 8 (e / 2)][2t + e % 2]
          const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
          double sum = c[e];
          for (int k = 0; k < 16; ++k) sum += double{A(row, k)} * double{B(k, col)};
          c[e] = static_cast<float>(sum);
        }
      });
}

float ex2_approx_ftz(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.f;
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}

uint32_t smem_offset(const void* p) {
  const Launch& L = current();
  const auto at = reinterpret_cast<uintptr_t>(p), base = reinterpret_cast<uintptr_t>(L.smem.get());
  if (at < base || at - base >= L.cfg.smem) {
    fault("smem_addr: address outside dynamic shared memory (fmsim gives only the dynamic shared "
          "memory shared-window addresses)");
  }
  return static_cast<uint32_t>(at - base);
}

namespace {

constexpr uint32_t kPoison = 0xffffffffu;  // a NaN: what cp.async and the block start fill with

// A shared memory matrix descriptor's fields (fmsim.h), in bytes.
struct Desc {
  uint32_t start, lbo, sbo;
};

Desc decode(uint64_t desc) {
  constexpr uint64_t kField = 0x3fff;
  constexpr uint64_t kModelled = kField | kField << 16 | kField << 32 | uint64_t{3} << 62;
  if (desc >> 62 != 1) fault("wgmma descriptor: only the 128-byte swizzle is modelled");
  if ((desc & ~kModelled) != 0) {
    fault("wgmma descriptor: a bit set outside the start address, LBO, SBO and swizzle mode (the "
          "base offset is not modelled)");
  }
  return {static_cast<uint32_t>(desc & kField) << 4,
          static_cast<uint32_t>(desc >> 16 & kField) << 4,
          static_cast<uint32_t>(desc >> 32 & kField) << 4};
}

// The 16-bit element at byte offset `addr` of the dynamic shared memory, 128-byte swizzled: bits
// 4-6 of the address are XOR-ed with bits 7-9 (the allocation is 1024-aligned, so offsets and
// addresses agree on them), as the async proxy sees it (Launch::view; the caller holds view_mu).
float swizzled_element(const Launch& L, uint64_t addr, MmaIn in) {
  const uint64_t phys = addr ^ (addr >> 7 & 7) << 4;
  if (std::max(addr, phys) + 2 > L.cfg.smem) {
    fault("wgmma operand: address outside dynamic shared memory");
  }
  for (uint64_t b = phys; b < phys + 2; ++b) {
    if (const uint16_t writer = L.unfenced[b].load(std::memory_order_relaxed); writer != 0) {
      fault(("wgmma operand: shared memory that thread " + std::to_string(writer - 1) +
             "'s cp.async wrote, read with no fence.proxy.async by that thread after the copy "
             "landed (cp.async writes through the generic proxy, wgmma reads through the async "
             "one)").c_str());
    }
  }
  uint16_t bits, now;
  std::memcpy(&bits, L.view.get() + phys, sizeof bits);
  std::memcpy(&now, L.smem.get() + phys, sizeof now);
  if (bits != now) {
    fault("wgmma operand: shared memory written after the last fence.proxy.async before the "
          "wgmma's issue (an ordinary store, which the async proxy sees only after a fence by the "
          "storing thread), or while the wgmma was in flight");
  }
  return bits_to_float(bits, in);
}

// wgmma is warpgroup-wide: the 4 warps of the caller's must exist in full.
void check_warpgroup() {
  if ((tl_tid / 128 + 1) * 128 > current().nthreads) {
    fault("wgmma in a partial warpgroup (the block's threads are not a multiple of 128)");
  }
}

// Records an issued wgmma: the first pending one on its d captures the input accumulators and
// poisons d (in flight: a read before the wait sees NaN); a later one on the same d runs after it,
// on its result.
void issue(Wgmma&& op) {
  Launch& L = current();
  {
    // Hidden: view_mu orders nothing for TSan, and the bytes other threads may be writing now are
    // not this wgmma's operands.
    const Hidden hidden;
    const std::unique_lock<std::shared_mutex> lk(L.view_mu);
    if (L.view_stale) {
      std::memcpy(L.view.get(), L.smem.get(), L.cfg.smem);
      L.view_stale = false;
    }
  }
  if (!tl_wgmma_fenced) {
    fault("wgmma issued with no wgmma.fence since the thread's last wgmma.wait_group (or before "
          "its first wgmma): the wgmma may read its accumulators or A fragments before the "
          "thread's own writes to them land");
  }
  ++tl_wgmma_issued;
  op.group = tl_wgmma_groups;
  op.chained = false;
  for (const Wgmma& p : tl_wgmmas) op.chained |= p.d == op.d;
  if (!op.chained) {
    if (op.accumulate) op.c.assign(op.d, op.d + op.n / 2);
    std::memset(op.d, 0xff, op.n / 2 * sizeof(float));
  }
  tl_wgmmas.push_back(std::move(op));
}

// The byte address (before the swizzle) of element (i, k) of an operand, i its M (A) or N (B)
// index: K-major (stored as rows of 16 k): start + (i % 8) 128 + (i / 8) SBO + 2k; MN-major
// (stored as 16 rows of k): start + 2 (i % 64) + (i / 64) LBO + (k % 8) 128 + (k / 8) SBO.
// These are CuTe's canonical 128-byte-swizzle GMMA layouts (cute/atom/mma_traits_sm90_gmma.hpp,
// make_gmma_desc), in 16-byte units with T = 8 16-bit elements: K-major ((8,m),(T,2k)) :
// ((8T,SBO),(1,T)); MN-major ((T,8,m),(8,k)) : ((1,T,LBO),(8T,SBO)): for swizzled MN-major
// operands LBO steps between 64-element MN atoms and SBO between 8-row K groups (the reverse of
// the unswizzled "interleave" layout's roles), as modelled here.
uint64_t at(const Desc& desc, bool mn_major, int i, int k) {
  const uint64_t start = desc.start, lbo = desc.lbo, sbo = desc.sbo;
  return mn_major ? start + 2 * (i % 64) + lbo * (i / 64) + k % 8 * 128 + sbo * (k / 8)
                  : start + i % 8 * 128 + sbo * (i / 8) + 2 * k;
}

// A shared lock whose taking and releasing TSan does not see (view_mu is fmsim's own lock: it
// must not order this thread after every fence), while what the holder reads stays visible.
class HiddenSharedLock {
 public:
  explicit HiddenSharedLock(std::shared_mutex& mu) : mu_(mu) {
    const Hidden hidden;
    mu_.lock_shared();
  }
  ~HiddenSharedLock() {
    const Hidden hidden;
    mu_.unlock_shared();
  }
  HiddenSharedLock(const HiddenSharedLock&) = delete;
  HiddenSharedLock& operator=(const HiddenSharedLock&) = delete;

 private:
  std::shared_mutex& mu_;
};

// Runs an issued wgmma for the calling lane's accumulators, reading shared memory as the async
// proxy sees it now (swizzled_element). g = lane / 4, t = lane % 4: d[i][2h + e] is
// D[16 (warp % 4) + g + 8h][8i + 2t + e].
void execute(Launch& L, Wgmma& op) {
  const HiddenSharedLock view_lock(L.view_mu);  // the operand reads stay visible (a racecheck)
  const int lane = static_cast<int>(tl_tid % 32), g = lane / 4, t = lane % 4;
  const int row = 16 * static_cast<int>(tl_tid / 32 % 4) + g;  // + 8h
  const int count = op.n / 2;
  if (!op.chained) {
    for (int i = 0; i < count; ++i) {
      uint32_t w;
      std::memcpy(&w, op.d + i, sizeof w);
      if (w != kPoison) {
        fault("wgmma accumulator written while the wgmma was in flight (before the wgmma_wait "
              "that covers it)");
      }
    }
  }
  float a[2][16];
  if (op.reg_a) {
    if (std::memcmp(op.a_regs, op.a_bits, sizeof op.a_bits) != 0) {
      fault("wgmma A fragment registers written while the wgmma was in flight (before the "
            "wgmma_wait that covers it)");
    }
    std::memcpy(a, op.a, sizeof a);
  } else {
    const Desc da = decode(op.desc_a);
    for (int h = 0; h < 2; ++h) {
      for (int k = 0; k < 16; ++k) {
        a[h][k] = swizzled_element(L, at(da, op.a_mn, row + 8 * h, k), op.in);
      }
    }
  }
  const Desc db = decode(op.desc_b);
  for (int i = 0; i < op.n / 8; ++i) {
    for (int e = 0; e < 2; ++e) {
      const int col = 8 * i + 2 * t + e;
      float b[16];
      for (int k = 0; k < 16; ++k) b[k] = swizzled_element(L, at(db, op.b_mn, col, k), op.in);
      for (int h = 0; h < 2; ++h) {
        float& out = op.d[4 * i + 2 * h + e];
        double sum = !op.accumulate ? 0.0 : op.chained ? out : op.c[4 * i + 2 * h + e];
        for (int k = 0; k < 16; ++k) sum += double{a[h][k]} * double{b[k]};
        out = static_cast<float>(sum);
      }
    }
  }
}

}  // namespace

void wgmma_ss(float* d, int n, uint64_t desc_a, uint64_t desc_b, bool accumulate, bool a_mn,
              bool b_mn, MmaIn in) {
  check_warpgroup();
  decode(desc_a);  // a layout fmsim does not model faults at issue
  decode(desc_b);
  issue({.d = d, .n = n, .in = in, .reg_a = false, .a_mn = a_mn, .b_mn = b_mn, .desc_a = desc_a,
         .desc_b = desc_b, .accumulate = accumulate});
}

void wgmma_rs(float* d, int n, const uint32_t (&a)[4], uint64_t desc_b, MmaIn in) {
  check_warpgroup();
  decode(desc_b);
  Wgmma op{.d = d, .n = n, .in = in, .reg_a = true, .b_mn = true, .desc_b = desc_b,
           .accumulate = true};
  // A's rows g and g + 8 from the warp's fragments, in mma.sync's a layout: element (row, k) in
  // lane (row % 8) * 4 + (k % 8) / 2, register row / 8 + 2 (k / 8), half k % 2.
  uint32_t mine[4];
  std::memcpy(mine, a, sizeof mine);
  op.a_regs = a;
  std::memcpy(op.a_bits, a, sizeof op.a_bits);
  const int g = static_cast<int>(tl_tid % 32) / 4;
  warp_barrier(
      0xffffffffu, [&](unsigned char* slot) { std::memcpy(slot, mine, sizeof mine); },
      [&](Slots slots) {
        for (int h = 0; h < 2; ++h) {
          for (int k = 0; k < 16; ++k) {
            uint32_t reg;
            std::memcpy(&reg, slots[g * 4 + k % 8 / 2] + 4 * (h + 2 * (k / 8)), sizeof reg);
            op.a[h][k] = bits_to_float(static_cast<uint16_t>(reg >> (16 * (k % 2))), in);
          }
        }
      });
  issue(std::move(op));
}

void wgmma_commit() { ++tl_wgmma_groups; }

void wgmma_fence() { tl_wgmma_fenced = true; }

void wgmma_wait(int n) {
  if (n < 0) fault("wgmma.wait_group with a negative count");
  tl_wgmma_fenced = false;  // the thread may now touch the registers: a later wgmma needs a fence
  const uint64_t below = tl_wgmma_groups > static_cast<uint64_t>(n) ? tl_wgmma_groups - n : 0;
  // groups grow in issue order: the ops to run are a prefix
  size_t done = 0;
  Launch& L = current();
  while (done < tl_wgmmas.size() && tl_wgmmas[done].group < below) execute(L, tl_wgmmas[done++]);
  tl_wgmmas.erase(tl_wgmmas.begin(), tl_wgmmas.begin() + static_cast<ptrdiff_t>(done));
  // A pending op chained to one that just ran takes that result as its input as if issued now
  // (capture and poison): d reads NaN until the op's own wait.
  for (size_t i = 0; i < tl_wgmmas.size(); ++i) {
    Wgmma& op = tl_wgmmas[i];
    bool after_pending = false;
    for (size_t j = 0; j < i; ++j) after_pending |= tl_wgmmas[j].d == op.d;
    if (!op.chained || after_pending) continue;
    op.chained = false;
    if (op.accumulate) op.c.assign(op.d, op.d + op.n / 2);
    std::memset(op.d, 0xff, op.n / 2 * sizeof(float));
  }
}


}  // namespace fmsim

// ---- the CUDA runtime API, as far as fmcore's launchers and bindings use it

namespace {

constexpr int kDevice = 0;

// CPU tensors stand for the device: their get_device() is -1.
bool valid_device(int d) { return d == kDevice || d == -1; }

}  // namespace

extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = fmsim::tl_last_error;
  fmsim::tl_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return fmsim::tl_last_error; }

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
    case cudaErrorLaunchOutOfResources:
      return "too many resources requested for launch";
    default:
      return "unknown error (fmsim)";
  }
}

const char* cudaGetErrorName(cudaError_t error) { return cudaGetErrorString(error); }

cudaError_t cudaGetDevice(int* device) {
  *device = kDevice;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  return device == kDevice ? cudaSuccess : cudaErrorInvalidDevice;
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (!valid_device(device)) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = fmsim::kSimSmCount;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = static_cast<int>(fmsim::kOptinSmem);
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = static_cast<int>(fmsim::kDefaultSmem);
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor:
      *value = static_cast<int>(fmsim::kSmemPerSm);
      return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock:
      *value = 1024;
      return cudaSuccess;
    case cudaDevAttrMaxThreadsPerMultiProcessor:
      *value = fmsim::kThreadsPerSm;
      return cudaSuccess;
    case cudaDevAttrWarpSize:
      *value = 32;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor:
      *value = 9;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor:
      *value = 0;
      return cudaSuccess;
    default:
      return cudaErrorInvalidValue;  // not simulated: fail loudly rather than guess
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || static_cast<size_t>(value) > fmsim::kOptinSmem) return cudaErrorInvalidValue;
  const std::lock_guard<std::mutex> lk(fmsim::g_attr_mu);
  fmsim::max_dynamic_smem()[func] = static_cast<size_t>(value);
  return cudaSuccess;
}

// Threads and shared memory only (no registers): blocks of `block_size` threads with `smem`
// dynamic bytes (+1 KiB the hardware reserves per block) that fit one SM; 0 when the launch
// itself would fail (dynamic smem past the kernel's limit).
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* blocks, const void* func,
                                                                   int block_size, size_t smem,
                                                                   unsigned int) {
  if (block_size <= 0 || block_size > 1024) return cudaErrorInvalidValue;
  size_t limit = fmsim::kDefaultSmem;
  {
    const std::lock_guard<std::mutex> lk(fmsim::g_attr_mu);
    const auto it = fmsim::max_dynamic_smem().find(func);
    if (it != fmsim::max_dynamic_smem().end()) limit = std::max(limit, it->second);
  }
  if (smem > limit) {
    *blocks = 0;
    return cudaSuccess;
  }
  int n = std::min(32, fmsim::kThreadsPerSm / block_size);
  n = std::min<int>(n, static_cast<int>(fmsim::kSmemPerSm / (smem + 1024)));
  *blocks = n;
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* func,
                                                          int block_size, size_t smem) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(blocks, func, block_size, smem, 0);
}

cudaError_t cudaStreamIsCapturing(cudaStream_t, enum cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

// Events: every launch has completed when it returns, so an event is reached when recorded.
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) {
  *event = reinterpret_cast<cudaEvent_t>(new char);
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t) {
  return event == nullptr ? cudaErrorInvalidResourceHandle : cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  return event == nullptr ? cudaErrorInvalidResourceHandle : cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t event) {
  if (event == nullptr) return cudaErrorInvalidResourceHandle;
  delete reinterpret_cast<char*>(event);
  return cudaSuccess;
}

}  // extern "C"
