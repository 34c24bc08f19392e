// fmcore's NCCL communicator: collectives on torch tensors, enqueued on the caller's current CUDA
// stream, with every NCCL failure, asynchronous error and timeout surfaced as fmcore._C.NcclError.
//
// Python (fmcore/dist/comm.py) creates it collectively: rank 0 calls nccl_unique_id(), the id travels
// through the torch.distributed group's store, and every rank constructs NcclCommunicator(id, world,
// rank, device, timeout_s).
//
// Why the communicator is non-blocking (ncclConfig_t.blocking = 0): a blocking NCCL call that waits on
// a dead peer (init, the first connection of a collective) never returns, so nothing could abort it.
// Non-blocking calls return ncclInProgress and we poll ncclCommGetAsyncError against a deadline,
// calling ncclCommAbort when it passes. Work already enqueued on a stream is watched the same way: each
// call records a CUDA event, and a watchdog thread aborts the communicator when an event stays pending
// longer than the timeout or NCCL reports an asynchronous error (aborting makes NCCL's kernels return,
// so the stream drains instead of hanging). The next call on an aborted communicator raises.
//
// Thread safety: one mutex guards the NCCL handle and the event queue; every method takes it, and the
// GIL is released around each method (see register_dist), so the watchdog never waits on Python.
// Groups: NCCL's group depth belongs to the calling thread, and ncclCommAbort inside an open group is
// itself only queued until the group's end. So group_end always ends NCCL's group (an error first
// would leave this thread's depth at 1: every later NCCL call on it, torch's too, only recorded), and
// an abort while a group is open (a failed call in it, the watchdog) waits for group_end.
// Every method runs with the communicator's device current (events are created and recorded there).
#include "communicator.h"

#ifdef FMCORE_WITH_NCCL
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <nccl.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>
#endif

namespace py = pybind11;

namespace fmcore::dist {

#ifdef FMCORE_WITH_NCCL
namespace {

using Clock = std::chrono::steady_clock;

// Every NCCL failure, timeout and use of an aborted communicator; Python sees a RuntimeError subclass.
struct NcclError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

ncclDataType_t nccl_dtype(const at::Tensor& t, const char* name, bool reduction) {
  switch (t.scalar_type()) {
    case at::kFloat: return ncclFloat32;
    case at::kHalf: return ncclFloat16;
    case at::kBFloat16: return ncclBfloat16;
    case at::kDouble: return ncclFloat64;
    case at::kInt: return ncclInt32;
    case at::kLong: return ncclInt64;
    case at::kChar: return ncclInt8;
    case at::kByte: return ncclUint8;
    case at::kBool:
      if (!reduction) return ncclUint8;  // moving bytes is fine; summing bools is not
      break;
    default: break;
  }
  throw std::invalid_argument(std::string("fmcore NCCL: ") + name + " has dtype " +
                              std::string(c10::toString(t.scalar_type())) +
                              ", expected one of float32, float16, bfloat16, float64, int32, int64, "
                              "int8, uint8 (bool only for all_gather/broadcast)");
}

ncclRedOp_t nccl_op(const std::string& op, const at::Tensor& t) {
  if (op == "sum") return ncclSum;
  if (op == "max") return ncclMax;
  if (op == "min") return ncclMin;
  if (op == "avg") {
    if (!at::isFloatingType(t.scalar_type()))
      throw std::invalid_argument("fmcore NCCL: op 'avg' needs a floating tensor, got " +
                                  std::string(c10::toString(t.scalar_type())));
    return ncclAvg;
  }
  throw std::invalid_argument("fmcore NCCL: expected op 'sum', 'avg', 'max' or 'min', got '" + op + "'");
}

class NcclCommunicator {
 public:
  NcclCommunicator(const std::string& unique_id, int world_size, int rank, int device, double timeout_s)
      : world_size_(world_size), rank_(rank), device_(device),
        // steady_clock counts int64 nanoseconds (292 years): a longer timeout ("never") would overflow
        // into a deadline in the past. 3e9 s is 95 years.
        timeout_(std::chrono::duration_cast<Clock::duration>(
            std::chrono::duration<double>(std::min(timeout_s, 3e9)))) {
    if (unique_id.size() != sizeof(ncclUniqueId))
      throw std::invalid_argument("fmcore NCCL: expected unique_id of " +
                                  std::to_string(sizeof(ncclUniqueId)) + " bytes, got " +
                                  std::to_string(unique_id.size()));
    if (world_size < 1 || rank < 0 || rank >= world_size)
      throw std::invalid_argument("fmcore NCCL: expected 0 <= rank < world_size, got rank " +
                                  std::to_string(rank) + ", world_size " + std::to_string(world_size));
    if (device < 0) throw std::invalid_argument("fmcore NCCL: expected a CUDA device index >= 0");
    if (!(timeout_s > 0)) throw std::invalid_argument("fmcore NCCL: expected timeout_s > 0");
    ncclUniqueId id;
    std::memcpy(&id, unique_id.data(), sizeof(id));
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    std::lock_guard<std::mutex> lock(mu_);
    last_error_seen_ = ncclGetLastError(nullptr);
    const ncclResult_t r = ncclCommInitRankConfig(&comm_, world_size, id, rank, &config);
    finish_locked(r, "ncclCommInitRankConfig");  // aborts and throws on failure or timeout
    watchdog_ = std::thread([this] { watchdog_loop(); });
  }

