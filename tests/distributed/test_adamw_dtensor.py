"""FusedAdamW on DTensor params (FSDP2's and tensor parallelism's), on 2 CPU ranks (gloo).

Each rank's kernel updates its local shards; the result must be one process's FusedAdamW on the full
tensors, the state DTensor like the params (so a DCP checkpoint reshards it), and the fused norm,
which would see one rank's shards only, refused.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.launch import run_ranks

# An uneven Shard(0) (7 rows over 2 ranks: 4 + 3), a Shard(1), a replicated bias, and a plain tensor
# beside them in one group.
SHAPES = [(7, 5), (6, 4), (5,), (3, 2)]


def _tensors(seed: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in SHAPES]


def _steps(params: list[torch.Tensor], grads, master: bool, to_grad) -> torch.optim.Optimizer:
    from fmcore.optim import FusedAdamW

    opt = FusedAdamW([{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}],
                     lr=1e-2, betas=(0.8, 0.9), master_weights=master)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = to_grad(p, g)
        opt.step()
    return opt


def _dtensor_body(rank: int, world: int, dtype: torch.dtype, master: bool):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    placements = [Shard(0), Shard(1), Replicate(), None]
    params = [t if pl is None else distribute_tensor(t, mesh, [pl]) for t, pl in zip(_tensors(0, dtype), placements)]
    grads = [_tensors(1 + i, dtype) for i in range(5)]

    def to_grad(p, g):
        return distribute_tensor(g, mesh, p.placements) if isinstance(p, DTensor) else g.clone()

    opt = _steps(params, grads, master, to_grad)
    for p, pl in zip(params, placements):
        state = opt.state[p]
        kinds = {type(state[k]) for k in ("exp_avg", "exp_avg_sq", *(["master_param"] if master else []))}
        assert kinds == {type(p)}, (pl, kinds)
        if pl is not None:
            assert all(state[k].placements == p.placements for k in ("exp_avg", "exp_avg_sq")), pl
    full = [p.full_tensor() if isinstance(p, DTensor) else p for p in params]
    avg = [opt.state[p]["exp_avg"] for p in params]
    return [t.float() for t in full], [(a.full_tensor() if isinstance(a, DTensor) else a) for a in avg]


@pytest.mark.parametrize("dtype, master", [(torch.float32, False), (torch.bfloat16, True)])
def test_dtensor_params_match_one_process(tmp_path, dtype, master):
    got = run_ranks(_dtensor_body, 2, tmp_path, args=(dtype, master))
    params = _tensors(0, dtype)
    opt = _steps(params, [_tensors(1 + i, dtype) for i in range(5)], master, lambda p, g: g.clone())
    want_params = [p.float() for p in params]
    want_avg = [opt.state[p]["exp_avg"] for p in params]
    for rank_params, rank_avg in got:  # the same on both ranks: each gathered the full tensors
        # The same arithmetic on the same elements: bitwise.
        torch.testing.assert_close(rank_params, want_params, rtol=0, atol=0)
        torch.testing.assert_close(rank_avg, want_avg, rtol=0, atol=0)


def _refuse_body(rank: int, world: int, kwargs: dict) -> str:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from fmcore.optim import FusedAdamW

    p = distribute_tensor(torch.randn(4, 3), init_device_mesh("cpu", (world,)), [Shard(0)])
    try:
        FusedAdamW([p], **kwargs)
    except ValueError as e:
        return str(e)
    return "accepted"


@pytest.mark.parametrize("kwargs", [{"max_grad_norm": 1.0}, {"skip_nonfinite": True}], ids=str)
def test_fused_norm_with_dtensor_params_is_refused(tmp_path, kwargs):
    for message in run_ranks(_refuse_body, 2, tmp_path, args=(kwargs,)):
        assert "shard of a DTensor param (param 0 of group 0)" in message
        assert "clip_grad_norm_" in message
