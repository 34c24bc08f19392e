"""AdamW step benchmark: fmcore.optim.FusedAdamW vs torch.optim.AdamW (fused and foreach), each with
and without gradient clipping, on GPT-2 parameter lists.

Cases: GPT-2 124M and 1.56B (XL) shapes (a small GPT on the CPU), fp32 params; and bf16 params with
fp32 master weights (torch has no master-weight option: its rows keep fp32 master params themselves,
copy the bf16 grads into their .grad, step, and copy the result into the bf16 params).

Bytes per parameter counted for GB/s and roofline% (the least traffic a step can do, the same count
for every system so the numbers compare):
  fp32:            read param, grad, exp_avg, exp_avg_sq (16) + write param, exp_avg, exp_avg_sq (12) = 28
  fp32 + clip:     28 + read grad once more for the norm = 32
  bf16 + master:   read master, exp_avg, exp_avg_sq (12) + bf16 grad (2) + write those three (12) + bf16
                   param (2) = 28;  + clip: 30
torch's clip_grad_norm_ moves 8 bytes more per param than the floor (it rewrites the grads).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import torch

from fmcore.bench import BenchContext, Row, measure_system
from fmcore.bench.timing import time_ms
from fmcore.optim import FusedAdamW

MAX_NORM = 1.0


def gpt2_shapes(n_layer: int, d: int, vocab: int = 50257, ctx: int = 1024) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2 (tied embeddings), in module order."""
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def _params(shapes, device, dtype):
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for s in shapes:
        p = torch.randn(s, device=device, dtype=dtype, generator=gen).mul_(0.02).requires_grad_()
        p.grad = torch.randn(s, device=device, dtype=dtype, generator=gen).mul_(1e-3)  # random, never zeros
        params.append(p)
    return params


def _torch_step(params, opt, clip: bool):
    def fn():
        if clip:
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
        opt.step()

    return fn


def _torch_master_step(params, masters, opt, clip: bool):
    """bf16 params, fp32 masters that torch's AdamW steps: the usual hand-written mixed precision."""
    master_grads = [m.grad for m in masters]
    param_grads = [p.grad for p in params]

    def fn():
        torch._foreach_copy_(master_grads, param_grads)
        if clip:
            torch.nn.utils.clip_grad_norm_(masters, MAX_NORM, foreach=True)
        opt.step()
        torch._foreach_copy_([p.detach() for p in params], masters)

    return fn


def _systems(params, master: bool):
    """(system, clip, make_step) for each system that runs here; make_step builds the optimizer."""
    out = []
    for clip in (False, True):
        out.append(("fmcore", clip, lambda clip=clip: FusedAdamW(
            params, lr=1e-4, max_grad_norm=MAX_NORM if clip else None, master_weights=master).step))
        for system, flag in (("torch-fused", "fused"), ("torch-foreach", "foreach")):
            if master:
                def make(clip=clip, flag=flag):
                    masters = [p.detach().float().requires_grad_() for p in params]
                    for m in masters:
                        m.grad = torch.empty_like(m)
                    opt = torch.optim.AdamW(masters, lr=1e-4, **{flag: True})
                    return _torch_master_step(params, masters, opt, clip)
            else:
                def make(clip=clip, flag=flag):
                    return _torch_step(params, torch.optim.AdamW(params, lr=1e-4, **{flag: True}), clip)
            out.append((system, clip, make))
    return out


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(ctx: BenchContext) -> Iterator[Row]:
    dev = ctx.device
    if ctx.quick:
        models = [("gpt-small", gpt2_shapes(2, 64, vocab=512, ctx=128))]
    else:
        models = [("gpt2-124M", gpt2_shapes(12, 768)), ("gpt2-1.56B", gpt2_shapes(48, 1600))]
    for model, shapes in models:
        n = sum(torch.Size(s).numel() for s in shapes)
        for dtype, master in ((torch.float32, False), (torch.bfloat16, True)):
            params = _params(shapes, dev, dtype)
            kind = "fp32" if not master else "bf16+master"
            for system, clip, make in _systems(params, master):
                case = f"{model} ({_count(n)} params, {len(shapes)} tensors) {kind}{' +clip' if clip else ''}"
                bytes_per_param = 28 + (0 if not clip else (2 if master else 4))

                def measure(make=make, system=system, case=case, bytes_per_param=bytes_per_param):
                    # make() inside: a peer torch refuses here (fused AdamW on a device it does not
                    # support) is skipped and named; fmcore's own failure raises.
                    ms = time_ms(make(), dev, warmup=3, rep=20)
                    return ctx.bandwidth_rows("adamw", case, system, ms, n * bytes_per_param,
                                              rate_unit=f"GB/s at {bytes_per_param} B/param")

                yield from measure_system("adamw", case, system, measure)
                _free(dev)  # the optimizer's state, before the next system allocates its own
            del params
            _free(dev)
