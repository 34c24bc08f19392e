"""Parallelism for the trainer: one DeviceMesh ("dp", "tp"), or ("dp_replicate", "dp_shard", "tp")
under hybrid sharding, and one apply_* function per kind.

    parallel.data      = "none" | "ddp" | "fsdp2" | "zero1"   data parallelism over the "dp" mesh dim
    parallel.tensor    = N                                     tensor parallelism over the "tp" mesh dim
    parallel.replicate = R   fsdp2's "dp" dim split into ("dp_replicate", "dp_shard"): HSDP

Ranks are laid out tp-innermost (rank = dp_rank * tp + tp_rank), so a tensor-parallel group is N
consecutive ranks: on one node with NVLink when N <= the GPUs per node. A tensor-parallel group reads
the same batches (the loader is sharded by dp rank). Under HSDP, dp_rank = replica * K + shard_rank
with K = dp / R: a shard group is K consecutive dp ranks (one node), a replicate group is strided.

- ddp: torch DistributedDataParallel (bucketed all-reduce overlapping the backward).
- fsdp2: torch fully_shard on every block, then on the whole model (params, grads and optimizer
  state sharded over dp, in fp32; parameters all-gathered per block in forward and backward: in bf16
  under bf16 autocast, the gradients reduce-scattered in fp32; see fsdp2_block_policy). With
  parallel.replicate R > 1 (hybrid sharded data parallelism), fully_shard on the 2-D
  ("dp_replicate", "dp_shard") mesh: sharded over the K = dp / R ranks of a shard group (the
  all-gathers and reduce-scatters stay there), each gradient shard then all-reduced over the R
  replicas (placements (Replicate(), Shard(0))).
- zero1: the model stays as it is; fmcore.dist.ZeroAdamW shards the optimizer over dp and averages
  the gradients (bucketed reduce-scatters started in the backward, shard update, all-gather).
- tensor: DTensor tensor parallelism (parallelize_module; alone or with fsdp2: a 2-D mesh, 3-D with
  HSDP) of each block's attention and MLP, Megatron-style: q/k/v and the MLP's first projection
  column-parallel (each rank keeps n_heads/N heads and ffn/N hidden units), the output projections
  row-parallel (an all-reduce in the forward).
  The fused projections (GPT-2's qkv, Llama's wqkv and w_gate_up) are first split into one Linear per
  part, so each rank gets whole heads of q, k and v rather than a slice of the fused rows.
  Embeddings, norms and the head stay replicated; q/k/v biases (Qwen2) shard with their columns, and
  the q/k norms (Qwen3, over head_dim) apply to each rank's heads, their gradients summed over tp.

The optimizer updates DTensor parameters (fsdp2, tensor) shard by shard, FusedAdamW included (with
the norm clipped globally by clip_grad_norm_ below rather than fused into its step).

The trainer calls apply_parallelism(model, cfg, precision, device, materialize) on a model built on the
meta device (materialize gives each rank its shards of the initial weights), build_optimizer(...) for
zero1, clip_grad_norm_(...) instead of torch's (it handles DTensor gradients and ZeRO-1 shards), and
checkpoint state through model_optim_state_dict / load_model_optim_state_dict.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

_MESH = None  # the DeviceMesh of this process, and what it was made for: (shape, device type, timeout)
_MESH_KEY = None


def ensure_process_group(device: torch.device) -> None:
    """A 1-rank process group when none exists (a single process running fsdp2, zero1 or tensor
    parallelism, e.g. to load a checkpoint saved on more ranks)."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def data_parallel_coords(rank: int, world: int, tensor: int) -> tuple[int, int]:
    """(dp rank, dp world size) of a process: ranks are tp-innermost."""
    if tensor < 1 or world % tensor:
        from fmcore.train.config import ConfigError

        raise ConfigError(f"parallel.tensor ({tensor}) must divide the number of processes ({world})")
    return rank // tensor, world // tensor


