"""Gradient buckets that communicate during the backward, and the data-parallel reducer built on them.

    reducer = GradReducer(model.parameters(), comm, bucket_mb=25)
    loss.backward()          # buckets are all-reduced as soon as their gradients are ready
    reducer.finish()         # wait, then each p.grad holds the average over ranks
    optimizer.step()

GradBuckets is the machinery both GradReducer (all-reduce, DDP's algorithm) and ZeroAdamW (ZeRO-1's
reduce-scatter, fmcore.dist.zero) use; only the collective each bucket launches differs.

Bucketing. Parameters are walked in reverse registration order (roughly the order backward produces
their gradients). Parameters of different keys (dtype and device; ZeRO-1 adds the param group) never
share a bucket: each key has one open bucket, closed when the next parameter would take it past
bucket_mb, and buckets are numbered in the order they close (the still-open ones last). A bucket's
flat gradient buffer is zero-padded to a multiple of `shards` elements, so a reduce-scatter splits it
evenly over that many ranks (shards=1: no padding).

Overlap. A post-accumulate-grad hook counts a bucket's ready gradients; when the last arrives, one
multi-tensor copy (torch._foreach_copy_: a single multi_tensor_apply kernel launch on CUDA, one loop on
the CPU) flattens the gradients into the bucket's buffer, and the bucket's asynchronous collective
starts (on the communicator's side stream on CUDA, a gloo work handle on the CPU) while backward
continues. Every rank launches buckets in bucket order (a bucket whose gradients are ready waits for
the earlier buckets to launch), so the collectives match across ranks whatever order hooks fire in.
Gradients that never arrive (unused parameters) are zero-filled and launched when the backward ends
(a callback queued on the autograd engine), which also delays every later bucket to then: a model with
unused parameters overlaps less. Every rank has then launched every bucket when backward() returns,
so collectives the caller issues afterwards come after them on every rank. Under compiled autograd
(torch._dynamo.config.compiled_autograd) the hooks launch nothing: finish() / wait() launch every
bucket from the accumulated gradients (no overlap, and no collective in flight when backward() returns).

Gradient accumulation: wrap the non-final micro-batches in `with no_sync():` (nothing is launched).
Without it every backward launches the buckets again: a gradient arriving a second time before
wait() means a new backward began, so the buckets not yet launched are launched (zero-filling missing
gradients, as wait() does: every rank then has launched every bucket once, in order, whichever
parameters it used), everything is waited for and discarded, and the buckets start over with the
accumulated gradients (correct, but the first pass's traffic is wasted). This needs each rank's later
backward to produce again some gradient its earlier one did (a shared trunk), or the ranks disagree
on how many backward passes there were.

Gradients are read when their bucket launches, so a gradient changed afterwards (masked, clipped,
scaled, accumulated under no_sync(), or replaced: p.grad = None then another backward) would be
silently lost: wait() returns those parameters so the caller can raise. To drop a backward whose
buckets have launched, call discard() (the owners' zero_grad()), not just p.grad = None.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from collections.abc import Callable, Hashable, Iterable

import torch

from fmcore.dist.comm import Communicator, Work


def _is_grad(p: torch.nn.Parameter, ref: weakref.ref, version: int) -> bool:
    """Whether p.grad is still the tensor ref points to, unmodified since it was at version."""
    return p.grad is not None and ref() is p.grad and p.grad._version == version


class Bucket:
    """The gradients of some parameters of one key, back to back in `flat` (views: each gradient's place),
    zero-padded to shards * shard_numel elements; the padding is never written, so it stays zero."""

    def __init__(self, key: Hashable, params: list[torch.nn.Parameter], shards: int):
        self.key, self.params = key, params
        self.numel = sum(p.numel() for p in params)
        self.shard_numel = max(1, math.ceil(self.numel / shards))
        self.flat = torch.zeros(shards * self.shard_numel, dtype=params[0].dtype, device=params[0].device)
        self.views, offset = [], 0
        for p in params:
            self.views.append(self.flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        self.ready = 0  # gradients arrived in this backward
        self.work: Work | None = None


class GradBuckets:
    """Buckets of params' gradients (unique, requiring grad, in registration order) that start
    launch(bucket_index) -> Work from the backward's hooks, in bucket order. key(p) separates buckets."""

    def __init__(self, params: list[torch.nn.Parameter], launch: Callable[[int], Work], *,
                 bucket_mb: float, key: Callable[[torch.nn.Parameter], Hashable], shards: int = 1):
        if bucket_mb <= 0:
            raise ValueError(f"expected bucket_mb > 0, got {bucket_mb}")
        cap = int(bucket_mb * 2**20)
        self.buckets: list[Bucket] = []
        open_: dict[Hashable, tuple[list, int]] = {}  # key -> (its open bucket's params, their bytes)
        for p in reversed(params):
            k, nbytes = key(p), p.numel() * p.element_size()
            current, size = open_.get(k, ([], 0))
            if current and size + nbytes > cap:
                self.buckets.append(Bucket(k, current, shards))
                current, size = [], 0
            current.append(p)
            open_[k] = (current, size + nbytes)
        self.buckets += [Bucket(k, current, shards) for k, (current, _) in open_.items()]
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b.params}
        self._launch = launch
        self._next = 0  # the next bucket to launch, in bucket order
        self._seen: set[int] = set()  # parameters whose gradient arrived in this backward
        self._queued_on = None  # the graph task (backward) _end_of_backward was last queued on
        # id(p) -> (p, its gradient, that gradient's _version) when its bucket copied it: a later edit is
        # lost. A weak reference: p.grad = None must free the gradient.
        self._copied: dict[int, tuple[torch.nn.Parameter, weakref.ref, int]] = {}
        self._sync = True
        # The hooks hold the buckets weakly, and are removed when the buckets are collected. torch keeps a
        # param's post-accumulate-grad hooks where the garbage collector does not look: a hook holding
        # the buckets (which hold the params) made a cycle gc cannot break, and every ZeroAdamW or
        # GradReducer dropped without remove() kept its model, buffers, communicator and process group
        # alive (a sweep of zero1 runs in one process leaked them all, run after run).
        on_grad = functools.partial(_on_grad, weakref.ref(self))
        self._hooks = [p.register_post_accumulate_grad_hook(on_grad) for p in params]
        self._remove_hooks = weakref.finalize(self, _remove_hooks, self._hooks)

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
        # A gradient arriving a second time, or after the end of a backward launched its bucket: a second
        # backward before wait(): start over (see the module doc).
        if id(p) in self._seen or self._bucket_of[id(p)] < self._next:
            # Launch what this rank has not, so every rank waits on the same collectives.
            self._launch_ready(force=True)
            self._reset()
        # Queued on every backward a gradient arrives in, nested ones included (a reentrant checkpoint's,
        # whose end does not launch), and again after a backward that raised before its callbacks ran.
        task = torch._C._current_graph_task_id()
        if task != self._queued_on:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._queued_on = task
        self._seen.add(id(p))
        self.buckets[self._bucket_of[id(p)]].ready += 1
        self._launch_ready()

    def _launch_ready(self, force: bool = False) -> None:
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if not force and bucket.ready < len(bucket.params):
                return
            frozen = False
            for p in bucket.params:
                if p.grad is None:
                    if p.requires_grad:  # unused in this step's graph: it contributes zeros
                        p.grad = torch.zeros_like(p)
                    else:  # frozen since: zeros too, but p.grad stays None (as DDP leaves it), so an
                        frozen = True  # optimizer skips it rather than moving it with a zero gradient
                elif p.grad.layout != torch.strided:  # (else: "copy_() between dense and sparse Tensors")
                    raise RuntimeError(
                        f"fmcore.dist: the gradient of a parameter of shape {tuple(p.shape)} is {p.grad.layout} "
                        "(nn.Embedding(sparse=True)?); the gradient buckets are dense: expected dense gradients")
            if frozen:
                bucket.flat.zero_()
                have = [(v, p.grad) for p, v in zip(bucket.params, bucket.views) if p.grad is not None]
                torch._foreach_copy_([v for v, _ in have], [g for _, g in have])
            else:
                torch._foreach_copy_(bucket.views, [p.grad for p in bucket.params])
            self._copied.update((id(p), (p, weakref.ref(p.grad), p.grad._version))
                                for p in bucket.params if p.grad is not None)
            bucket.work = self._launch(self._next)
            self._next += 1

    def _end_of_backward(self) -> None:
        """Launches, as the backward ends, the buckets still waiting for gradients that did not come
        (zero-filled), as DDP does with find_unused_parameters: every rank has then launched every bucket
        when backward() returns. Launched at wait() instead, a parameter unused on some ranks only put its
        bucket's collective after the caller's next one there (an all-reduce of the loss to log it, between
        backward() and step()) but before it on the others: the ranks matched different collectives (a
        size mismatch, or silently mixed data)."""
        self._queued_on = None
        if torch._C._current_autograd_node() is not None:
            # The end of a backward nested in another (checkpoint(use_reentrant=True) runs its segment's
            # backward inside the outer one): launching here zero-filled the gradients still to come, and
            # each later segment started over (every bucket launched once per segment, each start-over
            # waiting for the last). The outer backward's gradients queue the callback on it.
            return
        self._launch_ready(force=True)

    @property
    def pending(self) -> bool:
        """Whether a gradient arrived (so collectives may be in flight) since the last wait()/discard()."""
        return bool(self._seen)

    def wait(self) -> list[torch.nn.Parameter]:
        """Launches the buckets still waiting, waits for every bucket's collective, and resets for the
        next backward. Returns the parameters whose p.grad changed after their bucket copied it (the
        reduced result misses that change)."""
        self._launch_ready(force=True)
        changed = [p for p, ref, version in self._copied.values() if not _is_grad(p, ref, version)]
        self._reset()
        return changed

    def discard(self) -> None:
        """Drops this backward's reductions (collective when a gradient arrived since the last wait():
        the buckets not yet launched are launched on zeros, so every rank issues the same collectives,
        then all are waited for). p.grad is left alone."""
        if not self.pending:
            return
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            bucket.flat.zero_()
            bucket.work = self._launch(self._next)
            self._next += 1
        self._reset()

    def _reset(self) -> None:
        for bucket in self.buckets[:self._next]:
            bucket.work.wait()
        for bucket in self.buckets:
            bucket.work, bucket.ready = None, 0
        self._next = 0
        self._seen.clear()
        self._copied.clear()

    def remove(self) -> None:
        """Unregisters the hooks."""
        self._remove_hooks()