  ~NcclCommunicator() {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (watchdog_.joinable()) watchdog_.join();
    // Abort frees local resources without waiting on peers that may be gone; close() is the graceful path.
    if (comm_ != nullptr) ncclCommAbort(comm_);
    for (const Pending& p : pending_) cudaEventDestroy(p.event);
    for (cudaEvent_t e : free_events_) cudaEventDestroy(e);
  }

  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  int device() const { return device_; }

  // In place: t <- op over ranks of t.
  void all_reduce(const at::Tensor& t, const std::string& op) {
    const auto guard = device_guard();
    std::lock_guard<std::mutex> lock(mu_);
    ready_locked();
    check_tensor(t, "tensor");
    const ncclRedOp_t red = nccl_op(op, t);
    const ncclDataType_t dt = nccl_dtype(t, "tensor", true);
    if (t.numel() == 0) return;
    const cudaStream_t stream = current_stream();
    finish_locked(ncclAllReduce(t.data_ptr(), t.data_ptr(), t.numel(), dt, red, comm_, stream),
                  "ncclAllReduce");
    enqueued_locked(stream, "all_reduce");
  }

  // output (n) <- op over ranks of input[rank * n : (rank + 1) * n]; input holds world_size * n elements.
  void reduce_scatter(const at::Tensor& output, const at::Tensor& input, const std::string& op) {
    const auto guard = device_guard();
    std::lock_guard<std::mutex> lock(mu_);
    ready_locked();
    check_tensor(output, "output");
    check_tensor(input, "input");
    check_same_dtype(output, input);
    if (input.numel() != output.numel() * world_size_)
      throw std::invalid_argument("fmcore NCCL reduce_scatter: expected input of " +
                                  std::to_string(output.numel() * world_size_) +
                                  " elements (world_size * output.numel()), got " +
                                  std::to_string(input.numel()));
    check_in_place(output, input, "reduce_scatter: output");
    const ncclRedOp_t red = nccl_op(op, output);
    const ncclDataType_t dt = nccl_dtype(output, "output", true);
    if (output.numel() == 0) return;
    const cudaStream_t stream = current_stream();
    finish_locked(ncclReduceScatter(input.data_ptr(), output.data_ptr(), output.numel(), dt, red, comm_,
                                    stream),
                  "ncclReduceScatter");
    enqueued_locked(stream, "reduce_scatter");
  }

