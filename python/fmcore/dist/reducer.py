"""Bucketed data-parallel gradient averaging that overlaps the backward.

    reducer = GradReducer(model.parameters(), comm, bucket_mb=25)
    loss.backward()          # buckets are all-reduced as soon as their gradients are ready
    reducer.finish()         # wait, then each p.grad holds the average over ranks
    optimizer.step()

Parameters are assigned to buckets in reverse registration order (roughly the order backward produces
their gradients), split by dtype and device, each bucket holding up to bucket_mb of gradients. A
post-accumulate-grad hook counts a bucket's ready gradients; when the last arrives, one multi-tensor
copy (torch._foreach_copy_: a single multi_tensor_apply kernel launch on CUDA, one loop on the CPU)
flattens the gradients into the bucket's flat buffer, and an asynchronous all-reduce starts (on the
communicator's side stream on CUDA, a gloo work handle on the CPU) while backward continues.

Every rank launches buckets in bucket order (a bucket whose gradients are ready waits for the
earlier buckets to launch), so the collectives match across ranks whatever order hooks fire in.
Gradients that never arrive (unused parameters) are zero-filled and reduced in finish().
For gradient accumulation, wrap the non-final micro-batches in `with reducer.no_sync():`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from fmcore.dist.comm import Communicator, Work


class _Bucket:
    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        numel = sum(p.numel() for p in params)
        self.flat = torch.empty(numel, dtype=params[0].dtype, device=params[0].device)
        self.views, offset = [], 0
        for p in params:
            self.views.append(self.flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        self.ready = 0
        self.work: Work | None = None


class GradReducer:
    """Averages (op="avg") or sums (op="sum") gradients over comm's ranks, overlapping the backward."""

    def __init__(self, params: Iterable[torch.nn.Parameter], comm: Communicator, *,
                 bucket_mb: float = 25.0, op: str = "avg"):
        if op not in ("avg", "sum"):
            raise ValueError(f"expected op 'avg' or 'sum', got {op!r}")
        if bucket_mb <= 0:
            raise ValueError(f"expected bucket_mb > 0, got {bucket_mb}")
        unique = list({id(p): p for p in params if p.requires_grad}.values())  # tied weights once
        self.comm, self.op = comm, op
        self.buckets: list[_Bucket] = []
        cap = int(bucket_mb * 2**20)
        current: list[torch.nn.Parameter] = []
        size = 0
        for p in reversed(unique):
            if current and (size + p.numel() * p.element_size() > cap or
                            (p.dtype, p.device) != (current[0].dtype, current[0].device)):
                self.buckets.append(_Bucket(current))
                current, size = [], 0
            current.append(p)
            size += p.numel() * p.element_size()
        if current:
            self.buckets.append(_Bucket(current))
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b.params}
        self._next = 0  # the next bucket to launch, in bucket order
        self._sync = True
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in unique]

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside accumulate gradients locally without communicating."""
        old, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = old

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        if not self._sync:
            return
        bucket = self.buckets[self._bucket_of[id(p)]]
        bucket.ready += 1
        self._launch_ready()

    def _launch_ready(self, force: bool = False) -> None:
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if not force and bucket.ready < len(bucket.params):
                return
            for p in bucket.params:
                if p.grad is None:  # unused in this step's graph: it contributes zeros
                    p.grad = torch.zeros_like(p)
            torch._foreach_copy_(bucket.views, [p.grad for p in bucket.params])
            bucket.work = self.comm.all_reduce(bucket.flat, self.op, async_op=True)
            self._next += 1

    def finish(self) -> None:
        """Waits for every bucket and writes the reduced gradients back into p.grad."""
        self._launch_ready(force=True)
        for bucket in self.buckets:
            bucket.work.wait()
            torch._foreach_copy_([p.grad for p in bucket.params], bucket.views)
            bucket.work, bucket.ready = None, 0
        self._next = 0

    def remove(self) -> None:
        """Unregisters the hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @property
    def bucket_sizes(self) -> list[int]:
        """Elements per bucket, in launch order."""
        return [b.flat.numel() for b in self.buckets]
