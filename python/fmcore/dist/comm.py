"""One collective API over two backends: fmcore's NCCL communicator (csrc/dist) on CUDA, and
torch.distributed's collectives otherwise (gloo on the CPU), so every algorithm built on it (the
gradient reducer, ZeRO-1) runs and is tested the same way on a laptop and on a GPU cluster.

    dist.init_process_group("gloo" or "nccl")          # torchrun sets the rendezvous env
    comm = Communicator()                              # collective: every rank of the group calls it
    comm.all_reduce(t, "avg")                          # in place, blocking (stream-ordered on CUDA)
    work = comm.all_reduce(t, "sum", async_op=True)    # overlap, then work.wait()
    comm.reduce_scatter(shard, flat, "avg")            # flat: world * shard.numel() elements
    comm.all_gather(flat, shard)                       # into a preallocated flat buffer
    comm.broadcast(t, src=0)
    with comm.grouped():                               # NCCL fuses the calls into one launch
        ...

Semantics on CUDA (NCCL backend): a call enqueues on the current stream and returns; the result is
ready for later work on that stream. async_op=True enqueues on the communicator's side stream after
the current stream's pending work, and Work.wait() makes the current stream wait for it (the host
does not block). Errors, asynchronous NCCL errors and timeouts raise fmcore._C.NcclError; a timed-out
communicator is aborted rather than left hanging (see csrc/dist/communicator.cpp).

Semantics on the torch backend: a blocking call returns when the result is in place; async_op=True
returns torch's Work handle wrapped, and wait() blocks the host (gloo) until the result is in place.
"""

from __future__ import annotations

import contextlib
import itertools
from datetime import timedelta

import torch
import torch.distributed as dist

from fmcore import _C

OPS = ("sum", "avg", "max", "min")
_TORCH_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
# Communicators created by this process, counted per group (its name, the same on every member): the
# members of one group count its communicators alike, whatever other groups they are in did, so the
# n-th communicator of a group reads the id its rank 0 wrote for it, never another's.
_ids: dict[str, itertools.count] = {}
# torch 2.14 renamed the flat collectives (*_single) and deprecated the old names; 2.11 has only those.
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

NcclError = getattr(_C, "NcclError", RuntimeError)


def nccl_available() -> bool:
    """True when this build of fmcore has its NCCL communicator and a CUDA device is visible."""
    return bool(_C.has_nccl) and torch.cuda.is_available()


class Work:
    """Handle of an asynchronous collective; wait() orders the result before what the caller does next."""

    def __init__(self, wait_fn=None):
        self._wait_fn = wait_fn

    def wait(self) -> None:
        if self._wait_fn is not None:
            fn, self._wait_fn = self._wait_fn, None
            fn()


def _group_store(group) -> dist.Store:
    """The group's own store (a PrefixStore of the default one), which every member can reach."""
    entry = dist.distributed_c10d._world.pg_map.get(group)
    if entry is not None:
        return entry[1]
    return dist.PrefixStore(f"fmcore/{'_'.join(map(str, dist.get_process_group_ranks(group)))}/",
                            dist.distributed_c10d._get_default_store())


def _check_op(op: str, tensor: torch.Tensor) -> None:
    if op not in OPS:
        raise ValueError(f"expected op one of {OPS}, got {op!r}")
    if op == "avg" and not tensor.is_floating_point():
        raise ValueError(f"op 'avg' needs a floating tensor, got {tensor.dtype}")