  // output (world_size * n) <- the input (n) of every rank, in rank order. input may be
  // output[rank * n : (rank + 1) * n] (NCCL's in-place all-gather).
  void all_gather(const at::Tensor& output, const at::Tensor& input) {
    const auto guard = device_guard();
    std::lock_guard<std::mutex> lock(mu_);
    ready_locked();
    check_tensor(output, "output");
    check_tensor(input, "input");
    check_same_dtype(output, input);
    if (output.numel() != input.numel() * world_size_)
      throw std::invalid_argument("fmcore NCCL all_gather: expected output of " +
                                  std::to_string(input.numel() * world_size_) +
                                  " elements (world_size * input.numel()), got " +
                                  std::to_string(output.numel()));
    check_in_place(input, output, "all_gather: input");
    const ncclDataType_t dt = nccl_dtype(input, "input", false);
    if (input.numel() == 0) return;
    const cudaStream_t stream = current_stream();
    finish_locked(ncclAllGather(input.data_ptr(), output.data_ptr(), input.numel(), dt, comm_, stream),
                  "ncclAllGather");
    enqueued_locked(stream, "all_gather");
  }

  // In place: t <- t of rank root.
  void broadcast(const at::Tensor& t, int root) {
    const auto guard = device_guard();
    std::lock_guard<std::mutex> lock(mu_);
    ready_locked();
    check_tensor(t, "tensor");
    if (root < 0 || root >= world_size_)
      throw std::invalid_argument("fmcore NCCL broadcast: expected 0 <= root < " +
                                  std::to_string(world_size_) + ", got " + std::to_string(root));
    const ncclDataType_t dt = nccl_dtype(t, "tensor", false);
    if (t.numel() == 0) return;
    const cudaStream_t stream = current_stream();
    finish_locked(ncclBroadcast(t.data_ptr(), t.data_ptr(), t.numel(), dt, root, comm_, stream),
                  "ncclBroadcast");
    enqueued_locked(stream, "broadcast");
  }

  // Calls between group_start and group_end are fused into one NCCL launch at group_end.
  void group_start() {
    const auto guard = device_guard();
    std::lock_guard<std::mutex> lock(mu_);
    ready_locked();
    finish_locked(ncclGroupStart(), "ncclGroupStart");
    ++group_depth_;
  }

  void group_end() {
    const auto guard = device_guard();
    std::lock_guard<std::mutex> lock(mu_);
    if (group_depth_ == 0) throw std::logic_error("fmcore NCCL: group_end without group_start");
    --group_depth_;
    const ncclResult_t r = ncclGroupEnd();  // first, whatever happened in the group (see the top)
    if (group_depth_ > 0) {
      finish_locked(r, "ncclGroupEnd");
      return;
    }
    std::vector<cudaStream_t> streams = std::exchange(group_streams_, {});
    if (abort_pending_) {  // requested while the group was open: now it runs
      abort_pending_ = false;
      abort_locked(error_);
    }
    ready_locked();
    finish_locked(r, "ncclGroupEnd");
    for (cudaStream_t s : streams) enqueued_locked(s, "grouped collectives");
  }

  // Blocks the host until everything enqueued so far has completed; raises (after aborting) when that
  // takes longer than the timeout or NCCL reports an error.
  void synchronize() {
    const auto guard = device_guard();
    for (;;) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (group_depth_ != 0) throw std::logic_error("fmcore NCCL: synchronize inside a group");
        ready_locked();
        if (pending_.empty()) return;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  }

  // Raises if the communicator was aborted (by a timeout, an NCCL error or abort()).
  void check() {
    std::lock_guard<std::mutex> lock(mu_);
    ready_locked();
  }

  void abort(const std::string& reason) {
    const auto guard = device_guard();
    std::lock_guard<std::mutex> lock(mu_);
    abort_locked(reason);
  }

