"""Timing and memory measurement shared by every benchmark.

GPU: median of CUDA-event timings after warm-up, the L2 cache flushed before each timed call so a
memory-bound op cannot be timed out of cache, and the GPU held busy (torch.cuda._sleep) while the
host enqueues the call, so the interval is the call's device time: its kernels and the gaps between
them on the device, not the host's Python, dispatcher and autograd latency before the first launch.
That latency is measured on its own (host_us_per_call: the per-call overhead rows), and in training,
where the host runs ahead of a full queue, it is hidden. A host sync inside the call still costs
what it costs: whatever the call launches after it runs at the host's pace. CPU: median of
perf_counter timings. Callers build fresh random inputs; nothing here looks at the data.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ~1 ms of GPU clock cycles (H100/H200 run at 1.6-2 GHz): longer than the host needs to enqueue any
# benchmarked call that does not sync, and a negligible cost per timed repetition.
_HOST_COVER_CYCLES = 2_000_000


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 5, rep: int = 30,
            max_seconds: float = 10.0, setup: Callable[[], object] | None = None) -> float:
    """Median milliseconds of one call of fn on device (fn must be repeatable). setup, when given, runs
    before every call, outside the timed interval: e.g. restoring inputs that fn overwrites, so that
    each call sees the same data."""
    setup = setup or (lambda: None)
    for _ in range(warmup):
        setup()
        fn()
    _sync(device)
    if device.type != "cuda":
        times = []
        deadline = time.perf_counter() + max_seconds
        for _ in range(rep):
            setup()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            if time.perf_counter() > deadline and len(times) >= 3:
                break
        return statistics.median(times)
    # 256 MiB is larger than any current GPU's L2: writing it evicts what fn touched last time.
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    for i in range(rep):
        # Enqueued before the start event, so its kernels are not in the interval (the stream runs in order).
        setup()
        flush.zero_()
        torch.cuda._sleep(_HOST_COVER_CYCLES)
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def host_us_per_call(fn: Callable[[], object], device: torch.device, *, calls: int, reps: int,
                     warmup: int) -> float:
    """Host microseconds per call of fn, back to back: the median over reps runs of the mean of calls
    calls. For per-call overhead on tiny tensors, where the kernel is negligible; on CUDA the launches
    queue asynchronously and each run ends with a synchronize. On the CPU it runs with one intra-op
    thread: torch's kernels split even 8 rows across threads, and on a loaded 2-core machine each
    call then waited ~8 ms for a busy core."""
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        for _ in range(warmup):
            fn()
        per_run = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            _sync(device)
            per_run.append((time.perf_counter() - t0) / calls * 1e6)
        return statistics.median(per_run)
    finally:
        torch.set_num_threads(threads)


def _peak_since(base: int, fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """fn's result and the peak CUDA memory allocated while it runs, in MiB above base."""
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    return out, (torch.cuda.max_memory_allocated(device) - base) / 2**20


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak CUDA memory allocated while fn runs, above what was allocated before (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return _peak_since(torch.cuda.memory_allocated(device), fn, device)[1]


def phase_peaks_mib(forward: Callable[[], object], backward: Callable[[object], object],
                    device: torch.device) -> tuple[float, float] | None:
    """Peak CUDA memory above what was allocated before, while forward() runs and while
    backward(forward's result) runs (None on CPU). The backward's peak includes what the forward
    left allocated for it, so max(fwd, bwd) is peak_memory_mib of the two together; apart, they say
    which half holds an excess."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    out, fwd = _peak_since(base, forward, device)
    # the peak restarts from what the forward left
    return fwd, _peak_since(base, lambda: backward(out), device)[1]
