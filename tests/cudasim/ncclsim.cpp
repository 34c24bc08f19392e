// ncclsim: NCCL and the CUDA stream/event API, modelled on the CPU, so that fmcore's communicator
// (csrc/dist/communicator.cpp, built unchanged beside this file by build.py's build_nccl) runs in CI:
// its collectives, groups, non-blocking init, watchdog, timeouts and aborts.
//
// The model, as the communicator sees NCCL in non-blocking mode (ncclConfig_t.blocking = 0):
// - Ranks are threads of one process; a clique is the set of communicators made from one unique id.
// - ncclCommInitRankConfig returns ncclInProgress until every rank has joined; ncclCommGetAsyncError
//   reports ncclInProgress until then. A communicator's first collective does the same until every
//   rank has issued its first one (NCCL connects peers lazily, so a missing peer shows up there too).
//   ncclCommFinalize returns ncclInProgress too, and completes at the next poll.
// - Every thread has its own stream (c10::cuda::getCurrentCUDAStream in nccl_shim/), a FIFO served by
//   a worker thread: the "GPU". When the thread exits, the worker finishes the queue and ends.
// - A collective waits on its stream for its peers, as NCCL's kernels do, until every rank's call
//   with the same sequence number has arrived or its own communicator is aborted.
//   Calls that do not match (another collective, count or dtype) fail every rank with an asynchronous
//   ncclInternalError saying so (real NCCL would hang or corrupt memory).
// - cudaEventRecord enqueues a marker; cudaEventQuery reports whether the stream has passed it.
// - Faults are injected from Python (the module's sim_* functions): an NCCL call failing, an
//   asynchronous error, a CUDA error from cudaEventQuery. A missing or stuck peer needs no injection:
//   the test's rank simply does not call.
// - As NCCL: a collective that fails keeps its result as the communicator's state (non-blocking
//   mode); ncclGetLastError is one process-wide message, never cleared; group depth is per thread,
//   and ncclCommAbort inside an open group waits for the thread's outermost ncclGroupEnd.
// One mutex guards the whole model; the workers wait on one condition variable.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime_api.h>
#include <nccl.h>
#include <torch/csrc/utils/pybind.h>

#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "dist/communicator.h"

namespace {

enum class Kind { kAllReduce, kReduceScatter, kAllGather, kBroadcast };

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kAllReduce: return "ncclAllReduce";
    case Kind::kReduceScatter: return "ncclReduceScatter";
    case Kind::kAllGather: return "ncclAllGather";
    case Kind::kBroadcast: return "ncclBroadcast";
  }
  return "?";
}

struct Collective {
  Kind kind;
  const void* send;
  void* recv;
  size_t count;  // per rank: the output of reduce-scatter, the input of all-gather
  ncclDataType_t dtype;
  ncclRedOp_t op;
  int root;
};

struct Slot {  // one collective (one sequence number) of a clique, as its ranks reach it
  std::vector<std::optional<Collective>> calls;
  int arrived = 0, left = 0;
  bool computed = false, failed = false;
  std::vector<std::vector<char>> results;  // per rank, computed by the last to arrive
};

struct Clique {
  explicit Clique(int w) : world(w), members(w, nullptr) {}
  int world;
  std::vector<ncclComm*> members;
  int joined = 0, connected = 0;
  std::map<uint64_t, Slot> slots;
};

}  // namespace

struct ncclComm {
  ncclComm(Clique* q, int r) : clique(q), rank(r) {}
  Clique* clique;
  int rank;
  ncclResult_t state = ncclInProgress;  // what ncclCommGetAsyncError reports
  bool connected = false, aborted = false, finalized = false, destroyed = false;
  uint64_t next_seq = 0;
};

struct CUstream_st {
  std::deque<std::function<void(std::unique_lock<std::mutex>&)>> work;
  bool owner_exited = false;  // its worker drains the queue, frees the stream and ends
};

struct CUevent_st {
  uint64_t recorded = 0, reached = 0;
  bool destroyed = false;
};