  // Graceful shutdown: waits for enqueued work, then finalizes (flushing NCCL's own queues) and destroys.
  void close() {
    const auto guard = device_guard();
    synchronize();
    std::lock_guard<std::mutex> lock(mu_);
    ready_locked();
    finish_locked(ncclCommFinalize(comm_), "ncclCommFinalize");
    ncclCommDestroy(comm_);
    comm_ = nullptr;
    error_ = "the communicator was closed";
  }

  bool healthy() {
    std::lock_guard<std::mutex> lock(mu_);
    return comm_ != nullptr;
  }

 private:
  struct Pending {
    cudaEvent_t event;
    Clock::time_point enqueued;
    const char* what;
  };

  cudaStream_t current_stream() const {
    return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)).stream();
  }

  void check_tensor(const at::Tensor& t, const char* name) const {
    if (!t.defined()) throw std::invalid_argument(std::string("fmcore NCCL: ") + name + " is undefined");
    if (!t.is_cuda() || t.get_device() != device_)
      throw std::runtime_error(std::string("fmcore NCCL: expected ") + name + " on cuda:" +
                               std::to_string(device_) + " (the communicator's device), got " +
                               t.device().str());
    if (!t.is_contiguous())
      throw std::invalid_argument(std::string("fmcore NCCL: expected ") + name + " to be contiguous");
  }

  static void check_same_dtype(const at::Tensor& output, const at::Tensor& input) {
    if (output.scalar_type() != input.scalar_type())
      throw std::invalid_argument("fmcore NCCL: expected input and output of one dtype, got " +
                                  std::string(c10::toString(input.scalar_type())) + " and " +
                                  std::string(c10::toString(output.scalar_type())));
  }

  c10::cuda::CUDAGuard device_guard() const {
    return c10::cuda::CUDAGuard(static_cast<c10::DeviceIndex>(device_));
  }

  // NCCL's only in-place layouts: the per-rank buffer `part` is this rank's slice of `flat`. Any
  // other overlap is undefined on NCCL.
  void check_in_place(const at::Tensor& part, const at::Tensor& flat, const char* what) const {
    if (part.numel() == 0) return;
    const auto bytes = [](const at::Tensor& t) { return t.numel() * t.element_size(); };
    const auto at = reinterpret_cast<uintptr_t>(part.data_ptr());
    const auto start = reinterpret_cast<uintptr_t>(flat.data_ptr());
    const bool overlaps = at < start + bytes(flat) && start < at + bytes(part);
    if (overlaps && at != start + rank_ * bytes(part))
      throw std::invalid_argument(std::string("fmcore NCCL ") + what + " overlaps the flat buffer " +
                                  "but is not its rank-" + std::to_string(rank_) + " slice (NCCL's " +
                                  "only in-place layout)");
  }

  // Raises if the communicator is unusable, after retiring finished work (may abort on timeout).
  void ready_locked() {
    if (comm_ != nullptr && !abort_pending_) poll_locked();
    if (comm_ == nullptr || abort_pending_)
      throw NcclError(error_.empty() ? "fmcore NCCL: communicator is not initialized"
                                     : "fmcore NCCL: communicator unusable: " + error_);
    last_error_seen_ = ncclGetLastError(comm_);  // (see describe)
  }

  std::string describe(ncclResult_t r, const char* what) const {
    std::string msg = std::string("fmcore NCCL: ") + what + " failed: " + ncclGetErrorString(r);
    // NCCL's last error message is process-wide and never cleared: it is this failure's only if it
    // changed since this communicator last looked (an earlier one, torch's too, would be blamed).
    const char* last = ncclGetLastError(comm_);
    if (last != nullptr && last[0] != '\0' && last != last_error_seen_) msg += std::string(" (") + last + ")";
    return msg;
  }