def check_layout(data: str, tensor: int, world: int, precision: str, replicate: int) -> None:
    """The layouts `fmcore train` refuses, as ConfigErrors naming the fix: the trainer checks them at
    its start, and `fmcore plan-memory` before it plans one (a plan of a layout that cannot run would
    only mislead)."""
    from fmcore.train.config import ConfigError

    dp = data_parallel_coords(0, world, tensor)[1]
    if replicate < 1 or dp % replicate:
        raise ConfigError(f"parallel.replicate ({replicate}) must divide the data-parallel processes ({dp}: "
                          f"{world} processes / parallel.tensor {tensor})")
    if data == "none" and dp > 1:
        # (with tensor parallelism too: replicas whose gradients nothing averages drift apart silently)
        raise ConfigError(f"launched with {world} processes (parallel.tensor {tensor}: {dp} data-parallel replicas) "
                          "but parallel.data is 'none': pass --parallel.data ddp|fsdp2|zero1"
                          + (" (or --parallel.tensor N)" if tensor == 1 else ""))
    if data in ("zero1", "ddp") and tensor > 1:
        # zero1 flattens plain tensors, not DTensors; DDP over DTensor parameters trains but its state
        # dict does not map back to parameter names for torch.distributed.checkpoint.
        raise ConfigError(f"parallel.data '{data}' with parallel.tensor > 1 is not supported: use 'fsdp2' (or "
                          "'none' on one data-parallel rank) with tensor parallelism")
    if data == "zero1" and precision == "fp16":
        # GradScaler decides to skip a step from this rank's local gradients, before ZeroAdamW averages
        # them: ranks could disagree and one would wait forever in the step's collectives.
        raise ConfigError("parallel.data 'zero1' does not support train.precision 'fp16' (use bf16-autocast)")


