"""ZeRO stage 1: AdamW whose fp32 master weights and moments are sharded over the data-parallel ranks.

    comm = Communicator()
    opt = ZeroAdamW(model.parameters(), comm, lr=3e-4, weight_decay=0.1)   # or param groups
    loss.backward()                          # plain local backward, no hooks
    norm = opt.clip_grad_norm_(1.0)          # optional: reduce-scatter happens here, norm is global
    opt.step()                               # reduce-scatter (if not yet), AdamW on the shard, all-gather
    opt.zero_grad()

Layout. The parameters of each param group (split further by dtype and device) are packed into one
flat buffer of world * S elements, S = ceil(N / world), the tail zero padding; every parameter
becomes a view of it (p.data is re-pointed, so the model keeps its Parameter objects). Rank r owns
elements [r*S, (r+1)*S): an fp32 master copy of them (one nn.Parameter of S elements) that the
inner optimizer (torch.optim.AdamW, or fmcore.optim.FusedAdamW when impl="fmcore") updates, with its
moments, so optimizer state is 3 * 4 * S bytes per rank against DDP's 2 * 4 * N (fp32 params:
1/world of the replicated state plus the master copy; bf16 params: the master copy is the same
one DDP-with-master-weights needs, also 1/world here).

Step. The gradients are copied into a flat gradient buffer (one multi-tensor copy), reduce-scattered
with op avg into this rank's S-element slice, cast to fp32 as the master's gradient; the optimizer
steps the shard; the shard is cast to the parameter dtype and all-gathered into the flat parameter
buffer, which is the parameters. Every call is collective.

Checkpoints. state_dict() describes each shard as a DTensor Shard(0) of the unpadded N-element flat
tensor over the group's DeviceMesh; since torch.chunk (DTensor's split) and this layout agree, the
dict can be saved with torch.distributed.checkpoint on W ranks and loaded on W' ranks (the flat
layout depends only on the model's parameter order and shapes, not on the world size).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from fmcore.dist.comm import Communicator

_HYPER = ("lr", "betas", "eps", "weight_decay")


class _FlatShard:
    """One (param group, dtype, device) slice of the model, flattened and sharded."""

    def __init__(self, group_index: int, params: list[torch.nn.Parameter], world: int, rank: int):
        self.group_index, self.params = group_index, params
        p0 = params[0]
        self.numel = sum(p.numel() for p in params)
        self.shard_numel = max(1, math.ceil(self.numel / world))
        self.valid = min(max(self.numel - rank * self.shard_numel, 0), self.shard_numel)
        padded = world * self.shard_numel
        self.flat_param = torch.zeros(padded, dtype=p0.dtype, device=p0.device)
        self.flat_grad = torch.zeros(padded, dtype=p0.dtype, device=p0.device)  # padding stays 0
        self.param_views, self.grad_views, offset = [], [], 0
        with torch.no_grad():
            for p in params:
                view = self.flat_param[offset:offset + p.numel()].view_as(p)
                view.copy_(p)
                p.data = view  # the parameter now lives in the flat buffer
                self.param_views.append(view)
                self.grad_views.append(self.flat_grad[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        lo = rank * self.shard_numel
        self.param_shard = self.flat_param[lo:lo + self.shard_numel]
        self.grad_shard = torch.empty(self.shard_numel, dtype=p0.dtype, device=p0.device)
        self.send = torch.empty(self.shard_numel, dtype=p0.dtype, device=p0.device)
        self.master = torch.nn.Parameter(self.param_shard.detach().float().clone())


def _inner_optimizer(impl: str, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    if impl == "auto":
        try:
            from fmcore.optim import FusedAdamW  # noqa: F401
            impl = "fmcore"
        except ImportError:
            impl = "torch"
    if impl == "fmcore":
        from fmcore.optim import FusedAdamW

        return FusedAdamW(groups)
    if impl == "torch":
        cuda = device.type == "cuda"
        return torch.optim.AdamW(groups, fused=cuda or None, foreach=None if cuda else True)
    raise ValueError(f"expected impl 'auto', 'fmcore' or 'torch', got {impl!r}")


class ZeroAdamW(torch.optim.Optimizer):
    """AdamW with ZeRO-1 sharding over comm's ranks; a drop-in for torch.optim.AdamW in a data-parallel
    loop (param groups and LR schedulers work: hyperparameters are read from self.param_groups at each
    step). Gradients are averaged over ranks inside step(); do not also wrap the model in DDP."""

    def __init__(self, params: Iterable, comm: Communicator, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 *, impl: str = "auto"):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.comm = comm
        self._flats: list[_FlatShard] = []
        for gi, group in enumerate(self.param_groups):
            split: dict[tuple, list] = {}
            for p in dict.fromkeys(group["params"]):  # dedupe, keep order
                if p.requires_grad:
                    split.setdefault((p.dtype, p.device), []).append(p)
            self._flats += [_FlatShard(gi, ps, comm.world_size, comm.rank) for ps in split.values()]
        if not self._flats:
            raise ValueError("ZeroAdamW got no parameters that require grad")
        inner_groups = [{"params": [f.master], **{k: self.param_groups[f.group_index][k] for k in _HYPER}}
                        for f in self._flats]
        self.inner = _inner_optimizer(impl, inner_groups, self._flats[0].master.device)
        self._init_state()
        self._reduced = False
        self._mesh = None

    # ---- the step
    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Averages the local gradients over ranks into each shard's master gradient (collective).
        step() calls it when clip_grad_norm_ has not."""
        if self._reduced:
            return
        works = []
        for f in self._flats:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in f.params]
            torch._foreach_copy_(f.grad_views, grads)
            works.append(self.comm.reduce_scatter(f.grad_shard, f.flat_grad, "avg", async_op=True))
        for f, work in zip(self._flats, works):
            work.wait()
            f.master.grad = f.grad_shard.float() if f.grad_shard.dtype != torch.float32 else f.grad_shard
        self._reduced = True

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Reduces the gradients, then scales them so their global L2 norm is at most max_norm
        (max_norm <= 0: only measures). Returns the norm before clipping, like
        torch.nn.utils.clip_grad_norm_ on the averaged full gradients."""
        self.reduce_gradients()
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
        self.reduce_gradients()
        for f, inner_group in zip(self._flats, self.inner.param_groups):
            for k in _HYPER:
                inner_group[k] = self.param_groups[f.group_index][k]
        self.inner.step()
        self._gather_params()
        self._reduced = False
        return loss

    def _gather_params(self) -> None:
        for f in self._flats:
            f.send.copy_(f.master)  # cast to the parameter dtype
            self.comm.all_gather(f.flat_param, f.send)

    def zero_grad(self, set_to_none: bool = True) -> None:
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
                         if torch.is_tensor(v) and v.numel() == f.shard_numel)
        return total

    # ---- checkpoints
    def _init_state(self) -> None:
        """Creates the moments now (torch's AdamW does it lazily at the first step), so a checkpoint can
        be loaded into a fresh optimizer."""
        for f in self._flats:
            state = self.inner.state[f.master]
            if state:
                continue
            # torch's AdamW keeps the step on the CPU unless fused/capturable; FusedAdamW on the device.
            on_device = (self.inner.defaults.get("fused") or self.inner.defaults.get("capturable")
                         or not isinstance(self.inner, torch.optim.AdamW))
            step_device = f.master.device if on_device else torch.device("cpu")
            state["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
            state["exp_avg"] = torch.zeros_like(f.master, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(f.master, memory_format=torch.preserve_format)

    def _sharded(self, f: _FlatShard, local: torch.Tensor):
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard

        if self._mesh is None:
            self._mesh = DeviceMesh.from_group(self.comm.group, f.master.device.type)
        return DTensor.from_local(local[:f.valid], self._mesh, [Shard(0)], run_check=False,
                                  shape=torch.Size([f.numel]), stride=(1,))

    def state_dict(self) -> dict:
        """Hyperparameters plus, per flat shard i, DTensors 'flat{i}.master' and 'flat{i}.<state>' over
        the unpadded flat tensor (loadable at another world size through torch.distributed.checkpoint)
        and the replicated scalars ('flat{i}.step'). The tensors alias this optimizer's storage, so
        dcp.load(sd) fills them in place; call load_state_dict(sd) afterwards."""
        sd: dict = {"param_groups": [{k: g[k] for k in _HYPER} for g in self.param_groups]}
        for i, f in enumerate(self._flats):
            sd[f"flat{i}.numel"] = f.numel
            sd[f"flat{i}.master"] = self._sharded(f, f.master.detach())
            for k, v in self.inner.state[f.master].items():
                if torch.is_tensor(v) and v.numel() == f.shard_numel:
                    sd[f"flat{i}.{k}"] = self._sharded(f, v)
                else:
                    sd[f"flat{i}.{k}"] = v
        return sd

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a dict from state_dict() (after dcp.load, or at the same world size); collective: the
        parameters are re-gathered from the loaded master shards."""
        from torch.distributed.tensor import DTensor

        for g, saved in zip(self.param_groups, state_dict["param_groups"]):
            g.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items()})
        for i, f in enumerate(self._flats):
            if state_dict[f"flat{i}.numel"] != f.numel:
                raise ValueError(f"flat shard {i} holds {f.numel} elements but the checkpoint has "
                                 f"{state_dict[f'flat{i}.numel']}: the model or its param groups differ")
            targets = {"master": f.master.detach(), **self.inner.state[f.master]}
            for k, dst in targets.items():
                src = state_dict[f"flat{i}.{k}"]
                if isinstance(src, DTensor):
                    src = src.to_local()
                if torch.is_tensor(dst) and dst.numel() == f.shard_numel:
                    if src.data_ptr() != dst.data_ptr():
                        dst[:f.valid].copy_(src.reshape(-1)[:f.valid])
                elif torch.is_tensor(dst):
                    dst.copy_(src)
                else:
                    self.inner.state[f.master][k] = src
        self._gather_params()