namespace {

// The model's state, never destroyed: stream workers may still wait on it while the process exits.
struct Model {
  std::mutex mu;
  std::condition_variable cv;
  std::map<std::string, Clique*> cliques;
  // Injected faults, each consumed by the first call it matches.
  std::map<std::string, std::pair<ncclResult_t, std::string>> fail_next;  // NCCL function -> result
  cudaError_t fail_next_event_query = cudaSuccess;
  char last_error[1024] = "";  // ncclGetLastError's, for the whole process as NCCL's
};

Model& model() {
  static Model* m = new Model;
  return *m;
}

void set_last_error(const std::string& message) {
  std::snprintf(model().last_error, sizeof(model().last_error), "%s", message.c_str());
}

thread_local std::vector<std::pair<ncclComm*, Collective>> tl_group;  // calls inside ncclGroupStart
thread_local std::vector<cudaStream_t> tl_group_streams;
thread_local int tl_group_depth = 0;
thread_local std::vector<ncclComm*> tl_deferred_aborts;  // ncclCommAbort calls inside the open group
thread_local cudaError_t tl_last_cuda_error = cudaSuccess;

size_t dtype_size(ncclDataType_t t) {
  switch (t) {
    case ncclInt8: case ncclUint8: return 1;
    case ncclFloat16: case ncclBfloat16: return 2;
    case ncclInt32: case ncclUint32: case ncclFloat32: return 4;
    case ncclInt64: case ncclUint64: case ncclFloat64: return 8;
    default: return 0;
  }
}

template <typename T, typename Acc>
void reduce_typed(const std::vector<const char*>& inputs, char* out, size_t count, ncclRedOp_t op) {
  for (size_t i = 0; i < count; ++i) {
    Acc acc = static_cast<Acc>(reinterpret_cast<const T*>(inputs[0])[i]);
    for (size_t r = 1; r < inputs.size(); ++r) {
      const Acc x = static_cast<Acc>(reinterpret_cast<const T*>(inputs[r])[i]);
      acc = op == ncclMax    ? std::max(acc, x)
            : op == ncclMin  ? std::min(acc, x)
            : op == ncclProd ? acc * x
                             : acc + x;
    }
    if (op == ncclAvg) acc /= static_cast<Acc>(inputs.size());
    reinterpret_cast<T*>(out)[i] = static_cast<T>(acc);
  }
}

void reduce(const std::vector<const char*>& inputs, char* out, size_t count, ncclDataType_t t,
            ncclRedOp_t op) {
  switch (t) {
    case ncclInt8: return reduce_typed<int8_t, int64_t>(inputs, out, count, op);
    case ncclUint8: return reduce_typed<uint8_t, int64_t>(inputs, out, count, op);
    case ncclInt32: return reduce_typed<int32_t, int64_t>(inputs, out, count, op);
    case ncclUint32: return reduce_typed<uint32_t, int64_t>(inputs, out, count, op);
    case ncclInt64: return reduce_typed<int64_t, int64_t>(inputs, out, count, op);
    case ncclUint64: return reduce_typed<uint64_t, uint64_t>(inputs, out, count, op);
    case ncclFloat16: return reduce_typed<c10::Half, float>(inputs, out, count, op);
    case ncclBfloat16: return reduce_typed<c10::BFloat16, float>(inputs, out, count, op);
    case ncclFloat32: return reduce_typed<float, double>(inputs, out, count, op);
    case ncclFloat64: return reduce_typed<double, double>(inputs, out, count, op);
    default: return;
  }
}

// Every rank's output of one collective, from every rank's input (all have arrived).
void compute(Slot& slot, int world) {
  const Collective& c0 = *slot.calls[0];
  const size_t bytes = c0.count * dtype_size(c0.dtype);
  slot.results.assign(world, {});
  for (int r = 0; r < world; ++r) {
    std::vector<char>& out = slot.results[r];
    std::vector<const char*> inputs;
    switch (c0.kind) {
      case Kind::kAllReduce:
      case Kind::kReduceScatter:
        out.resize(bytes);
        for (int q = 0; q < world; ++q)
          inputs.push_back(static_cast<const char*>(slot.calls[q]->send) +
                           (c0.kind == Kind::kReduceScatter ? r * bytes : 0));
        reduce(inputs, out.data(), c0.count, c0.dtype, c0.op);
        break;
      case Kind::kAllGather:
        out.resize(bytes * world);
        for (int q = 0; q < world; ++q) std::memcpy(out.data() + q * bytes, slot.calls[q]->send, bytes);
        break;
      case Kind::kBroadcast:
        out.resize(bytes);
        std::memcpy(out.data(), slot.calls[c0.root]->send, bytes);
        break;
    }
  }
}

std::string describe(const Collective& c) {
  return std::string(kind_name(c.kind)) + "(count " + std::to_string(c.count) + ", dtype " +
         std::to_string(c.dtype) + ", op " + std::to_string(c.op) + ", root " +
         std::to_string(c.root) + ")";
}

// The "kernel" of one rank's collective, run by its stream's worker with the model's lock held.
void run_collective(std::unique_lock<std::mutex>& lock, ncclComm* comm, uint64_t seq,
                    const Collective& c) {
  Model& m = model();
  Clique& q = *comm->clique;
  Slot& slot = q.slots[seq];
  if (slot.calls.empty()) slot.calls.resize(q.world);
  slot.calls[comm->rank] = c;
  ++slot.arrived;
  for (int r = 0; r < q.world && !slot.failed; ++r) {
    const std::optional<Collective>& other = slot.calls[r];
    if (!other || (other->kind == c.kind && other->count == c.count && other->dtype == c.dtype &&
                   other->op == c.op && other->root == c.root))
      continue;
    slot.failed = true;
    const std::string why = "collective #" + std::to_string(seq) + " does not match: rank " +
                            std::to_string(r) + " called " + describe(*other) + ", rank " +
                            std::to_string(comm->rank) + " " + describe(c);
    for (ncclComm* member : q.members)
      if (member != nullptr) member->state = ncclInternalError;
    set_last_error(why);
  }
  if (slot.arrived == q.world && !slot.failed) {
    compute(slot, q.world);
    slot.computed = true;
  }
  m.cv.notify_all();
  m.cv.wait(lock, [&] { return slot.computed || slot.failed || comm->aborted; });
  if (slot.computed && !comm->aborted)
    std::memcpy(c.recv, slot.results[comm->rank].data(), slot.results[comm->rank].size());
  if (++slot.left == q.world) q.slots.erase(seq);
}

void stream_worker(cudaStream_t s) {
  Model& m = model();
  std::unique_lock<std::mutex> lock(m.mu);
  for (;;) {
    m.cv.wait(lock, [&] { return !s->work.empty() || s->owner_exited; });
    if (s->work.empty()) break;
    s->work.front()(lock);
    s->work.pop_front();
    m.cv.notify_all();
  }
  delete s;
}

// A thread's stream, handed back to its worker when the thread exits.
struct ThreadStream {
  cudaStream_t stream = new CUstream_st;
  ThreadStream() { std::thread(stream_worker, stream).detach(); }
  ~ThreadStream() {
    std::lock_guard<std::mutex> lock(model().mu);
    stream->owner_exited = true;
    model().cv.notify_all();
  }
};

// An injected failure for the NCCL function `fn`, consumed; ncclSuccess when there is none.
ncclResult_t injected(const char* fn) {
  Model& m = model();
  const auto it = m.fail_next.find(fn);
  if (it == m.fail_next.end()) return ncclSuccess;
  const auto [result, message] = it->second;
  m.fail_next.erase(it);
  set_last_error(message);
  return result;
}

bool usable(const ncclComm* comm) { return comm != nullptr && !comm->destroyed && !comm->aborted; }

void abort_comm(ncclComm* comm) {
  comm->aborted = comm->destroyed = true;  // its waiting "kernels" return; the handle is gone
  model().cv.notify_all();
}

// Every rank has made the call (init, or its first collective) its communicator was waiting on.
void complete_in_progress(Clique& q) {
  for (ncclComm* member : q.members)
    if (member->state == ncclInProgress) member->state = ncclSuccess;
}

// The communicator of (unique id, rank), or null. Caller holds the model's lock.
ncclComm* find_comm(const std::string& id, int rank) {
  const auto it = model().cliques.find(id);
  if (it == model().cliques.end() || rank < 0 || rank >= it->second->world) return nullptr;
  return it->second->members[rank];
}

// Queues one collective on its stream; the communicator's first one connects it to its peers.
ncclResult_t enqueue(ncclComm* comm, const Collective& c, cudaStream_t stream) {
  Model& m = model();
  const uint64_t seq = comm->next_seq++;
  stream->work.emplace_back(
      [comm, seq, c](std::unique_lock<std::mutex>& lock) { run_collective(lock, comm, seq, c); });
  m.cv.notify_all();
  if (comm->connected) return ncclSuccess;
  comm->connected = true;
  Clique& q = *comm->clique;
  if (++q.connected < q.world) {
    comm->state = ncclInProgress;
    return ncclInProgress;
  }
  complete_in_progress(q);
  return ncclSuccess;
}

ncclResult_t collective(const char* fn, const Collective& c, ncclComm_t comm, cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(model().mu);
  if (!usable(comm) || stream == nullptr) return ncclInvalidArgument;
  if (comm->state != ncclSuccess) return comm->state == ncclInProgress ? ncclInvalidUsage : comm->state;
  // A failed call's result becomes the communicator's state, which every later call returns.
  if (const ncclResult_t r = injected(fn); r != ncclSuccess) return comm->state = r;
  const bool reduction = c.kind == Kind::kAllReduce || c.kind == Kind::kReduceScatter;
  if (dtype_size(c.dtype) == 0 || (reduction && (c.op < ncclSum || c.op > ncclAvg)) ||
      (c.count > 0 && (c.send == nullptr || c.recv == nullptr)) ||
      (c.kind == Kind::kBroadcast && (c.root < 0 || c.root >= comm->clique->world))) {
    set_last_error(std::string(fn) + ": invalid argument");
    return comm->state = ncclInvalidArgument;
  }
  if (tl_group_depth > 0) {
    tl_group.emplace_back(comm, c);
    tl_group_streams.push_back(stream);
    return ncclSuccess;
  }
  return enqueue(comm, c, stream);
}

}  // namespace

