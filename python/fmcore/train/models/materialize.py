"""Weights for a model built on the meta device: the trainer builds the model there, shards it (tensor
parallelism, fsdp2) while it holds no memory, and only then gives each rank its own shards of the
initial weights. A rank never holds the whole model unless its layout keeps a whole copy (one
process, ddp, zero1): fsdp2 on 64 GPUs can start a model whose fp32 weights do not fit one GPU.

    model = build_model(mcfg, device="meta")                       # shapes and dtypes only
    ...                                                            # fully_shard / parallelize_module
    materialize(model, device, model.initial_weights(seed))        # or init_from.weights(...)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def materialize(model: nn.Module, device: torch.device | str,
                weights: Iterable[tuple[str, torch.Tensor]] | None) -> None:
    """Allocate model's parameters and buffers on device (each rank's shards only, for a sharded
    model), fill the parameters from weights (fill) and recompute the buffers (reset_buffers).
    weights None leaves the parameters unset (torch.empty's memory): for a resume, whose checkpoint
    then loads every one of them (DCP refuses a checkpoint that lacks one)."""
    model.to_empty(device=device)
    if weights is not None:
        fill(model, weights)
    model.reset_buffers()


@torch.no_grad()
def fill(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy weights' whole tensors, (parameter name, tensor) pairs, into model's parameters, cast to
    their dtype; a DTensor parameter (tensor parallelism, fsdp2) takes only its local shard, cut from
    the whole tensor by its own placements, without any communication. A fused projection that tensor
    parallelism split into parts ("wqkv.weight" into "wqkv.parts.K.weight", parallel.SplitLinear) is
    cut into its parts' rows. Every parameter must be given once."""
    from fmcore.train.parallel import split_parts

    params = dict(model.named_parameters())
    parts = split_parts(params)
    filled = set()
    for name, whole in weights:
        if name in params:
            pieces = [(name, whole)]
        elif name in parts:
            names = parts[name]
            rows = [params[part].shape[0] for part in names]
            if sum(rows) != whole.shape[0]:
                raise ValueError(f"weights give {name!r} {whole.shape[0]} rows, its parts {names} have {sum(rows)}")
            pieces = list(zip(names, whole.split(rows), strict=True))
        else:
            raise KeyError(f"weights give {name!r}, which the model does not have")
        for part, value in pieces:
            param = params[part]
            if part in filled:
                raise KeyError(f"weights give {name!r} twice")
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"weights give {name!r} the shape {tuple(value.shape)}, the model's is "
                                 f"{tuple(param.shape)}")
            _local(param).copy_(_local_part(value, param))
            filled.add(part)
    if filled != set(params):
        raise KeyError(f"weights give no value for {sorted(set(params) - filled)}")


def rows_held(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """{whole parameter's name: the rows (dim 0) of its whole tensor that this rank's model holds, as
    ascending indices, or None for all of them}. A whole parameter is one of the model's own or a fused
    projection that tensor parallelism split into parts (fill cuts it into its parts' rows, one part
    after another). A plain tensor holds every row; a DTensor the rows of its local shard."""
    from fmcore.train.parallel import split_part, split_parts

    params = dict(model.named_parameters())
    wholes = {name: [name] for name in params if split_part(name) is None} | split_parts(params)
    held: dict[str, torch.Tensor | None] = {}
    for name, pieces in wholes.items():
        rows = [_rows_of_local(params[piece]) for piece in pieces]
        if all(r is None for r in rows):
            held[name] = None
            continue
        offset, mine = 0, []
        for piece, r in zip(pieces, rows, strict=True):
            n = params[piece].shape[0]
            mine.append(offset + (torch.arange(n) if r is None else r))
            offset += n
        held[name] = torch.cat(mine)
    return held


def _rows_of_local(param: torch.Tensor) -> torch.Tensor | None:
    """The rows of param's whole tensor that its local shard holds (None: all): fill's cut of the row
    numbers alone, since only a shard of dim 0 (plain or fsdp2's strided one) drops rows."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    if not isinstance(param, DTensor) or all(getattr(p, "dim", None) != 0 for p in param.placements):
        return None
    placements = [p if getattr(p, "dim", None) == 0 else Replicate() for p in param.placements]
    whole_rows = torch.arange(param.shape[0])
    return distribute_tensor(whole_rows, param.device_mesh, placements, src_data_rank=None).to_local().cpu()


def _local(param: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param


def _local_part(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The part of whole that param holds on this rank: all of it, or a DTensor's local shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return whole
    if all(getattr(p, "dim", 0) == 0 for p in param.placements):  # sharded by rows alone (fsdp2's usual)
        rows = _rows_of_local(param)
        if rows is None:
            return whole
        first = int(rows[0]) if rows.numel() else 0
        if torch.equal(rows, torch.arange(first, first + rows.numel())):
            # Consecutive rows: a view, copied once into the parameter (distribute_tensor's shard is a
            # copy, which made a rank's cut of its weights take as long as drawing them).
            return whole[first:first + rows.numel()]
    # src_data_rank=None: each rank cuts its own shard from its own copy (every rank drew the same
    # whole tensor), where the default scatters rank 0's. It follows the placements as they are,
    # fsdp2's strided sharding of a tensor-parallel dim included.
    return distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None).to_local()