def _in_compiled_autograd() -> bool:
    # torch._dynamo's private flag (torch 2.11 to 2.14 have it). A torch without it is taken as running no
    # compiled autograd: the hooks then launch eagerly, which is right everywhere but inside one.
    module = getattr(torch._dynamo, "compiled_autograd", None)
    return bool(getattr(module, "in_compiled_autograd_region", False))


def _on_grad(buckets: weakref.ref, p: torch.nn.Parameter) -> None:
    if _in_compiled_autograd():
        # Compiled autograd (torch._dynamo.config.compiled_autograd) runs this hook inside the compiled
        # backward: dynamo refused the end-of-backward callback ("queue_callback() is only supported when
        # Compiled Autograd is enabled with fullgraph=True"), and a hook run eagerly there queued it on a
        # graph task that never runs it (a parameter unused on one rank then mismatched the collectives).
        # Nothing is launched (dynamo traces this into nothing, so the graph stays whole): wait() launches
        # every bucket, in order, from the accumulated p.grad.
        return
    _on_grad_eager(buckets, p)


# A backward() inside a torch.compile'd function without compiled autograd runs the hooks under dynamo's
# frame evaluation, which compiled the hook as a frame of its own once per parameter shape up to its
# recompile limit ("torch._dynamo hit config.recompile_limit (8) function: '_on_grad'"): the hook's frame
# is skipped, and its work is never compiled. (Not torch._dynamo.disable on the hook itself: compiled
# autograd would then break its graph at every parameter, and refuse it under fullgraph=True.) skip_code is
# private (torch 2.11 to 2.14 have it); without it the hook is compiled as before, slower but correct.
_skip_code = getattr(torch._dynamo.eval_frame, "skip_code", None)
if _skip_code is not None:
    _skip_code(_on_grad.__code__)