// The stream of the calling thread (nccl_shim/c10/cuda/CUDAStream.h), with its worker.
cudaStream_t ncclsim_current_stream() {
  thread_local ThreadStream mine;
  return mine.stream;
}

extern "C" {

// ---- NCCL

ncclResult_t ncclGetVersion(int* version) {
  *version = NCCL_VERSION_CODE;
  return ncclSuccess;
}

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  static std::mt19937_64 rng{std::random_device{}()};
  std::lock_guard<std::mutex> lock(model().mu);
  for (char& b : id->internal) b = static_cast<char>(rng());
  return ncclSuccess;
}

// ncclConfig_t's magic, as NCCL_CONFIG_INITIALIZER sets it (NCCL 2.28's headers write it as a number).
#ifdef NCCL_API_MAGIC
constexpr unsigned int kConfigMagic = NCCL_API_MAGIC;
#else
constexpr unsigned int kConfigMagic = 0xcafebeef;
#endif

const char* ncclGetErrorString(ncclResult_t r) {
  switch (r) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
    case ncclSystemError: return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
    case ncclInternalError: return "internal error - please report this issue to the NCCL developers";
    case ncclInvalidArgument: return "invalid argument (run with NCCL_DEBUG=WARN for details)";
    case ncclInvalidUsage: return "invalid usage (run with NCCL_DEBUG=WARN for details)";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
#ifdef NCCL_API_MAGIC  // (NCCL 2.30's headers; 2.28's, torch 2.11's, have neither ncclTimeout nor the macro)
    case ncclTimeout: return "NCCL operation timed out";
#endif
    default: return "unknown result code";
  }
}