def mesh_shape(world: int, tensor: int, replicate: int) -> dict[str, int]:
    """The mesh's dims and sizes, outermost first: ("dp", "tp"), or under hybrid sharding (replicate
    > 1) ("dp_replicate", "dp_shard", "tp"), the dp rank replica * K + shard rank."""
    dp = data_parallel_coords(0, world, tensor)[1]
    if replicate == 1:
        return {"dp": dp, "tp": tensor}
    return {"dp_replicate": replicate, "dp_shard": dp // replicate, "tp": tensor}


def data_parallel_mesh(m):
    """The mesh (a slice of m) that fsdp2 shards over: "dp", or ("dp_replicate", "dp_shard") (HSDP)."""
    return m["dp"] if "dp" in m.mesh_dim_names else m["dp_replicate", "dp_shard"]


def mesh(cfg, device: torch.device):
    """The DeviceMesh over all ranks (created once): ("dp", "tp"), or ("dp_replicate", "dp_shard",
    "tp") with parallel.replicate > 1 (see mesh_shape)."""
    global _MESH, _MESH_KEY
    world = dist.get_world_size()
    shape = mesh_shape(world, cfg.parallel.tensor, cfg.parallel.replicate)  # (validates parallel.tensor)
    # (the timeout too: runs of a sweep in a caller's process group share the mesh, not their timeouts)
    key = (tuple(shape.items()), device.type, cfg.parallel.timeout_s)
    if _MESH is None or _MESH_KEY != key:
        # A collective of the default group first: making a group is a rendezvous through the store, which
        # does not notice a rank that died before it (a data error or an out-of-memory building its model
        # on one rank): the others waited there parallel.timeout_s (10 minutes by default), then failed with
        # "DistStoreError: wait timeout ... keys: /default_pg/0//1//cpu//0/5". A dead peer fails the barrier
        # at once on gloo ("Connection closed by peer"), as it fails the run's other collectives. (On NCCL,
        # naming the GPU: else torch warns on every rank that it guesses one.)
        dist.barrier(device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)
        # The mesh's groups made here, with parallel.timeout_s: init_device_mesh makes every dim that
        # does not span the world (all of a 2-D or 3-D mesh) with torch's default timeout (gloo 30 min,
        # NCCL 10 min), so a hung rank held the tensor- and data-parallel collectives that long.
        from torch.distributed.device_mesh import DeviceMesh

        timeout = timedelta(seconds=cfg.parallel.timeout_s)
        ranks = torch.arange(world).view(*shape.values())
        # one dim's groups: the ranks that differ only in that dim's coordinate (for ("dp", "tp"): a
        # column of the rank grid, and a row)
        groups = [dist.new_subgroups_by_enumeration(ranks.movedim(dim, -1).reshape(-1, size).tolist(),
                                                    timeout=timeout)[0] for dim, size in enumerate(shape.values())]
        _MESH = DeviceMesh.from_group(groups, device.type, mesh=ranks, mesh_dim_names=tuple(shape))
        _MESH_KEY = key
    return _MESH


def forget_mesh() -> None:
    """Drops the DeviceMesh before its process group is destroyed: its groups are that group's, and a
    later run in this process makes a new one."""
    global _MESH, _MESH_KEY
    _MESH = _MESH_KEY = None


def apply_parallelism(model: nn.Module, cfg, precision: str, device: torch.device,
                      materialize: Callable[[nn.Module], None]) -> nn.Module:
    """The model wrapped or sharded as cfg.parallel asks, for device (collective). model is on the
    meta device (models.build_model(device="meta")): it is sharded there and materialize(model) then
    gives it its weights on device, each rank its own shards; before DDP, which cannot wrap a meta
    model (it broadcasts rank 0's weights at construction). precision: the resolved train.precision
    (fp32, bf16-autocast, bf16, fp16), which chooses fsdp2's all-gather dtype."""
    data, tp = cfg.parallel.data, cfg.parallel.tensor
    check_layout(data, tp, dist.get_world_size() if dist.is_initialized() else tp, precision, cfg.parallel.replicate)
    ensure_process_group(device)
    m = mesh(cfg, device)
    if tp > 1:
        apply_tensor_parallel(model, m["tp"])
    if data == "fsdp2":
        apply_fsdp2(model, data_parallel_mesh(m), precision, device)
    materialize(model)
    return apply_ddp(model, m, device) if data == "ddp" else model


# ---- data parallel

def apply_ddp(model: nn.Module, m, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    # The models' only buffers are RoPE's tables, which every rank computes alike: DDP's default
    # broadcast of them from rank 0 ran before every forward (and split a compiled model's graph).
    # torch 2.14 names that forward_sync_buffers and warns on every rank that broadcast_buffers is
    # deprecated, "IMPORTANT: ..." (its one difference, a broadcast at construction, changes nothing here).
    sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
            else {"broadcast_buffers": False})
    return DDP(model, device_ids=ids, process_group=m["dp"].get_group(), **sync)


def fsdp2_block_policy(precision: str, device: torch.device, ops: str):
    """The MixedPrecisionPolicy of fsdp2's blocks. Under bf16 autocast each block's parameters are
    all-gathered in bf16 (half the bytes of fp32, in the forward and again in the backward) and its
    matmuls read them as they are: autocast would have cast the fp32 weights to these same values.
    The gradients (bf16, as the matmuls make them) are reduce-scattered in fp32, and the sharded
    parameters, their gradients and the optimizer state stay fp32: checkpoints and exports are those
    of a run without it. What changes against one process: the blocks' norm weights and biases are
    applied as bf16 roundings and their gradients rounded to bf16 before the (fp32) reduction.

    cast_forward_inputs=False: FSDP2 would cast a block's floating-point inputs to bf16, and the
    residual stream (h, residual: fp32 under autocast, see add_norm) with them; only the parameters
    are cast. Not on the CPU's torch ops path: CPU autocast has no fp32 rule for layer_norm, whose
    kernel refuses an fp32 input with bf16 weights (the fmcore ops' add_norm takes them; on CUDA
    autocast runs layer_norm and rms_norm in fp32). Other precisions gather the parameters in their
    own dtype: bf16 weights are bf16 already (their gradients too: an fp32 reduce-scatter would round
    the sum to bf16 all the same, for twice the bytes), fp32 is fp32, and fp16 autocast stays as it
    was tested with GradScaler (fp16 all-gathers would be its analogue)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16-autocast" and (device.type == "cuda" or ops == "fmcore"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    return MixedPrecisionPolicy()


def apply_fsdp2(model: nn.Module, dp_mesh, precision: str, device: torch.device) -> None:
    """fully_shard on each block and the model over dp_mesh: 1-D (FSDP), or 2-D (replicate, shard): HSDP."""
    from torch.distributed.fsdp import fully_shard

    # torch warns when a sharded module returns a view (GPT-2's blocks do: F.linear with a bias on a
    # 3-D input returns a view of its 2-D result), as an in-place op on it would bypass FSDP's
    # pre-backward hook. These models never write into a block's output; the next block reads it.
    warnings.filterwarnings("ignore", r"FSDP2-wrapped module \(\w+\) returned a view tensor", UserWarning)
    policy = fsdp2_block_policy(precision, device, model.ops)
    for block in model.blocks:
        fully_shard(block, mesh=dp_mesh, mp_policy=policy)
    # The root group (embeddings, final norm, untied head) stays fp32 on the wire: the embedding's
    # rows start the fp32 residual stream (bf16 ones would round it, and make the first blocks' stream
    # bf16), the final norm applies fp32 weights as in one process, and the head's matmul casts its
    # fp32 weight to bf16 under autocast as one process does. FSDP2 gathers the root once per step
    # (it stays gathered from the forward to the end of the backward), so this costs one fp32
    # all-gather of those weights per step, against two bf16 ones of every block.
    fully_shard(model, mesh=dp_mesh)


def build_optimizer(groups: list[dict], cfg, impl: str, device: torch.device, model: nn.Module):
    """ZeRO-1 AdamW over the "dp" mesh dim (fmcore's NCCL communicator on CUDA when available), for
    a model apply_parallelism laid out (which checked the layout: zero1 refuses fp16 and tensor
    parallelism)."""
    from fmcore.dist import Communicator, ZeroAdamW

    o = cfg.optim
    comm = Communicator(mesh(cfg, device)["dp"].get_group(), device=device,
                        timeout=timedelta(seconds=cfg.parallel.timeout_s))
    return ZeroAdamW(groups, comm, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                     impl="fmcore" if impl == "fmcore" else "torch", module=model)


# ---- tensor parallel

def split_param_groups(groups: list[dict]) -> list[dict]:
    """Each param group split into its DTensor and its plain parameters: torch's foreach and fused
    AdamW batch a group's tensors into one kernel call, which cannot mix the two (tensor parallelism
    leaves embeddings and norms plain)."""
    from torch.distributed.tensor import DTensor

    out = []
    for g in groups:
        for want in (True, False):
            params = [p for p in g["params"] if isinstance(p, DTensor) == want]
            if params:
                out.append({**g, "params": params})
    return out


class SplitLinear(nn.Module):
    """A fused Linear (GPT-2's qkv, Llama's wqkv / w_gate_up) as one Linear per part; forward returns
    the parts concatenated on the last dim, the fused layer's output. Under tensor parallelism each
    part is column-sharded, so the local output is each part's local slice, in the same order."""

    def __init__(self, fused: nn.Linear, sizes: list[int]):
        super().__init__()
        if sum(sizes) != fused.out_features:
            raise ValueError(f"parts {sizes} do not add up to {fused.out_features} outputs")
        self.parts = nn.ModuleList()
        start = 0
        for n in sizes:
            part = nn.Linear(fused.in_features, n, bias=fused.bias is not None, device=fused.weight.device,
                             dtype=fused.weight.dtype)
            with torch.no_grad():
                part.weight.copy_(fused.weight[start:start + n])
                if fused.bias is not None:
                    part.bias.copy_(fused.bias[start:start + n])
            self.parts.append(part)
            start += n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def split_part(name: str) -> tuple[str, int] | None:
    """(the fused layer's name, the part's index) for a SplitLinear part's state dict key
    ("blocks.0.qkv.parts.1.weight" -> ("blocks.0.qkv.weight", 1)), None for any other key."""
    head, sep, tail = name.partition(".parts.")
    if not sep:
        return None
    index, _, leaf = tail.partition(".")
    return f"{head}.{leaf}", int(index)


def split_parts(names) -> dict[str, list[str]]:
    """{the fused layer's name: the names among names of its SplitLinear parts, in part order}."""
    parts: dict[str, list[tuple[int, str]]] = {}
    for name in names:
        if (fused := split_part(name)) is not None:
            parts.setdefault(fused[0], []).append((fused[1], name))
    return {fused: [name for _, name in sorted(mine)] for fused, mine in parts.items()}


def check_tensor_divides(tensor: int, arch: str, n_heads: int, n_kv_heads: int, ffn_dim: int) -> None:
    """Each tensor-parallel rank keeps whole heads (of q, and of k and v) and ffn_dim / tensor hidden
    units: apply_tensor_parallel checks its blocks with it, `fmcore plan-memory` a resolved model config."""
    from fmcore.train.config import ConfigError

    sizes = {"n_heads": n_heads, **({} if arch == "gpt2" else {"n_kv_heads": n_kv_heads}), "ffn_dim": ffn_dim}
    if any(v % tensor for v in sizes.values()):
        named = [f"model.{k} ({v})" for k, v in sizes.items()]
        raise ConfigError(f"parallel.tensor {tensor} must divide {', '.join(named[:-1])} and {named[-1]}")


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Megatron-style tensor parallelism of every block's attention and MLP, in place."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    t = tp_mesh.size()
    col, row = ColwiseParallel(), RowwiseParallel()
    for block in model.blocks:
        if hasattr(block, "qkv"):  # GPT-2
            d = block.qkv.in_features
            check_tensor_divides(t, "gpt2", block.n_heads, block.n_heads, block.fc.out_features)
            block.qkv = SplitLinear(block.qkv, [d, d, d])
            block.fused_bias_gelu = False  # fc's forward must run: its ColwiseParallel hooks are there
            plan = {"qkv.parts.0": col, "qkv.parts.1": col, "qkv.parts.2": col, "attn_out": row,
                    "fc": col, "mlp_out": row}
            block.n_heads //= t
        else:  # Llama
            hq, hk, hd = block.hq, block.hk, block.hd
            f = block.w_down.in_features
            check_tensor_divides(t, "llama", hq, hk, f)
            block.wqkv = SplitLinear(block.wqkv, [hq * hd, hk * hd, hk * hd])
            block.w_gate_up = SplitLinear(block.w_gate_up, [f, f])
            plan = {"wqkv.parts.0": col, "wqkv.parts.1": col, "wqkv.parts.2": col, "wo": row,
                    "w_gate_up.parts.0": col, "w_gate_up.parts.1": col, "w_down": row}
            block.hq, block.hk = hq // t, hk // t
            for norm in (block.q_norm, block.k_norm):  # (qk norm: replicated, on this rank's heads)
                if norm is not None:
                    norm.sum_grad = functools.partial(_sum_grad_over, group=tp_mesh.get_group())
        parallelize_module(block, tp_mesh, plan)
        # (after parallelize_module: this hook runs after RowwiseParallel's, on its local output)
        (block.mlp_out if hasattr(block, "mlp_out") else block.w_down).register_forward_hook(_wait_reduced)


class _SumGrad(torch.autograd.Function):
    """The identity forward; the backward sums the gradient over a process group (Megatron's "copy
    to the tensor-parallel region")."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from torch.distributed import _functional_collectives as funcol

        out = funcol.all_reduce(grad.contiguous(), "sum", ctx.group)
        return (out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out), None


def _sum_grad_over(weight: torch.Tensor, group) -> torch.Tensor:
    """weight, its gradient summed over group's ranks: a replicated weight (Qwen3's q/k norms) that each
    tensor-parallel rank applies to its own heads gets a partial gradient there, and the replicas
    would drift apart (their optimizer steps differ) without the sum."""
    return _SumGrad.apply(weight, group)


def _wait_reduced(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """The MLP's row-parallel output with its all-reduce waited for. RowwiseParallel hands back an
    AsyncCollectiveTensor (the all-reduce still in flight), and the fmcore path's block returns it as
    is (the add into the stream happens in the next norm's kernel): leaving a block wrapped by FSDP2
    and activation checkpointing under torch.compile, torch then fed the all-reduce's backward a plain
    gradient, not a DTensor (AttributeError '_local_tensor' in the first backward; a block of plain
    torch ops returning its branch output hits it too). The next block's first op reads the output
    anyway: the wait loses little overlap."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor, wait_tensor

    # wait_tensor on the subclass itself, whose backward is the identity: output.wait() waits on the
    # unwrapped tensor, which has no autograd history (the MLP and all below it got no gradient).
    return wait_tensor(output) if isinstance(output, AsyncCollectiveTensor) else output


# ---- gradient norm and checkpoints

@torch.no_grad()
def clip_grad_norm_(params: list[torch.Tensor], max_norm: float, optimizer=None) -> torch.Tensor:
    """Global L2 norm of the gradients (returned, as a plain tensor) and, when max_norm is finite and
    > 0, the gradients scaled so it is at most max_norm (torch.nn.utils.clip_grad_norm_'s rule).

    Handles what torch's cannot mix: plain gradients (replicated over the ranks), DTensor gradients
    (tensor-parallel or FSDP2 shards: their local squares are summed over the mesh dims they are
    sharded on, one all-reduce per group of gradients sharing those dims; not over HSDP's replicas,
    which hold the same shards) and ZeroAdamW's shards."""
    from torch.distributed.tensor import DTensor

    from fmcore.dist import ZeroAdamW

    if isinstance(optimizer, ZeroAdamW):
        return optimizer.clip_grad_norm_(max_norm if max_norm != float("inf") else 0.0)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    locals_, groups = [], {}
    for g in grads:
        if isinstance(g, DTensor):
            local = g._local_tensor
            # (not pl.is_shard(): False for the _StridedShard on "dp" that fsdp2 gives a column-parallel
            # weight on a 2-D mesh, whose squares were then summed over tp alone: each dp rank reported, and
            # clipped by, a norm of its own, 1-2% under the global one in 2 x 2 tests)
            dims = tuple(i for i, pl in enumerate(g.placements) if not (pl.is_replicate() or pl.is_partial()))
            key = (id(g.device_mesh), dims)
            groups.setdefault(key, (g.device_mesh, dims, []))[2].append(local)
            locals_.append(local)
        else:
            groups.setdefault(None, (None, (), []))[2].append(g)
            locals_.append(g)
    device = locals_[0].device
    total = torch.zeros((), dtype=torch.float32, device=device)
    for mesh_, dims, tensors in groups.values():
        sq = torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32) ** 2 for t in tensors]).sum()
        for dim in dims:
            dist.all_reduce(sq, group=mesh_.get_group(dim))
        total += sq
    norm = total.sqrt()
    if 0 < max_norm < float("inf"):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(locals_, coef)
    return norm