@torch._dynamo.disable
def _on_grad_eager(buckets: weakref.ref, p: torch.nn.Parameter) -> None:
    live = buckets()
    if live is not None:
        live._on_grad(p)


def _remove_hooks(hooks: list) -> None:
    for h in hooks:
        h.remove()


class GradReducer:
    """Averages (op="avg") or sums (op="sum") gradients over comm's ranks, overlapping the backward."""

    def __init__(self, params: Iterable[torch.nn.Parameter], comm: Communicator, *,
                 bucket_mb: float = 25.0, op: str = "avg"):
        if op not in ("avg", "sum"):
            raise ValueError(f"expected op 'avg' or 'sum', got {op!r}")
        params = list({id(p): p for p in params}.values())  # tied weights once
        unique = [p for p in params if p.requires_grad]
        self._frozen = [p for p in params if not p.requires_grad]  # (unfrozen later: their gradients stay local)
        self.comm, self.op = comm, op
        self._grads = GradBuckets(unique, self._all_reduce, bucket_mb=bucket_mb,
                                  key=lambda p: (p.dtype, p.device))
        self.buckets = self._grads.buckets
        self._params = unique
        self._finished: list[tuple[weakref.ref, int]] | None = None  # each p.grad and its _version after finish()

    def _all_reduce(self, index: int) -> Work:
        return self.comm.all_reduce(self.buckets[index].flat, self.op, async_op=True)

    def no_sync(self):
        """Backward passes inside accumulate gradients locally without communicating."""
        return self._grads.no_sync()

    def finish(self) -> None:
        """Waits for every bucket and writes the reduced gradients back into p.grad (collective).
        Calling it again when no gradient has arrived or changed since is a no-op (reducing the
        reduced gradients again would scale them by world with op="sum").
        Raises RuntimeError when a gradient changed after the backward reduced it (edit p.grad after
        finish(); to drop a backward, call zero_grad())."""
        unfrozen = [p for p in self._frozen if p.requires_grad and p.grad is not None]
        if unfrozen:
            raise RuntimeError(
                f"GradReducer: {len(unfrozen)} parameter(s) (shapes {[tuple(p.shape) for p in unfrozen[:3]]}...) "
                "frozen when the reducer was built require grad now: their gradients are not reduced, so each "
                "rank would step its own. Build a new GradReducer (remove() this one) after unfreezing")
        if not self._grads.pending and self._finished is not None and all(
                p.grad is None if ref is None else _is_grad(p, ref, version)
                for p, (ref, version) in zip(self._params, self._finished)):
            return
        changed = self._grads.wait()
        if changed:
            raise RuntimeError(
                f"GradReducer: {len(changed)} gradient(s) (shapes {[tuple(p.shape) for p in changed[:3]]}...) "
                "changed after the backward started reducing them (edited, accumulated under no_sync() after a "
                "synced backward, or replaced after p.grad = None): the reduction would miss the change. Edit "
                "gradients after finish(), and drop a backward with GradReducer.zero_grad()")
        for bucket in self.buckets:  # (a parameter frozen since the reducer was built keeps p.grad None)
            have = [(p.grad, v) for p, v in zip(bucket.params, bucket.views) if p.grad is not None]
            torch._foreach_copy_([g for g, _ in have], [v for _, v in have])
        self._finished = [(None, 0) if p.grad is None else (weakref.ref(p.grad), p.grad._version)
                          for p in self._params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drops the current backward's reductions (waits for those in flight; collective if any
        gradient arrived since finish()) and resets the gradients, like model.zero_grad(). Use it, not
        p.grad = None, to discard a synced backward before another."""
        self._grads.discard()
        for p in self._params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    def remove(self) -> None:
        """Unregisters the hooks."""
        self._grads.remove()

    @property
    def bucket_sizes(self) -> list[int]:
        """Elements per bucket, in launch order."""
        return [b.numel for b in self.buckets]