const char* ncclGetLastError(ncclComm_t) {
  // The process-wide message whatever the communicator, as NCCL's; copied under the model's lock
  // (NCCL's own buffer is read unguarded) into one per thread, valid until its next call.
  thread_local char copy[sizeof(Model::last_error)];
  std::lock_guard<std::mutex> lock(model().mu);
  std::memcpy(copy, model().last_error, sizeof(copy));
  return copy;
}

ncclResult_t ncclCommInitRankConfig(ncclComm_t* out, int world, ncclUniqueId id, int rank,
                                    ncclConfig_t* config) {
  Model& m = model();
  std::unique_lock<std::mutex> lock(m.mu);
  if (out == nullptr || world < 1 || rank < 0 || rank >= world || config == nullptr ||
      config->magic != kConfigMagic)
    return ncclInvalidArgument;
  if (const ncclResult_t r = injected("ncclCommInitRankConfig"); r != ncclSuccess) return r;
  Clique*& q = m.cliques[std::string(id.internal, sizeof(id.internal))];
  if (q == nullptr) q = new Clique(world);
  if (q->world != world || q->members[rank] != nullptr) return ncclInvalidUsage;
  auto* comm = new ncclComm(q, rank);  // never freed: stream work may still refer to it
  q->members[rank] = comm;
  *out = comm;
  if (++q->joined == world) complete_in_progress(*q);
  if (config->blocking == 0) return comm->state;
  m.cv.wait(lock, [&] { return comm->state != ncclInProgress; });  // blocking mode: NCCL's default
  return comm->state;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* state) {
  std::lock_guard<std::mutex> lock(model().mu);
  if (comm == nullptr || comm->destroyed || state == nullptr) return ncclInvalidArgument;
  *state = comm->state;
  if (comm->finalized && comm->state == ncclInProgress) comm->state = ncclSuccess;
  return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t comm) {
  Model& m = model();
  std::lock_guard<std::mutex> lock(m.mu);
  if (comm == nullptr) return ncclSuccess;
  if (comm->destroyed) return ncclInvalidArgument;
  if (tl_group_depth > 0) {
    tl_deferred_aborts.push_back(comm);  // NCCL wraps the abort in a group of its own: queued
    return ncclSuccess;
  }
  abort_comm(comm);
  return ncclSuccess;
}