  // Completes a non-blocking NCCL call: polls while it is in progress, aborts and throws on failure
  // or when it is still in progress after the timeout.
  void finish_locked(ncclResult_t r, const char* what) {
    const Clock::time_point deadline = Clock::now() + timeout_;
    while (r == ncclInProgress && comm_ != nullptr) {
      if (Clock::now() > deadline) {
        abort_locked(std::string(what) + " still in progress after the timeout (a peer is missing "
                     "or stuck); the communicator was aborted");
        throw NcclError("fmcore NCCL: " + error_);
      }
      std::this_thread::sleep_for(std::chrono::microseconds(20));
      ncclResult_t state = ncclSuccess;
      const ncclResult_t q = ncclCommGetAsyncError(comm_, &state);
      r = q != ncclSuccess ? q : state;
    }
    if (r == ncclSuccess) return;
    const std::string msg = describe(r, what);
    // Even an argument error: a non-blocking communicator keeps a failed call's result as its state,
    // which every later call returns (NCCL: "destroy the communicator with abort()" after an error).
    // fmcore's own checks refuse bad arguments before any NCCL call.
    abort_locked(msg);
    throw NcclError(msg);
  }

  void enqueued_locked(cudaStream_t stream, const char* what) {
    if (group_depth_ > 0) {
      for (cudaStream_t s : group_streams_)
        if (s == stream) return;
      group_streams_.push_back(stream);
      return;
    }
    // An event recorded in a CUDA graph capture cannot be queried (cudaErrorCapturedEvent): a graph's
    // replays are not watched, as torch's ProcessGroupNCCL does not watch them either.
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &capture) == cudaSuccess && capture != cudaStreamCaptureStatusNone)
      return;
    cudaEvent_t event = nullptr;
    if (!free_events_.empty()) {
      event = free_events_.back();
      free_events_.pop_back();
    } else {
      const cudaError_t e = cudaEventCreateWithFlags(&event, cudaEventDisableTiming);
      if (e != cudaSuccess) throw NcclError(std::string("fmcore NCCL: cudaEventCreate failed: ") +
                                            cudaGetErrorString(e));
    }
    const cudaError_t e = cudaEventRecord(event, stream);
    if (e != cudaSuccess) {
      free_events_.push_back(event);
      throw NcclError(std::string("fmcore NCCL: cudaEventRecord failed: ") + cudaGetErrorString(e));
    }
    pending_.push_back({event, Clock::now(), what});
  }

  // Retires completed work; aborts on an asynchronous NCCL error, a CUDA error or a timeout.
  void poll_locked() {
    while (!pending_.empty()) {
      const cudaError_t e = cudaEventQuery(pending_.front().event);
      if (e == cudaErrorNotReady) break;
      if (e != cudaSuccess) {
        cudaGetLastError();  // clear a non-sticky error so later CUDA calls are not blamed for it
        abort_locked(std::string("CUDA error while waiting for ") + pending_.front().what + ": " +
                     cudaGetErrorString(e));
        return;
      }
      free_events_.push_back(pending_.front().event);
      pending_.pop_front();
    }
    ncclResult_t state = ncclSuccess;
    // Inside a group the calls are only recorded; NCCL's state is queried again at group_end.
    if (group_depth_ == 0 && ncclCommGetAsyncError(comm_, &state) == ncclSuccess &&
        state != ncclSuccess && state != ncclInProgress) {
      abort_locked(describe(state, "an asynchronous operation"));
      return;
    }
    if (!pending_.empty() && Clock::now() - pending_.front().enqueued > timeout_) {
      const double s = std::chrono::duration<double>(Clock::now() - pending_.front().enqueued).count();
      abort_locked(std::string(pending_.front().what) + " enqueued " + std::to_string(s) +
                   " s ago has not completed (timeout); the communicator was aborted");
    }
  }

  void abort_locked(const std::string& reason) {
    if (error_.empty()) error_ = reason;
    if (group_depth_ > 0 && comm_ != nullptr) {  // until group_end (see the top)
      abort_pending_ = true;
      return;
    }
    if (comm_ != nullptr) ncclCommAbort(comm_);  // makes in-flight NCCL kernels return
    comm_ = nullptr;
  }

  void watchdog_loop() {
    cudaSetDevice(device_);  // cudaEventQuery needs the communicator's device current on this thread
    std::unique_lock<std::mutex> lock(mu_);
    while (!stop_) {
      cv_.wait_for(lock, std::chrono::milliseconds(100), [this] { return stop_; });
      if (!stop_ && comm_ != nullptr) poll_locked();
    }
  }

  const int world_size_, rank_, device_;
  const Clock::duration timeout_;
  std::mutex mu_;
  std::condition_variable cv_;
  ncclComm_t comm_ = nullptr;
  std::string error_;  // why comm_ is null, once it is
  std::deque<Pending> pending_;
  std::vector<cudaEvent_t> free_events_;
  std::vector<cudaStream_t> group_streams_;
  int group_depth_ = 0;
  bool abort_pending_ = false;  // an abort waiting for group_end
  std::string last_error_seen_;  // ncclGetLastError when this communicator last looked
  bool stop_ = false;
  std::thread watchdog_;
};

