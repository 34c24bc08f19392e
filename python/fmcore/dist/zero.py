"""ZeRO stage 1: AdamW whose fp32 master weights and moments are sharded over the data-parallel ranks,
with the gradients' reduce-scatter overlapping the backward.

    comm = Communicator()
    opt = ZeroAdamW(groups, comm, lr=3e-4, weight_decay=0.1, module=model)   # or model.parameters()
    with opt.no_sync():                      # gradient accumulation: non-final micro-batches
        loss0.backward()
    loss.backward()                          # buckets are reduce-scattered as their gradients get ready
    norm = opt.clip_grad_norm_(1.0)          # optional: waits for the reduce-scatters; the norm is global
    opt.step()                               # waits (if not yet), AdamW on the shard, all-gather
    opt.zero_grad()

Layout. The parameters are bucketed by fmcore.dist.reducer.GradBuckets (the reducer's bucketing),
in the reverse of the model's registration order (pass module=model), keyed by (param group, dtype,
device), bucket_mb each, every bucket zero-padded to world * s_b elements. A bucket's parameters
live in a flat parameter buffer laid out like its flat gradient buffer (p.data is re-pointed, so the
model keeps its Parameter objects). Rank r owns elements [r*s_b, (r+1)*s_b) of every bucket b; per
(param group, dtype, device) its shard is the concatenation of those slices in bucket order,
S = sum of s_b elements: an fp32 master copy (one nn.Parameter) that
the inner optimizer (fmcore.optim.FusedAdamW, or torch.optim.AdamW when impl="torch") updates, with
its moments, so optimizer state is 3 * 4 * S bytes per rank against DDP's 2 * 4 * N (fp32 params:
1/world of the replicated state plus the master copy; bf16 params: the master copy is the same one
DDP-with-master-weights needs, also 1/world here).

Step. In the backward, as soon as a bucket's gradients are all ready its hook copies them into the
bucket's flat gradient buffer and starts an asynchronous reduce-scatter (op avg) of it into that
bucket's slice of this rank's gradient shard (the communicator's side stream on CUDA, a gloo work
handle on the CPU), while backward continues: the reducer's all-reduce overlap, with the collective
swapped; the buckets of gradients that never arrived are launched, as zeros, when the backward
ends (under compiled autograd every bucket is launched by step(): see fmcore.dist.reducer).
clip_grad_norm_ or step waits for them and casts the shard to fp32 as the master's gradient; the
optimizer steps the shard; the shard is cast to the parameter dtype and every bucket's slice
all-gathered into its flat parameter buffer (one NCCL group). Every call is collective.

Checkpoints. state_dict() describes each bucket's slice of the master and moments as a DTensor
Shard(0) of the bucket's unpadded numel_b elements over the group's DeviceMesh: torch.chunk (DTensor's
split) and the padded slices agree, and a bucket's contents depend only on the parameters, param
groups and bucket_mb, not on the world size, so the dict saved with torch.distributed.checkpoint on
W ranks loads on W' ranks (with the same param groups and bucket_mb; fmcore.train.checkpoint.load
converts between bucket layouts, given the one fmcore.train.relayout.zero1_layout recorded). It can
also be torch.save'd or deep-copied.

Parameters edited outside the optimizer (model.load_state_dict after construction, nn.init, a
broadcast) are noticed at the next step() or state_dict(): the elements of this rank's slice that
differ from what the optimizer last wrote there (`send`) are copied into the master. (Collectives
and .data do not bump a tensor's _version, so the values are compared.) Gradients are read by the
backward's hooks, so p.grad must not be edited between backward() and step() (clip with
clip_grad_norm_ instead): step() raises RuntimeError if one was. To drop a backward, call zero_grad().
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fmcore.dist.comm import Communicator, Work
from fmcore.dist.reducer import Bucket, GradBuckets
from fmcore.optim.adamw import _check_hyperparameters

_HYPER = ("lr", "betas", "eps", "weight_decay")
_IMPLS = ("auto", "fmcore", "torch")


class _FlatShard:
    """The buckets of one (param group, dtype, device): their flat parameter buffers, and this rank's
    shard (the concatenation of its slice of each bucket; slices[j] is bucket j's part of it)."""

    def __init__(self, group_index: int, buckets: list[Bucket], rank: int):
        self.group_index, self.buckets = group_index, buckets
        self.numel = sum(b.numel for b in buckets)
        self.shard_numel = sum(b.shard_numel for b in buckets)
        self.flat_params, self.slices, self.valid, offset = [], [], [], 0
        with torch.no_grad():
            for b in buckets:
                flat, at = torch.zeros_like(b.flat), 0  # laid out like b.flat; padding stays 0
                for p in b.params:
                    view = flat[at:at + p.numel()].view_as(p)
                    view.copy_(p)
                    p.data = view  # the parameter now lives in the flat buffer
                    at += p.numel()
                self.flat_params.append(flat)
                self.slices.append(slice(offset, offset + b.shard_numel))
                # elements of this rank's slice that hold parameters (torch.chunk's split of numel_b)
                self.valid.append(min(max(b.numel - rank * b.shard_numel, 0), b.shard_numel))
                offset += b.shard_numel
            own = torch.cat([flat[rank * b.shard_numel:(rank + 1) * b.shard_numel]
                             for flat, b in zip(self.flat_params, buckets)])
        p0 = buckets[0].params[0]
        self.grad_shard = torch.empty(self.shard_numel, dtype=p0.dtype, device=p0.device)
        # what the optimizer last wrote into this rank's slices of the flat parameters (param dtype)
        self.send = own
        self.master = torch.nn.Parameter(own.to(torch.float32, copy=True))

    def is_sharded(self, v) -> bool:
        """Whether an optimizer state value is per element of the shard (master, moments)."""
        return torch.is_tensor(v) and v.dim() == 1 and v.numel() == self.shard_numel


def _cpu_foreach(lr) -> bool:
    """torch's CPU AdamW: foreach (one loop over the tensors), except that it rejects a tensor lr."""
    return not torch.is_tensor(lr)


def _check_no_shared_memory(groups: list[dict]) -> None:
    """Refuses a trainable parameter whose memory another parameter object also covers (distinct
    Parameters over one storage: ``nn.Parameter(embed.weight)`` as a tie, overlapping views of a fused
    weight). Each trainable parameter is moved into its own slot of a flat buffer (p.data is re-pointed),
    which silently untied them: each then trained on its own. FusedAdamW refuses such params too."""
    extents: dict[tuple, list] = {}
    seen: set[int] = set()
    for gi, group in enumerate(groups):
        for i, p in enumerate(group["params"]):
            if id(p) in seen or p.numel() == 0 or p.device.type == "meta":
                continue  # (one Parameter listed twice is one tied weight: ZeroAdamW takes it once)
            seen.add(id(p))
            start = p.storage_offset() * p.element_size()
            span = sum((n - 1) * st for n, st in zip(p.shape, p.stride())) + 1
            where = (p.device, p.untyped_storage().data_ptr())
            extents.setdefault(where, []).append((start, start + span * p.element_size(), gi, i, p))
    for spans in extents.values():
        spans.sort(key=lambda e: e[:2])
        # the span reaching furthest so far, among all params and among the trainable ones: a
        # trainable param may not overlap any other, a frozen one no trainable one
        reach = {"any": None, "trainable": None}
        for span in spans:
            start, _, gb, b, pb = span
            other = reach["any" if pb.requires_grad else "trainable"]
            if other is not None and start < other[1]:
                _, _, ga, a, pa = other
                raise ValueError(
                    f"ZeroAdamW: param {a} of group {ga} {tuple(pa.shape)} and param {b} of group {gb} "
                    f"{tuple(pb.shape)} share memory (distinct Parameter objects over one storage); ZeroAdamW "
                    "moves each parameter into a flat buffer of its own, which would untie them silently. Tie "
                    "weights with one Parameter object (lm_head.weight = embed.weight), not nn.Parameter(embed.weight)")
            for key in ("any", "trainable") if pb.requires_grad else ("any",):
                if reach[key] is None or span[1] > reach[key][1]:
                    reach[key] = span


def _inner_optimizer(impl: str, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    if impl in ("auto", "fmcore"):  # fmcore's optimizer runs on every device fmcore builds for
        from fmcore.optim import FusedAdamW

        return FusedAdamW(groups)
    if device.type == "cuda":
        return torch.optim.AdamW(groups, fused=True)
    return torch.optim.AdamW([{**g, "foreach": _cpu_foreach(g["lr"])} for g in groups])


def _at_offset_0(t: torch.Tensor) -> torch.Tensor:
    """t (1-D, contiguous) over the same memory but at storage offset 0: torch.save and copy.deepcopy
    fail on a DTensor whose local tensor sits at a non-zero offset ("invalid python storage"). The
    sliced storage keeps the original one alive by itself (its data pointer holds a reference)."""
    if t.storage_offset() == 0:
        return t
    start = t.storage_offset() * t.element_size()
    storage = t.untyped_storage()[start:start + t.numel() * t.element_size()]
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(storage)


class ZeroAdamW(torch.optim.Optimizer):
    """AdamW with ZeRO-1 sharding over comm's ranks; a drop-in for torch.optim.AdamW in a data-parallel
    loop (param groups and LR schedulers work: hyperparameters are read from self.param_groups at each
    step). Gradients are averaged over ranks by reduce-scatters that start in the backward (hooks on
    the parameters) and are waited for in clip_grad_norm_ / step; do not also wrap the model in DDP.
    bucket_mb: MiB of gradients per bucket, i.e. per reduce-scatter (load_state_dict takes a state
    dict of the same value; see Checkpoints above).
    module: the model. Buckets are filled in the reverse of its parameters' registration order, about
    the order backward produces gradients; without it, in the reverse of the param groups' order,
    which with several groups (weight decay or not) puts parameters whose gradients come at the end
    (the embedding, the first layers' norms) into the first buckets, and every later bucket waits for
    them (the buckets launch in order): pass it whenever there is more than one param group.

    Differences from torch.optim.AdamW: step() with no gradient at all since zero_grad() does nothing,
    but when some parameters have gradients, those without one (unused in this step) are updated with
    a zero gradient: their moments decay and weight decay applies (DDP zero-fills only a parameter
    some rank used: one no rank used keeps p.grad None, and torch.optim.AdamW skips it). p.grad holds
    this rank's local gradient, not the average (that is in the shards), and must not be edited after
    backward(): use clip_grad_norm_. A parameter's requires_grad may not change after construction.
    Every group's hyperparameters are validated as fmcore.optim.FusedAdamW does (no amsgrad or
    maximize). The param groups are laid out into flat shards at construction: add_param_group
    afterwards raises NotImplementedError."""

    def __init__(self, params: Iterable, comm: Communicator, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 *, impl: str = "auto", bucket_mb: float = 25.0, module: torch.nn.Module | None = None):
        if impl not in _IMPLS:
            raise ValueError(f"expected impl one of {_IMPLS}, got {impl!r}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        # Before any hook is registered: a constructor that raises must leave the model untouched.
        for gi, group in enumerate(self.param_groups):
            try:
                _check_hyperparameters(group)
            except ValueError as e:
                raise ValueError(f"ZeroAdamW param group {gi} (checked as fmcore.optim.FusedAdamW does): {e}") from None
        self.comm = comm
        group_of: dict[int, int] = {}  # id(param) -> its param group
        trainable = []  # requiring grad, each once, in param-group order
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.requires_grad and id(p) not in group_of:
                    group_of[id(p)] = gi
                    trainable.append(p)
        if not trainable:
            raise ValueError("ZeroAdamW got no parameters that require grad")
        _check_no_shared_memory(self.param_groups)
        if module is not None:  # registration order; parameters the module lacks keep theirs, last
            position = {id(p): i for i, p in enumerate(module.parameters())}
            trainable.sort(key=lambda p: position.get(id(p), len(position)))

        def key(p):
            return group_of[id(p)], p.dtype, p.device

        self._grads = GradBuckets(trainable, self._reduce_scatter, bucket_mb=bucket_mb, key=key,
                                  shards=comm.world_size)
        try:
            self._build(trainable, key, impl)
        except BaseException:
            self._grads.remove()  # a failed constructor leaves no hooks behind
            raise

    def _build(self, trainable: list[torch.nn.Parameter], key, impl: str) -> None:
        comm = self.comm
        by_key: dict = {}
        for b in self._grads.buckets:
            by_key.setdefault(b.key, []).append(b)
        # flats in param-group order, then by each (dtype, device)'s first parameter
        keys = sorted(dict.fromkeys(key(p) for p in trainable), key=lambda k: k[0])  # stable
        self._flats = [_FlatShard(k[0], by_key[k], comm.rank) for k in keys]
        self._home = {id(b): (f, j) for f in self._flats for j, b in enumerate(f.buckets)}
        inner_groups = [{"params": [f.master], **{k: self.param_groups[f.group_index][k] for k in _HYPER}}
                        for f in self._flats]
        self.inner = _inner_optimizer(impl, inner_groups, self._flats[0].master.device)
        self._init_state()
        self._reduced = False
        self._mesh = None
        self._params = trainable
        self._trainable = {id(p) for p in trainable}

    def add_param_group(self, param_group: dict) -> None:
        if "_flats" in self.__dict__:
            raise NotImplementedError("ZeroAdamW lays its param groups out into flat shards at construction: "
                                      "add_param_group afterwards is not supported; build a new ZeroAdamW "
                                      "(call remove() on this one) with every group")
        super().add_param_group(param_group)

    def remove(self) -> None:
        """Unregisters the backward hooks (before replacing this optimizer with another)."""
        self._grads.remove()

    # ---- parameters edited outside the optimizer
    @torch.no_grad()
    def _refresh_master(self) -> None:
        """Copies into the master the parameter elements edited since this optimizer last wrote them
        (loaded weights, re-initialisation, a broadcast): else the next all-gather would undo the edit.
        Only edited elements: the others keep the master's fp32 precision (bf16 parameters)."""
        rank = self.comm.rank
        for f in self._flats:
            for b, flat, part in zip(f.buckets, f.flat_params, f.slices):
                own, master = flat[rank * b.shard_numel:(rank + 1) * b.shard_numel], f.master[part]
                # One pass, no host sync, no fp32 temporary: ~16 bytes per shard element (an AdamW step
                # moves ~30), a small part of a step whose forward and backward dominate.
                torch.where(own != f.send[part], own, master, out=master)

    # ---- the step
    def _reduce_scatter(self, index: int) -> Work:
        """Started by the backward's hooks: bucket index's average, this rank's slice of it."""
        bucket = self._grads.buckets[index]
        f, j = self._home[id(bucket)]
        return self.comm.reduce_scatter(f.grad_shard[f.slices[j]], bucket.flat, "avg", async_op=True)

    def no_sync(self):
        """Backward passes inside accumulate gradients locally without communicating (the non-final
        micro-batches of gradient accumulation). Without it each backward reduce-scatters again."""
        return self._grads.no_sync()

    @torch.no_grad()
    def reduce_gradients(self) -> bool:
        """Waits for the gradients' reduce-scatters (launching those the backward has not) and sets each
        shard's master gradient (collective). clip_grad_norm_ and step() call it. Returns False, doing
        nothing, when no parameter has a gradient (no backward since zero_grad())."""
        if self._reduced:
            return True
        # The flat shards hold the parameters that required grad at construction; one frozen since would
        # still be stepped (a zero gradient: its moments keep moving it), one unfrozen never would.
        flipped = [p for g in self.param_groups for p in g["params"] if p.requires_grad != (id(p) in self._trainable)]
        if flipped:
            raise RuntimeError(
                f"ZeroAdamW: {len(flipped)} parameter(s) (shapes {[tuple(p.shape) for p in flipped[:3]]}...) changed "
                "requires_grad after construction; its flat shards hold the parameters that required grad then. "
                "Build a new ZeroAdamW (remove() this one) over the parameters to train")
        if not self._grads.pending and all(p.grad is None for p in self._params):
            return False
        changed = self._grads.wait()
        if changed:
            raise RuntimeError(
                f"ZeroAdamW: {len(changed)} gradient(s) (shapes {[tuple(p.shape) for p in changed[:3]]}...) "
                "changed after the backward: ZeroAdamW reduces gradients during the backward, so edits to "
                "p.grad after it (masking, scaling, torch.nn.utils.clip_grad_norm_, a backward under no_sync() "
                "after a synced one, p.grad = None instead of zero_grad()) would be lost. Clip with "
                "ZeroAdamW.clip_grad_norm_, and drop a backward with ZeroAdamW.zero_grad()")
        for f in self._flats:
            f.master.grad = f.grad_shard.float() if f.grad_shard.dtype != torch.float32 else f.grad_shard
        self._reduced = True
        return True

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Reduces the gradients, then scales them so their global L2 norm is at most max_norm
        (max_norm <= 0: only measures). Returns the norm before clipping, like
        torch.nn.utils.clip_grad_norm_ on the averaged full gradients."""
        if not self.reduce_gradients():
            return torch.zeros((), device=self._flats[0].master.device)
        grads = [f.master.grad for f in self._flats]
        sq = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) ** 2 for g in grads]).sum()
        self.comm.all_reduce(sq, "sum")
        norm = sq.sqrt()
        if max_norm > 0:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, coef)
        return norm

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.reduce_gradients():
            return loss  # no backward since zero_grad(): nothing to do, as torch.optim.AdamW
        self._refresh_master()
        for f, inner_group in zip(self._flats, self.inner.param_groups):
            for k in _HYPER:
                inner_group[k] = self.param_groups[f.group_index][k]
            if inner_group.get("foreach") is not None:  # torch's CPU AdamW (the lr may become a tensor)
                inner_group["foreach"] = _cpu_foreach(inner_group["lr"])
        self.inner.step()
        self._gather_params()
        self._reduced = False
        return loss

    def _gather_params(self) -> None:
        for f in self._flats:
            f.send.copy_(f.master)  # cast to the parameter dtype
        with self.comm.grouped():
            for f in self._flats:
                for flat, part in zip(f.flat_params, f.slices):
                    self.comm.all_gather(flat, f.send[part])

    def zero_grad(self, set_to_none: bool = True) -> None:
        # A backward whose reductions are in flight is dropped (collective then, as the backward was):
        # else the next step would use its gradients.
        self._grads.discard()
        super().zero_grad(set_to_none)
        for f in self._flats:
            f.master.grad = None
        self._reduced = False

    # ---- memory
    def state_bytes(self) -> int:
        """Bytes of optimizer state on this rank: the fp32 master shard and the inner optimizer's
        per-element state (moments), not counting scalars."""
        total = 0
        for f in self._flats:
            total += f.master.numel() * f.master.element_size()
            total += sum(v.numel() * v.element_size() for v in self.inner.state[f.master].values()
                         if f.is_sharded(v))
        return total

    # ---- checkpoints
    def _init_state(self) -> None:
        """Creates the moments now (torch's AdamW does it lazily at the first step), so a checkpoint can
        be loaded into a fresh optimizer."""
        for f in self._flats:
            state = self.inner.state[f.master]  # (empty: the inner optimizer was just made)
            # torch's AdamW keeps the step on the CPU unless fused/capturable; FusedAdamW on the device.
            on_device = (self.inner.defaults.get("fused") or self.inner.defaults.get("capturable")
                         or not isinstance(self.inner, torch.optim.AdamW))
            step_device = f.master.device if on_device else torch.device("cpu")
            state["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
            state["exp_avg"] = torch.zeros_like(f.master, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(f.master, memory_format=torch.preserve_format)

    def _sharded(self, f: _FlatShard, j: int, local: torch.Tensor):
        """Bucket j's slice of a shard tensor as a DTensor of the bucket's numel_b elements."""
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard

        if self._mesh is None:
            self._mesh = DeviceMesh.from_group(self.comm.group, f.master.device.type)
        return DTensor.from_local(_at_offset_0(local[f.slices[j]][:f.valid[j]]), self._mesh, [Shard(0)],
                                  run_check=False, shape=torch.Size([f.buckets[j].numel]), stride=(1,))

    def state_dict(self) -> dict:
        """Hyperparameters plus, per flat shard i and its bucket j, DTensors 'flat{i}.bucket{j}.master'
        and 'flat{i}.bucket{j}.<state>' over the bucket's unpadded elements (loadable at another world
        size through torch.distributed.checkpoint) and the replicated scalars ('flat{i}.step'). The
        tensors alias this optimizer's storage, so dcp.load(sd) fills them in place; call
        load_state_dict(sd) afterwards."""
        self._refresh_master()
        sd: dict = {"param_groups": [{k: g[k] for k in _HYPER} for g in self.param_groups]}
        for i, f in enumerate(self._flats):
            for k, v in {"master": f.master.detach(), **self.inner.state[f.master]}.items():
                if f.is_sharded(v):
                    sd.update({f"flat{i}.bucket{j}.{k}": self._sharded(f, j, v) for j in range(len(f.buckets))})
                else:
                    sd[f"flat{i}.{k}"] = v
        return sd

    def bucket_params(self) -> list[list[list[torch.nn.Parameter]]]:
        """Per flat shard i, per bucket j, its parameters in order: the elements of state_dict()'s
        'flat{i}.bucket{j}.<state>' are theirs, flattened back to back."""
        return [[b.params for b in f.buckets] for f in self._flats]

    @torch.no_grad()
    def load_whole_state_dict(self, whole: dict) -> None:
        """Loads state_dict()'s tensors unsharded: 'flat{i}.bucket{j}.<state>' of bucket j's elements
        (every rank passes the same; each keeps its slice) and 'flat{i}.step'. Reads each key once, in the
        same order on every rank (fmcore.train.relayout broadcasts each as it is read). Collective: the
        parameters are re-gathered from the loaded master shards."""
        rank = self.comm.rank
        for i, f in enumerate(self._flats):
            state = self.inner.state[f.master]
            for k, dst in {"master": f.master.detach(), **state}.items():
                if not f.is_sharded(dst):
                    dst.copy_(whole[f"flat{i}.{k}"])
                    continue
                for j, b in enumerate(f.buckets):
                    start = rank * b.shard_numel  # (torch.chunk's split, as in _sharded)
                    dst[f.slices[j]][:f.valid[j]].copy_(whole[f"flat{i}.bucket{j}.{k}"][start:start + f.valid[j]])
        self._gather_params()

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a dict from state_dict() (after dcp.load, or at the same world size); collective: the
        parameters are re-gathered from the loaded master shards."""
        from torch.distributed.tensor import DTensor

        for g, saved in zip(self.param_groups, state_dict["param_groups"]):
            g.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items()})
        for i, f in enumerate(self._flats):
            state = self.inner.state[f.master]
            for k, dst in {"master": f.master.detach(), **state}.items():
                if not f.is_sharded(dst):  # (the step: every entry is a tensor, made by _init_state)
                    dst.copy_(state_dict[f"flat{i}.{k}"])
                    continue
                for j, b in enumerate(f.buckets):
                    name = f"flat{i}.bucket{j}.{k}"
                    src = state_dict.get(name)
                    if src is None or (isinstance(src, DTensor) and src.shape != (b.numel,)):
                        got = "nothing" if src is None else f"{src.shape[0]} elements"
                        raise ValueError(f"{name} should hold {b.numel} elements, the checkpoint has {got}: "
                                         "the model, its param groups or bucket_mb differ")
                    src = src.to_local() if isinstance(src, DTensor) else src
                    piece = dst[f.slices[j]][:f.valid[j]]
                    # A shard of another world size (a state_dict() torch.save'd at W ranks, loaded at W')
                    # has another length: its first elements were copied silently, the wrong ones.
                    if src.numel() != f.valid[j]:
                        raise ValueError(
                            f"{name}: expected this rank's shard, {f.valid[j]} of the bucket's {b.numel} elements "
                            f"(rank {self.comm.rank} of {self.comm.world_size}), got {src.numel()}: a state_dict() "
                            "saved at another world size loads only through torch.distributed.checkpoint (dcp.load "
                            "into this optimizer's state_dict(), then load_state_dict)")
                    if src.data_ptr() != piece.data_ptr():
                        piece.copy_(src.reshape(-1))
        self._gather_params()