ncclResult_t ncclCommFinalize(ncclComm_t comm) {
  std::lock_guard<std::mutex> lock(model().mu);
  if (!usable(comm) || comm->finalized) return ncclInvalidArgument;
  if (const ncclResult_t r = injected("ncclCommFinalize"); r != ncclSuccess) return comm->state = r;
  comm->finalized = true;  // flushing NCCL's own queues goes on in the background: one poll
  comm->state = ncclInProgress;
  return ncclInProgress;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  std::lock_guard<std::mutex> lock(model().mu);
  if (!usable(comm)) return ncclInvalidArgument;
  comm->destroyed = true;
  return ncclSuccess;
}

ncclResult_t ncclGroupStart() {
  std::lock_guard<std::mutex> lock(model().mu);
  ++tl_group_depth;
  return ncclSuccess;
}

ncclResult_t ncclGroupEnd() {
  std::lock_guard<std::mutex> lock(model().mu);
  if (tl_group_depth == 0) return ncclInvalidUsage;
  if (--tl_group_depth > 0) return ncclSuccess;
  const auto group = std::exchange(tl_group, {});
  const auto streams = std::exchange(tl_group_streams, {});
  ncclResult_t result = ncclSuccess;
  for (const auto& [comm, c] : group)
    if (!usable(comm)) result = ncclInvalidArgument;  // (real NCCL: a use after free)
  for (size_t i = 0; result != ncclInvalidArgument && i < group.size(); ++i)
    if (enqueue(group[i].first, group[i].second, streams[i]) == ncclInProgress) result = ncclInProgress;
  for (ncclComm* comm : std::exchange(tl_deferred_aborts, {}))
    if (!comm->destroyed) abort_comm(comm);
  return result;
}

ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, ncclDataType_t dtype, ncclRedOp_t op,
                           ncclComm_t comm, cudaStream_t stream) {
  return collective("ncclAllReduce", {Kind::kAllReduce, send, recv, count, dtype, op, 0}, comm, stream);
}

ncclResult_t ncclReduceScatter(const void* send, void* recv, size_t count, ncclDataType_t dtype,
                               ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
  return collective("ncclReduceScatter", {Kind::kReduceScatter, send, recv, count, dtype, op, 0},
                    comm, stream);
}