class GradScaler(torch.amp.GradScaler):
    """torch.amp.GradScaler for DTensor gradients. torch unscales (and checks for inf) a device's
    gradients of one dtype in one call, whose DTensor handler reduces the found-inf flag over the first
    gradient's mesh and placements alone: tensor parallelism's sharded gradients beside its plain ones
    (embeddings, norms) failed there ("got mixed torch.Tensor and DTensor"), and with fsdp2 + tensor
    whose first gradient is replicated over tp (optim.decay_embeddings: the embedding's, on the 1-D dp
    mesh) an inf in one tp rank's shard was that rank's alone: the other stepped and kept its scale,
    and the replicated weights drifted apart. Here one call per kind of gradient (the plain ones, then
    each mesh and placements), each DTensor call reducing its flag (max) over its shards' mesh dims,
    and the step skipped when any flag is set. (The plain gradients are the same on every rank.)"""

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        import logging
        from types import SimpleNamespace

        from torch.distributed.tensor import DTensor

        kinds = {None: []}  # (the same order on every rank: the calls are collectives)
        for group in optimizer.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is not None:
                    key = (id(g.device_mesh), tuple(g.placements)) if isinstance(g, DTensor) else None
                    kinds.setdefault(key, []).append(p)
        out = {}
        # (torch logs that a 2-D mesh's flag takes two all-reduces, "may give inconsistent results": a max
        # of 0s and 1s does not; at the first fp16 step of every fsdp2 + tensor run it read as an alarm)
        redistribute = logging.getLogger("torch.distributed.tensor._redistribute")
        level = redistribute.level
        redistribute.setLevel(logging.ERROR)
        try:
            for params in kinds.values():
                if params:
                    # (each call writes a copy of found_inf per device: the step is skipped when any has an inf)
                    got = super()._unscale_grads_(SimpleNamespace(param_groups=[{"params": params}]), inv_scale,
                                                  found_inf, allow_fp16)
                    for device, flag in got.items():
                        out[device] = torch.maximum(out[device], flag) if device in out else flag
        finally:
            redistribute.setLevel(level)
        return out


