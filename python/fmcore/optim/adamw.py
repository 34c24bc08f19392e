"""FusedAdamW: torch.optim.AdamW's update in one multi-tensor kernel, with gradient clipping folded in.

Per step: (optionally) one multi-tensor pass that computes the global gradient norm on the device,
then per param group and dtype one or a few launches that update params and state. With
``max_grad_norm`` the clip factor min(1, max_grad_norm / (norm + 1e-6)) is applied to the gradients
inside the update (they are read once and never rewritten), so clipping costs one extra read of the
gradients instead of torch's norm pass plus a read-and-write scaling pass. Nothing is read back to
the host, so a step can be captured in a CUDA graph (use a 0-dim device tensor as lr for schedules).

Semantics and state layout are torch.optim.AdamW's (decoupled weight decay, bias correction;
``state[p]`` holds ``step`` (0-dim fp32 on the param's device), ``exp_avg`` and ``exp_avg_sq``), so a
checkpoint of either optimizer loads into the other. Differences: the state is always fp32 (also for
bf16/fp16 params); with ``master_weights`` it also holds ``master_param``, an fp32 copy that the
update reads and writes and rounds into the bf16/fp16 param; ``p.grad`` is left unclipped.

DTensor params (FSDP2's fully_shard, tensor parallelism) are updated shard by shard: the update is
elementwise, so each rank's kernel runs on its local shards and the state is DTensor like the param
(torch.distributed.checkpoint saves and reshards it as torch.optim.AdamW's). The fused norm would
see one rank's shards only, so max_grad_norm and skip_nonfinite are refused there: clip the global
norm before step() (torch.nn.utils.clip_grad_norm_).
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Callable
from itertools import chain

import torch

import fmcore.ops.adamw  # noqa: F401  (registers the fake implementations)

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without torch.distributed: isinstance(x, ()) is always False
    DTensor = ()

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
# What FusedAdamW adds to an Optimizer's pickled state (defaults, state, param_groups).
_OWN_ATTRIBUTES = ("max_grad_norm", "master_weights", "skip_nonfinite", "last_grad_norm", "skipped_steps", "_device")


class FusedAdamW(torch.optim.Optimizer):
    """AdamW with decoupled weight decay, fused gradient clipping and optional fp32 master weights.

    Args:
        params: tensors or param groups (dicts with their own lr/betas/eps/weight_decay). Params must
            be contiguous float32, bfloat16 or float16 tensors (or DTensors with contiguous local
            shards), all on one device.
        lr: float, or a 0-dim tensor (on the params' device it is read on the device at run time, so
            a schedule that writes into it works under CUDA graphs).
        betas, eps, weight_decay: as torch.optim.AdamW.
        max_grad_norm: clip the gradients to this global L2 norm (over every param with a grad, all
            groups), as torch.nn.utils.clip_grad_norm_ would before the step. ``float('inf')``
            computes the norm (``last_grad_norm``) without clipping. As with clip_grad_norm_, a
            nan gradient makes the factor nan and so every param nan: use skip_nonfinite to skip
            such steps instead.
        master_weights: keep an fp32 copy of each bf16/fp16 param in the state; the update reads and
            writes it and rounds the result into the param in the same pass (fp32 params need none).
            An element of a param edited since the last step (model.load_state_dict, an EMA copy-back:
            it no longer holds its master rounded) is updated from the param instead.
        skip_nonfinite: when the gradient norm is inf or nan, leave params and state unchanged and add
            one to ``skipped_steps`` (all decided on the device).
        amsgrad, maximize, differentiable: torch.optim.AdamW's, False only (True raises ValueError,
            in a param group too).
        foreach, fused, capturable: taken for torch.optim.AdamW's signature and not needed: the update
            is always one fused multi-tensor pass that reads nothing back to the host.

    Attributes:
        last_grad_norm: 0-dim fp32 tensor on the params' device holding the global gradient norm of
            the last step (before clipping), 0 before the first; None unless max_grad_norm or
            skip_nonfinite is set (only then is the norm computed). Reading it with ``.item()``
            synchronises; the step does not.
        skipped_steps: 0-dim int64 tensor on the params' device counting skipped steps (None without
            skip_nonfinite).
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        skip_nonfinite: bool = False,
        amsgrad: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ):
        if max_grad_norm is not None and not max_grad_norm >= 0.0:
            raise ValueError(f"expected max_grad_norm >= 0 or None, got {max_grad_norm}")
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.master_weights = bool(master_weights)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.last_grad_norm: torch.Tensor | None = None
        self.skipped_steps: torch.Tensor | None = None
        self._device: torch.device | None = None
        self._cached_plan: tuple | None = None
        # (amsgrad & co. in the defaults, so the group check below refuses True as it does in a group)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        differentiable=differentiable)
        super().__init__(params, defaults)
        # Allocated once, here: fixed addresses for CUDA graphs, and no attribute created inside a
        # step that torch.compile traces.
        if self.max_grad_norm is not None or self.skip_nonfinite:
            self.last_grad_norm = torch.zeros((), dtype=torch.float32, device=self._device)
        if self.skip_nonfinite:
            self.skipped_steps = torch.zeros((), dtype=torch.int64, device=self._device)

    # ---- param groups and state

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1], len(self.param_groups) - 1)
        except Exception:
            self.param_groups.pop()  # a rejected group leaves the optimizer as it was
            raise
        self._cached_plan = None

    def _check_group(self, group: dict, index: int) -> None:
        _check_hyperparameters(group)
        device = self._device
        seen: dict[int, int] = {}
        for i, p in enumerate(group["params"]):
            where = f"param {i} of group {index}"
            # torch.optim only warns here. A param listed twice would sit twice in one kernel launch
            # table: two blocks updating the same elements (and two threads bumping one step count)
            # at once, a data race whose result is neither one step nor two.
            if id(p) in seen:
                raise ValueError(f"FusedAdamW got the same param twice in group {index} (params {seen[id(p)]} "
                                 f"and {i}); list each param once")
            seen[id(p)] = i
            if p.dtype not in _SUPPORTED:
                raise ValueError(f"FusedAdamW supports float32, bfloat16 and float16 params, got {p.dtype} ({where})")
            if not _local(p).is_contiguous():
                raise ValueError(
                    f"FusedAdamW needs contiguous params, got strides {tuple(_local(p).stride())} for shape "
                    f"{tuple(_local(p).shape)} ({where}); call .contiguous() on it before building the module"
                )
            if isinstance(p, DTensor) and (self.max_grad_norm is not None or self.skip_nonfinite):
                raise ValueError(
                    f"FusedAdamW's max_grad_norm and skip_nonfinite would compute the gradient norm of this "
                    f"process's shard of a DTensor param ({where}), not the global one: clip with "
                    f"torch.nn.utils.clip_grad_norm_ before step() and pass neither"
                )
            if device is None:
                device = p.device
            elif p.device != device:
                raise RuntimeError(f"FusedAdamW needs every param on one device: {where} is on {p.device}, "
                                   f"the first param on {device}")
        if self._device is None and device is not None:
            # The first params, after a first group without any ([{"params": []}], then add_param_group):
            # the norm and skip counter were made on the CPU, and the first CUDA step refused them
            # ("got tensors on cuda:0 and norm on cpu"). No step has read them yet (none had params).
            for name in ("last_grad_norm", "skipped_steps"):
                if getattr(self, name) is not None:
                    setattr(self, name, getattr(self, name).to(device))
        self._device = device

    def _uses_master(self, p: torch.Tensor) -> bool:
        return self.master_weights and p.dtype != torch.float32

    def _fp32_like(self, p: torch.Tensor, value: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(p, DTensor):  # sharded as p is
            out = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            return out if value is None else out.copy_(value)
        out = torch.empty(p.shape, dtype=torch.float32, device=p.device)
        return out.zero_() if value is None else out.copy_(value)

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = self._fp32_like(p)
        state["exp_avg_sq"] = self._fp32_like(p)
        if self._uses_master(p):
            state["master_param"] = self._fp32_like(p, p.detach())

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a FusedAdamW or torch.optim.AdamW state dict. State is kept in fp32 whatever the
        checkpoint's dtype (torch's loader would cast it to the param dtype); a missing master copy
        (a torch.optim.AdamW checkpoint) is made from the param at the next step, so from the
        weights loaded by then, before or after this state. Load-state-dict pre- and post-hooks run
        as torch.optim's do: the pre-hooks first (they may return another dict), the post-hooks once
        the state is final."""
        state_dict = state_dict.copy()  # as torch's: what a pre-hook assigns stays out of the caller's dict
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            state_dict = state_dict if result is None else result
        for group in state_dict["param_groups"]:
            _check_hyperparameters(group)
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        # Only where the groups match, else torch's loader below says which group differs (the same
        # params grouped otherwise were "a state dict of another model")
        if [len(g["params"]) for g in state_dict["param_groups"]] == [len(g["params"]) for g in self.param_groups]:
            _check_state_shapes(state_dict["state"], state_dict["param_groups"], self.param_groups)
        # torch's loader without its hooks (run here, around the fp32 conversion it would undo)
        pre, post = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = pre, post
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if not saved:
                continue
            state = {
                "step": torch.zeros((), dtype=torch.float32, device=p.device).copy_(torch.as_tensor(saved["step"])),
                "exp_avg": self._fp32_like(p, saved["exp_avg"]),
                "exp_avg_sq": self._fp32_like(p, saved["exp_avg_sq"]),
            }
            if self._uses_master(p) and "master_param" in saved:
                state["master_param"] = self._fp32_like(p, saved["master_param"])
            # (else the step makes it: made here from a param whose weights were loaded after this,
            # it resumed training from the weights the model had before)
            self.state[p] = state
        self._cached_plan = None
        for hook in post.values():
            hook(self)

    def __getstate__(self) -> dict:
        # torch.optim.Optimizer pickles defaults, state and param_groups only: a deepcopied or
        # unpickled FusedAdamW needs its options and device-side counters too.
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in _OWN_ATTRIBUTES})
        return state

    # ---- the step

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)  # also the last act of load_state_dict
        self._cached_plan = None

    def _plan(self) -> list[tuple]:
        """Per param group and dtype: (group, owners, params, exp_avgs, exp_avg_sqs, masters, steps)
        over the params that have a grad (owners: the params whose .grad a step reads), creating
        missing state. Cached while the same params have grads, so
        a step only collects the grads; add_param_group and load_state_dict drop the cache."""
        if torch.compiler.is_compiling():
            # Dynamo guards on the grads itself; torch 2.11's dynamo also refuses the cache's setattr.
            return self._build_plan()
        # What the plan depends on, compared by identity: which params (a group's list replaced),
        # their state dicts (the state reset or a param's entry replaced: opt.state = ..., .clear(),
        # del), what those hold (a moment or step tensor assigned anew: torch.optim.AdamW reads
        # them at every step), which params have grads and the params' dtypes (model.to(bf16) keeps
        # the Parameters: the old plan stepped them without master copies). The objects are kept, not
        # their id()s: a freed state dict's id was the next dict's (del opt.state[p] then a new
        # dict stepped the old tensors). ~45 us for 150 params (the grads alone: ~9).
        params = [p for g in self.param_groups for p in g["params"]]
        states = list(map(self.state.get, params))
        key = [self.state, *(g["params"] for g in self.param_groups), *states,
               *chain.from_iterable(map(dict.values, filter(None, states))),
               *(p.grad is not None for p in params), *(p.dtype for p in params)]
        cached = self._cached_plan
        if cached is not None and len(cached[0]) == len(key) and all(map(operator.is_, cached[0], key)):
            return cached[1]
        plan = self._build_plan()
        self._cached_plan = (key, plan)
        return plan

    def _build_plan(self) -> list[tuple]:
        """The lists hold what the kernels update: the local shards of DTensor params and state."""
        plan = []
        for group in self.param_groups:
            by_dtype: dict[torch.dtype, tuple[list, ...]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(p, state)
                elif self._uses_master(p) and "master_param" not in state:
                    # A torch.optim.AdamW checkpoint loaded, a state made by hand, or the param made
                    # bf16 after its state (model.to; the step raised KeyError): from the param.
                    state["master_param"] = self._fp32_like(p, p.detach())
                owners, params, exp_avgs, exp_avg_sqs, masters, steps = by_dtype.setdefault(
                    p.dtype, ([], [], [], [], [], []))
                owners.append(p)
                params.append(_local(p))
                exp_avgs.append(_local(state["exp_avg"]))
                exp_avg_sqs.append(_local(state["exp_avg_sq"]))
                if self._uses_master(p):
                    masters.append(_local(state["master_param"]))
                steps.append(state["step"])
            plan += [(group, *lists) for lists in by_dtype.values()]
        return plan

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:  # set on a group after construction (add_param_group checks them)
            _check_flags(group)
        plan = self._plan()
        if not plan:
            return loss
        grads = [[_dense_grad(p) for p in bucket[1]] for bucket in plan]
        norm = self.last_grad_norm
        if norm is not None:
            all_grads = [g for bucket_grads in grads for g in bucket_grads]
            torch.ops.fmcore.grad_norm_(all_grads, norm, self.skipped_steps)
        device = self._device
        for (group, _, params, exp_avgs, exp_avg_sqs, masters, steps), bucket_grads in zip(plan, grads):
            lr_tensor, lr = _lr_args(group["lr"], device)
            beta1, beta2 = group["betas"]
            torch.ops.fmcore.adamw_step_(
                params, bucket_grads, exp_avgs, exp_avg_sqs, masters, steps, lr_tensor, lr, float(beta1),
                float(beta2), float(group["eps"]), float(group["weight_decay"]), norm, self.max_grad_norm,
                self.skip_nonfinite,
            )
        return loss


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the same memory: updating it updates the DTensor), else t itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _dense_grad(p: torch.Tensor) -> torch.Tensor:
    grad = _local(p.grad)
    if grad.is_sparse:
        raise ValueError(f"FusedAdamW does not support sparse gradients (a param of shape {tuple(p.shape)})")
    return grad if grad.is_contiguous() else grad.contiguous()


def _lr_args(lr, device: torch.device) -> tuple[torch.Tensor | None, float]:
    """(lr_tensor, lr) for the op: a tensor on the params' device is read on the device; a CPU tensor
    with device params is read on the host (no GPU sync), as is a float."""
    if not isinstance(lr, torch.Tensor):
        return None, float(lr)
    if lr.numel() != 1:
        raise ValueError(f"expected lr to be a float or a one-element tensor, got shape {tuple(lr.shape)}")
    if lr.device == device:
        return (lr if lr.dtype == torch.float32 else lr.float()), 0.0
    if lr.device.type == "cpu":
        return None, float(lr)
    raise RuntimeError(f"lr tensor on {lr.device}, params on {device}")


def _check_state_shapes(saved_state: dict, saved_groups: list, groups: list) -> None:
    """Each saved per-element state tensor has its param's shape: Tensor.copy_ would broadcast a
    (7, 5) moment into a (3, 7, 5) param silently."""
    for g, (saved_group, group) in enumerate(zip(saved_groups, groups)):
        for i, (pid, p) in enumerate(zip(saved_group["params"], group["params"])):
            for key, value in (saved_state.get(pid) or {}).items():
                if key != "step" and isinstance(value, torch.Tensor) and value.shape != p.shape:
                    raise ValueError(
                        f"state_dict: {key} of param {i} of group {g} has shape {tuple(value.shape)}, the param "
                        f"{tuple(p.shape)}: a state dict of another model, or of this one's params in another order "
                        f"(state is matched to params by position, as torch.optim does)")


def _check_hyperparameters(group: dict) -> None:
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:  # (read on the device at each step: checked here too, as torch.optim.AdamW does)
            raise ValueError(f"expected lr to be a float or a one-element tensor, got shape {tuple(lr.shape)}")
        if not float(lr) >= 0.0:  # one read of a device tensor here, never in step()
            raise ValueError(f"expected lr >= 0, got {float(lr)} (a tensor)")
    elif not lr >= 0.0:
        raise ValueError(f"expected lr >= 0, got {lr}")
    beta1, beta2 = group["betas"]
    if not 0.0 <= float(beta1) < 1.0 or not 0.0 <= float(beta2) < 1.0:
        raise ValueError(f"expected betas in [0, 1), got {group['betas']}")
    if not group["eps"] >= 0.0:
        raise ValueError(f"expected eps >= 0, got {group['eps']}")
    if not group["weight_decay"] >= 0.0:
        raise ValueError(f"expected weight_decay >= 0, got {group['weight_decay']}")
    _check_flags(group)


def _check_flags(group: dict) -> None:
    """torch.optim.AdamW's flags FusedAdamW refuses (cheap: step() checks them every time)."""
    for flag in ("amsgrad", "maximize"):
        if group.get(flag, False):
            raise ValueError(f"FusedAdamW does not implement {flag}=True")
    if group.get("differentiable", False):  # (the step would run under no_grad: no graph, no error)
        raise ValueError("FusedAdamW does not implement differentiable=True (autograd through the step): "
                         "use torch.optim.AdamW(differentiable=True)")
    if group.get("decoupled_weight_decay", True) is False:
        raise ValueError("FusedAdamW is AdamW (decoupled weight decay); got a torch.optim.Adam group")