ncclResult_t ncclAllGather(const void* send, void* recv, size_t count, ncclDataType_t dtype, ncclComm_t comm,
                           cudaStream_t stream) {
  return collective("ncclAllGather", {Kind::kAllGather, send, recv, count, dtype, ncclSum, 0}, comm,
                    stream);
}

ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, ncclDataType_t dtype, int root,
                           ncclComm_t comm, cudaStream_t stream) {
  return collective("ncclBroadcast", {Kind::kBroadcast, send, recv, count, dtype, ncclSum, root},
                    comm, stream);
}

// ---- CUDA: devices, errors, events

cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = tl_last_cuda_error;
  tl_last_cuda_error = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    default: return "unknown error (ncclsim)";
  }
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) {
  std::lock_guard<std::mutex> lock(model().mu);
  *event = new CUevent_st;
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  Model& m = model();
  std::lock_guard<std::mutex> lock(m.mu);
  if (event == nullptr || event->destroyed || stream == nullptr) return cudaErrorInvalidResourceHandle;
  const uint64_t mark = ++event->recorded;
  stream->work.emplace_back([event, mark](std::unique_lock<std::mutex>&) {
    event->reached = std::max(event->reached, mark);
  });
  m.cv.notify_all();
  return cudaSuccess;
}

cudaError_t cudaEventQuery(cudaEvent_t event) {
  Model& m = model();
  std::lock_guard<std::mutex> lock(m.mu);
  if (event == nullptr || event->destroyed) return cudaErrorInvalidResourceHandle;
  if (m.fail_next_event_query != cudaSuccess) {
    tl_last_cuda_error = std::exchange(m.fail_next_event_query, cudaSuccess);
    return tl_last_cuda_error;
  }
  return event->reached >= event->recorded ? cudaSuccess : cudaErrorNotReady;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status) {
  if (stream == nullptr || status == nullptr) return cudaErrorInvalidResourceHandle;
  *status = cudaStreamCaptureStatusNone;  // the model has no graphs
  return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  std::lock_guard<std::mutex> lock(model().mu);
  if (event == nullptr || event->destroyed) return cudaErrorInvalidResourceHandle;
  event->destroyed = true;  // not freed: a record of it may still be queued, as CUDA allows
  return cudaSuccess;
}

}  // extern "C"

// ---- the Python module: fmcore's communicator (fmcore._C's names) and the model's controls

namespace py = pybind11;

PYBIND11_MODULE(fmcore_ncclsim, m) {
  fmcore::dist::register_dist(m);
  m.def("sim_fail_next", [](const std::string& fn, int result, const std::string& message) {
    std::lock_guard<std::mutex> lock(model().mu);
    model().fail_next[fn] = {static_cast<ncclResult_t>(result), message};
  }, "The next call of NCCL function `fn` returns `result`; ncclGetLastError then says `message`.");
  m.def("sim_async_error", [](const py::bytes& id, int rank, int result, const std::string& message) {
    std::lock_guard<std::mutex> lock(model().mu);
    ncclComm* comm = find_comm(id, rank);
    if (comm == nullptr) throw std::invalid_argument("no communicator of that unique id and rank");
    comm->state = static_cast<ncclResult_t>(result);
    set_last_error(message);
  }, "The communicator of (unique id, rank) gets asynchronous error `result` (as a failed peer causes).");
  m.def("sim_fail_next_event_query", [](int error) {
    std::lock_guard<std::mutex> lock(model().mu);
    model().fail_next_event_query = static_cast<cudaError_t>(error);
  }, "The next cudaEventQuery returns CUDA error `error` (as after a faulting kernel).");
  m.def("sim_comm_state", [](const py::bytes& id, int rank) {
    std::lock_guard<std::mutex> lock(model().mu);
    const ncclComm* c = find_comm(id, rank);
    if (c == nullptr) return std::string("absent");
    if (c->aborted) return std::string("aborted");
    if (c->destroyed) return std::string(c->finalized ? "closed" : "destroyed");
    return std::string("live");
  }, "What became of NCCL's communicator of (unique id, rank): absent, live, aborted, closed, destroyed.");
}
