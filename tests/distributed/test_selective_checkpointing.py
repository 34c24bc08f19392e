"""Selective activation checkpointing in each parallel layout the trainer has, on 2 CPU ranks (gloo):
one optimizer step of a small model with train.activation_checkpointing "selective" lands on the
weights "none" gives, bit for bit, in ddp, fsdp2, zero1 and tensor=2. Under tensor parallelism its
backward sends the all-reduces "full"'s sends: "none"'s and each block's attention all-reduce again,
which the policy leaves to the recompute rather than keep its whole (tokens, dim) output. fmcore's ops;
plain PyTorch's too for tensor parallelism, whose ops reach the policy through DTensor."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.distributed.launch import run_ranks

LAYOUTS = {"ddp": ["--parallel.data", "ddp"], "fsdp2": ["--parallel.data", "fsdp2"],
           "zero1": ["--parallel.data", "zero1"], "tensor2": ["--parallel.tensor", "2"],
           "tensor2-torch": ["--parallel.tensor", "2", "--model.ops", "torch", "--optim.impl", "torch"]}


class _CountAllReduces(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops._c10d_functional.all_reduce.default
        return func(*args, **(kwargs or {}))


def _step_body(rank: int, world: int, arch: str) -> dict:
    """{(layout, mode): (loss, the full state dict after one step, all-reduces in the backward)} on
    rank 0, {} on the others."""
    from fmcore.train import trainer
    from fmcore.train.config import load_config
    from fmcore.train.parallel import forget_mesh, full_state_dicts

    env = trainer.Env(rank, world, rank, torch.device("cpu"))
    out = {}
    for layout, args in LAYOUTS.items():
        for mode in ("none", "selective", "full") if layout.startswith("tensor") else ("none", "selective"):
            cfg = load_config("tiny", ["--model.arch", arch, "--model.dim", "64", "--model.n_layers", "2",
                                       "--model.n_heads", "4", "--model.max_seq_len", "32", "--train.seq_len", "32",
                                       "--train.precision", "fp32", "--train.device", "cpu", "--optim.grad_clip", "0",
                                       "--train.activation_checkpointing", mode, *args])
            model, mcfg = trainer.build_model(cfg, 128, env, "fp32")
            impl = trainer.optimizer_impl(cfg, mcfg)
            optimizer = trainer.build_optimizer(model, cfg, impl, "fp32", env.device)
            # each data-parallel rank its own batch; a tensor-parallel pair the same one
            gen = torch.Generator().manual_seed(rank if cfg.parallel.tensor == 1 else 0)
            x, y = torch.randint(0, 128, (2, 32), generator=gen), torch.randint(0, 128, (2, 32), generator=gen)
            loss = model(x, y)
            with _CountAllReduces() as backward:
                loss.backward()
            optimizer.step()
            out[layout, mode] = (loss.item(), full_state_dicts(model)[0], backward.count)
        forget_mesh()
    return out if rank == 0 else {}


def test_selective_matches_none_in_every_layout(tmp_path):
    for arch in ("gpt2", "llama"):
        got = run_ranks(_step_body, 2, tmp_path / arch, args=(arch,), timeout=120)[0]
        for layout in LAYOUTS:
            (loss0, sd0, sends0), (loss1, sd1, sends1) = got[layout, "none"], got[layout, "selective"]
            assert loss1 == loss0, (arch, layout)
            if layout.startswith("tensor"):
                # 2 blocks' attention all-reduces again (the recompute stops before the MLP's: nothing
                # the backward reads comes after it)
                assert sends1 == got[layout, "full"][2] == sends0 + 2 and sends0 > 0, (arch, layout)
            assert sd0.keys() == sd1.keys()
            for name in sd0:
                assert torch.equal(sd0[name], sd1[name]), (arch, layout, name)