py::bytes nccl_unique_id() {
  ncclUniqueId id;
  const ncclResult_t r = ncclGetUniqueId(&id);
  if (r != ncclSuccess)
    throw NcclError(std::string("fmcore NCCL: ncclGetUniqueId failed: ") + ncclGetErrorString(r));
  return py::bytes(reinterpret_cast<const char*>(&id), sizeof(id));
}

py::tuple nccl_version() {
  int v = 0;
  ncclGetVersion(&v);  // 2.9+ encodes major*10000 + minor*100 + patch
  return py::make_tuple(v / 10000, v / 100 % 100, v % 100);
}

}  // namespace
#endif  // FMCORE_WITH_NCCL

void register_dist(py::module_& m) {
#ifdef FMCORE_WITH_NCCL
  m.attr("has_nccl") = true;
  py::register_exception<NcclError>(m, "NcclError", PyExc_RuntimeError);
  m.def("nccl_unique_id", &nccl_unique_id, "A fresh ncclUniqueId as bytes (call on one rank, share it).");
  m.def("nccl_version", &nccl_version, "(major, minor, patch) of the NCCL library loaded at run time.");
  using C = NcclCommunicator;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  py::class_<C>(m, "NcclCommunicator",
                "NCCL communicator over one CUDA device; collectives run on the current stream. "
                "Create it collectively via fmcore.dist.Communicator.")
      .def(py::init<const std::string&, int, int, int, double>(), py::arg("unique_id"),
           py::arg("world_size"), py::arg("rank"), py::arg("device"), py::arg("timeout_s"), nogil)
      .def_property_readonly("rank", &C::rank)
      .def_property_readonly("world_size", &C::world_size)
      .def_property_readonly("device", &C::device)
      .def("all_reduce", &C::all_reduce, py::arg("tensor"), py::arg("op") = "sum", nogil)
      .def("reduce_scatter", &C::reduce_scatter, py::arg("output"), py::arg("input"),
           py::arg("op") = "sum", nogil)
      .def("all_gather", &C::all_gather, py::arg("output"), py::arg("input"), nogil)
      .def("broadcast", &C::broadcast, py::arg("tensor"), py::arg("root"), nogil)
      .def("group_start", &C::group_start, nogil)
      .def("group_end", &C::group_end, nogil)
      .def("synchronize", &C::synchronize, nogil)
      .def("check", &C::check, nogil)
      .def("abort", &C::abort, py::arg("reason") = "aborted by the user", nogil)
      .def("close", &C::close, nogil)
      .def_property_readonly("healthy", &C::healthy);
#else
  m.attr("has_nccl") = false;
#endif
}

}  // namespace fmcore::dist