def model_optim_state_dict(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts for torch.distributed.checkpoint in every layout."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    from fmcore.dist import ZeroAdamW

    if isinstance(optimizer, ZeroAdamW):
        return get_model_state_dict(model), optimizer.state_dict()
    fresh = not optimizer.state
    model_sd, optim_sd = get_state_dict(model, optimizer)
    if fresh:
        # No step applied yet (every step so far skipped: an fp16 overflow streak, non-finite losses).
        # get_state_dict made the state to save with a step() of zero gradients at lr 0: zero moments,
        # but torch.optim.AdamW counted that step, so its first real step corrected its bias as a second
        # one (a 0.74x update): a checkpoint taken then changed the run that followed. Counted back to 0,
        # the state is what a first step starts from, in this run and in one resumed from the checkpoint.
        for state in [*optimizer.state.values(), *optim_sd.get("state", {}).values()]:
            if torch.is_tensor(state.get("step")):  # (a tensor in torch's optimizers and FusedAdamW)
                state["step"].zero_()
    return model_sd, optim_sd


def full_state_dicts(model: nn.Module, optimizer=None) -> tuple[dict, dict]:
    """(model, optimizer) state dicts of whole tensors on rank 0's CPU ({} on the other ranks, and for the
    optimizer without one). Collective: the shards (fsdp2, tensor parallelism) are gathered.

    torch logs, on every rank, that gathering a 2-D mesh's (_StridedShard, Shard) tensors takes two
    all-gathers and "may give inconsistent results between ranks due to different reduction orders":
    an all-gather reduces nothing, and at the end of every fsdp2 + tensor run (the export) it read as
    an alarm. Quietened here."""
    import logging

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    redistribute = logging.getLogger("torch.distributed.tensor._redistribute")
    level = redistribute.level
    redistribute.setLevel(logging.ERROR)
    try:
        if optimizer is None:
            return get_model_state_dict(model, options=options), {}
        return get_state_dict(model, optimizer, options=options)
    finally:
        redistribute.setLevel(level)


def load_model_optim_state_dict(model: nn.Module, optimizer, model_sd: dict, optim_sd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    from fmcore.dist import ZeroAdamW

    if isinstance(optimizer, ZeroAdamW):
        set_model_state_dict(model, model_sd)
        optimizer.load_state_dict(optim_sd)
        return
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