class Communicator:
    """Collectives over the ranks of a torch.distributed process group.

    group: the process group (default: the world). backend: "nccl" (fmcore's NCCL communicator;
    needs a CUDA device and an fmcore build with NCCL), "torch" (the group's own collectives: gloo or
    NCCL through torch), or "auto" (nccl when available and device is CUDA). device: where the
    tensors live (default: the current CUDA device when CUDA is available and the group is NCCL, else
    the CPU). timeout: how long a collective may take before the NCCL communicator is aborted.
    Creating a Communicator is collective over the group.
    """

    def __init__(self, group=None, *, backend: str = "auto", device=None,
                 timeout: timedelta = timedelta(minutes=10)):
        if not dist.is_initialized():
            raise RuntimeError("fmcore.dist.Communicator needs torch.distributed.init_process_group() first")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        if device is None:
            uses_nccl = "nccl" in str(dist.get_backend(self.group)).lower()
            cuda = torch.cuda.is_available() and uses_nccl
            device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if backend == "auto":
            backend = "nccl" if nccl_available() and self.device.type == "cuda" else "torch"
        if backend not in ("nccl", "torch"):
            raise ValueError(f"expected backend 'auto', 'nccl' or 'torch', got {backend!r}")
        if backend == "nccl" and not nccl_available():
            raise RuntimeError("backend='nccl' needs fmcore built with NCCL and a CUDA device "
                               f"(fmcore._C.has_nccl={_C.has_nccl}, cuda={torch.cuda.is_available()})")
        if backend == "nccl" and self.device.type != "cuda":
            raise ValueError(f"backend='nccl' needs a CUDA device, got {self.device}")
        if not isinstance(timeout, timedelta) or timeout <= timedelta(0):
            raise ValueError(f"expected timeout a positive datetime.timedelta, got {timeout!r}")
        self.backend = backend
        self._timeout = timeout  # (the C++ communicator caps "never", timedelta.max, to 95 years)
        self._nccl = None
        self._side_stream = None
        self._grouped = False
        if backend == "nccl":
            self._nccl = self._create_nccl()
            self._side_stream = torch.cuda.Stream(self.device)
        # gloo has no AVG reduction: the torch backend sums and divides unless NCCL carries the tensor.
        self._pg_has_nccl = "nccl" in str(dist.get_backend(self.group)).lower()

    def _create_nccl(self):
        name = self.group.group_name
        key = f"fmcore/nccl_unique_id/{name}/{next(_ids.setdefault(name, itertools.count()))}"
        store = _group_store(self.group)
        if self.rank == 0:
            uid = _C.nccl_unique_id()
            store.set(key, uid)
        else:
            uid = store.get(key)  # blocks (up to the store's timeout) until rank 0 has set it
        return _C.NcclCommunicator(bytes(uid), self.world_size, self.rank, self.device.index,
                                   self._timeout.total_seconds())

    # ---- collectives
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", *, async_op: bool = False) -> Work:
        """In place: tensor <- op over ranks (op: sum, avg, max, min)."""
        self._check_open()
        _check_op(op, tensor)
        if self._nccl is not None:
            return self._nccl_call(lambda: self._nccl.all_reduce(tensor, op), [tensor], async_op)
        if op == "avg" and not (self._pg_has_nccl and tensor.is_cuda):
            work = dist.all_reduce(tensor, dist.ReduceOp.SUM, group=self.group, async_op=async_op)
            return self._torch_done(work, lambda: tensor.div_(self.world_size))
        torch_op = dist.ReduceOp.AVG if op == "avg" else _TORCH_OPS[op]
        return self._torch_done(dist.all_reduce(tensor, torch_op, group=self.group, async_op=async_op))

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, op: str = "sum", *,
                       async_op: bool = False) -> Work:
        """output (n elements) <- op over ranks of this rank's slice input[rank*n : (rank+1)*n]."""
        self._check_open()
        _check_op(op, output)
        self._check_flat(output, input, "input", "reduce_scatter")
        if self._nccl is not None:
            return self._nccl_call(lambda: self._nccl.reduce_scatter(output, input, op), [output, input],
                                   async_op)
        if op == "avg" and not (self._pg_has_nccl and output.is_cuda):
            work = _reduce_scatter_flat(output, input, dist.ReduceOp.SUM, group=self.group,
                                              async_op=async_op)
            return self._torch_done(work, lambda: output.div_(self.world_size))
        torch_op = dist.ReduceOp.AVG if op == "avg" else _TORCH_OPS[op]
        return self._torch_done(_reduce_scatter_flat(output, input, torch_op, group=self.group,
                                                           async_op=async_op))

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, *, async_op: bool = False) -> Work:
        """output (world*n elements, preallocated) <- every rank's input (n elements), in rank order."""
        self._check_open()
        self._check_flat(input, output, "output", "all_gather")
        if self._nccl is not None:
            return self._nccl_call(lambda: self._nccl.all_gather(output, input), [output, input], async_op)
        return self._torch_done(_all_gather_flat(output, input, group=self.group,
                                                            async_op=async_op))

    def broadcast(self, tensor: torch.Tensor, src: int = 0, *, async_op: bool = False) -> Work:
        """In place: tensor <- tensor of group rank src."""
        self._check_open()
        if not 0 <= src < self.world_size:
            raise ValueError(f"expected 0 <= src < {self.world_size}, got {src}")
        if self._nccl is not None:
            return self._nccl_call(lambda: self._nccl.broadcast(tensor, src), [tensor], async_op)
        global_src = dist.get_global_rank(self.group, src) if self.group is not dist.group.WORLD else src
        return self._torch_done(dist.broadcast(tensor, global_src, group=self.group, async_op=async_op))

    @contextlib.contextmanager
    def grouped(self):
        """Calls inside run as one NCCL group (one fused launch at exit). They must be blocking
        (async_op=False). On the torch backend each call completes as it is made."""
        self._check_open()
        if self._nccl is None:
            yield
            return
        self._nccl.group_start()
        self._grouped = True
        try:
            yield
        finally:
            self._grouped = False
            self._nccl.group_end()

    def synchronize(self) -> None:
        """Blocks until every collective this communicator enqueued has completed (raises on error or
        timeout). A no-op on the torch backend, whose blocking calls have completed already."""
        if self._nccl is not None:
            self._nccl.synchronize()

    def close(self) -> None:
        """Waits for pending work and releases the NCCL communicator (collective)."""
        if self._nccl is not None:
            self._nccl.close()
            self._nccl = None
            self.backend = "closed"

    # ---- helpers
    def _check_open(self) -> None:
        # (Closed, _nccl is None: the calls went on over torch.distributed, silently another backend.)
        if self.backend == "closed":
            raise RuntimeError("fmcore.dist.Communicator: used after close(), which released its NCCL communicator")

    def _check_flat(self, small: torch.Tensor, big: torch.Tensor, big_name: str, what: str) -> None:
        if big.numel() != small.numel() * self.world_size:
            raise ValueError(f"{what}: expected {big_name} of {small.numel() * self.world_size} elements "
                             f"(world_size {self.world_size} x {small.numel()}), got {big.numel()}")
        if big.dtype != small.dtype:
            raise ValueError(f"{what}: expected input and output of one dtype, got {small.dtype} and {big.dtype}")
        if not (big.is_contiguous() and small.is_contiguous()):
            raise ValueError(f"{what}: expected contiguous input and output")
        # NCCL runs in place only when the per-rank buffer is exactly this rank's slice of the flat one;
        # any other overlap is undefined on NCCL (gloo and the CPU model of NCCL happen to get it right).
        if small.numel() and small.device == big.device and small.device.type != "meta":
            size, start, at = small.element_size(), big.data_ptr(), small.data_ptr()
            overlaps = at < start + big.numel() * size and start < at + small.numel() * size
            if overlaps and at != start + self.rank * small.numel() * size:
                small_name = "output" if big_name == "input" else "input"
                raise ValueError(
                    f"{what}: {small_name} overlaps {big_name} but is not its rank-{self.rank} slice "
                    f"{big_name}[{self.rank * small.numel()}:{(self.rank + 1) * small.numel()}] (NCCL's only "
                    f"in-place layout); got element offset {(at - start) / size:g}")

    def _nccl_call(self, fn, tensors: list[torch.Tensor], async_op: bool) -> Work:
        if not async_op:
            fn()
            return Work()
        if self._grouped:
            raise ValueError("async_op=True is not supported inside grouped(); the group is one launch")
        current = torch.cuda.current_stream(self.device)
        side = self._side_stream
        side.wait_stream(current)  # the inputs were produced on the current stream
        with torch.cuda.stream(side):
            fn()
        for t in tensors:
            t.record_stream(side)  # the caching allocator must not reuse them before the side stream is done
        done = torch.cuda.Event()
        done.record(side)
        return Work(lambda: torch.cuda.current_stream(self.device).wait_event(done))

    @staticmethod
    def _torch_done(work, then=None) -> Work:
        if work is None:  # blocking call: already complete
            if then is not None:
                then()
            return Work()

        def wait():
            work.wait()
            if then is not None:
                then()

        return Work(wait)
