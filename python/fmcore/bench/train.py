"""End-to-end training step: fmcore's trainer vs the identical model in plain PyTorch.

One step = forward + backward + clip + AdamW on a (B, T) batch of random tokens, timed after
warm-up (and compilation), one host sync per step as in the trainer. Systems, all the same GPT-2:
- fmcore:          model.ops="fmcore" (flash attention, fused linear cross-entropy), FusedAdamW with
                   fused clipping, bf16 autocast
- fmcore-compile:  the same under torch.compile, as train.compile true does it: each block on its own
                   (trainer.compile_model "blocks")
- fmcore-bf16:     bf16 weights with fp32 master weights in FusedAdamW (no autocast casts)
- torch-eager:     model.ops="torch" (SDPA, F.cross_entropy on the logits), torch.optim.AdamW(fused=True)
                   and clip_grad_norm_, bf16 autocast
- torch-compile:   the same under torch.compile, the whole model (how a plain PyTorch model is compiled)
- fmcore-tiles3..6: fmcore with flash attention's tile configuration 3, 4, 5 or 6 (Hopper's wgmma
                   kernels; fmcore.ops.attention_tiles), to measure them in the trainer before they
                   are the default
MFU by 6N + 12 L H Q T FLOPs per token (models.flops_per_token) over the device's peak dense bf16
rate (trainer.peak_tflops; the measured matmul rate on other GPUs). On the CPU (quick): a tiny
model in fp32, eager systems only, to prove the path.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Iterator

import torch

from fmcore.bench import BenchContext, Row, bench_tiles, record_skipped
from fmcore.ops import attention_tiles
from fmcore.train import models
from fmcore.train.config import load_config
from fmcore.train.trainer import StepOptions, build_optimizer, compile_model, peak_tflops, train_step

# name -> (model.ops, optimizer impl, precision on GPU, train.compile's mode, flash attention tiles)
# In the order they run: the two bars' systems first (fmcore eager and compiled, each against
# torch.compile), in case a GPU session's time runs out (the first H200 run, 150 s, measured only
# the first three of an order that put torch-eager second); the tile variants, eager and a few
# seconds each, before the second compile.
SYSTEMS = {
    "fmcore": ("fmcore", "fmcore", "bf16-autocast", "none", 0),
    "torch-compile": ("torch", "torch", "bf16-autocast", "model", 0),
    "fmcore-tiles3": ("fmcore", "fmcore", "bf16-autocast", "none", 3),
    "fmcore-tiles4": ("fmcore", "fmcore", "bf16-autocast", "none", 4),
    "fmcore-tiles5": ("fmcore", "fmcore", "bf16-autocast", "none", 5),
    "fmcore-tiles6": ("fmcore", "fmcore", "bf16-autocast", "none", 6),
    "fmcore-compile": ("fmcore", "fmcore", "bf16-autocast", "blocks", 0),
    "torch-eager": ("torch", "torch", "bf16-autocast", "none", 0),
    "fmcore-bf16": ("fmcore", "fmcore", "bf16", "none", 0),
}


def _cases(ctx: BenchContext):
    """(case name, resolved ModelConfig, batch, seq_len, precision override or None)."""
    if ctx.quick:
        cfg = load_config("tiny").model
        cfg = dataclasses.replace(cfg, vocab_size=4096, n_layers=2)
        return [("tiny-2L B4 T128 fp32", cfg, 4, 128, "fp32")]
    return [(f"{name} B16 T1024 bf16", load_config(name).model, 16, 1024, None)
            for name in ("gpt2-124m", "gpt2-350m")]


def make_step(mcfg, system: str, B: int, T: int, precision: str, device: torch.device):
    """(one training step of `system` on alternating random batches, the resolved model config)."""
    ops, impl, _, compile_mode, tiles = SYSTEMS[system]
    mcfg = dataclasses.replace(models.resolve(mcfg, device=device), ops=ops)
    model = models.build_model(mcfg).to(device)
    if precision == "bf16":
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    cfg = load_config("tiny")  # only the optim section is read: the presets' AdamW settings
    optimizer = build_optimizer(model, cfg, impl, precision, device)
    compile_model(model, model, compile_mode)
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [(torch.randint(0, mcfg.vocab_size, (B, T), device=device, generator=gen),
                torch.randint(0, mcfg.vocab_size, (B, T), device=device, generator=gen), None, None, None)
               for _ in range(2)]
    opts = StepOptions(impl, precision, device, grad_clip=1.0)
    i = 0

    def next_batch():
        nonlocal i
        i += 1
        return batches[i % 2]

    def step():
        with attention_tiles(tiles):  # 0: fmcore's default kernels
            train_step(model, optimizer, next_batch, 1, opts)  # ends with a host sync on the loss and norm

    return step, mcfg


def _measure(mcfg, system: str, B: int, T: int, precision: str, device: torch.device, steps: int, warmup: int):
    step, mcfg = make_step(mcfg, system, B, T, precision, device)
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    # statistics.median: with an even count (20 steps) times[len // 2] was the upper middle value
    return statistics.median(times), peak, mcfg


def run(ctx: BenchContext) -> Iterator[Row]:
    """Rows stream out as each system finishes: the CLI saves them before the next one compiles."""
    dev = ctx.device
    # Quick (CPU): the eager fp32 systems only; compiling takes minutes there and proves nothing new,
    # and the CPU has no attention tiles. On the GPU, the tiles bench_tiles() allows.
    timed_tiles = [0] if ctx.quick else [0, *bench_tiles()]
    systems = [s for s, (_, _, prec, comp, tiles) in SYSTEMS.items()
               if tiles in timed_tiles and (not ctx.quick or (comp == "none" and prec != "bf16"))]
    peak_rate = peak_tflops(load_config("tiny"), dev) or ctx.roofline.matmul_tflops
    for case, mcfg, B, T, precision in _cases(ctx):
        for system in systems:
            prec = precision or SYSTEMS[system][2]
            try:
                sec, mem, resolved = _measure(mcfg, system, B, T, prec, dev, steps=3 if ctx.quick else 20,
                                              warmup=1 if ctx.quick else 5)
            except Exception as e:  # e.g. a kernel this build lacks: report it, keep the other systems
                record_skipped("train", case, system, e)  # fmcore's too: the README then shows "failed"
                continue
            finally:
                torch._dynamo.reset()  # compiled graphs hold their model: free it before the next system
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            tok_s = B * T / sec
            mfu = 100.0 * models.flops_per_token(resolved, T) * tok_s / (peak_rate * 1e12)
            yield Row("train", case, system, "ms", sec * 1e3, "ms/step")
            yield Row("train", case, system, "tok/s", tok_s, "tok/s")
            yield Row("train", case, system, "MFU%", mfu, f"% of {peak_rate:.0f} TFLOP/s")
            if mem is not None:
                yield Row("train", case, system, "MiB", mem, "MiB peak")
