"""Where each fmcore op spends its time, kernel by kernel: one representative shape per op (the
benchmarks' bar cases), forward + backward under torch.profiler, a table per op and a JSON file.

The benchmarks say how fast an op is; this says which of its kernels to work on next (attention's
backward is four kernels, linear cross-entropy is cuBLAS plus fmcore's loss kernel), so one GPU call
brings back both. Beside each kernel sum it prints the wall time per iteration (as benchmarked and
back to back): the difference is time the GPU spent waiting for the host. On the CPU it profiles
small shapes and lists the top CPU ops: that proves the script.

    python scripts/profile_kernels.py [--json FILE] [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from fmcore import ops
from fmcore.bench import bench_tiles
from fmcore.bench.adamw import gpt2_shapes
from fmcore.bench.timing import time_ms
from fmcore.bench.train import make_step
from fmcore.optim import FusedAdamW
from fmcore.train.config import load_config


def _attention(dev, quick, deterministic):
    B, S, H, D = (1, 128, 2, 64) if quick else (4, 4096, 16, 128)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    q, k, v = (torch.randn(B, S, H, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, S, H, D, device=dev, dtype=dtype)

    def step():
        out = ops.flash_attention(q, k, v, causal=True, deterministic=deterministic)
        torch.autograd.grad(out, (q, k, v), dout)

    return f"B{B} S{S} H{H} D{D} causal fwd+bwd", step


def _rope(dev, quick):
    B, S, Hq, Hk, D = (2, 64, 4, 2, 64) if quick else (8, 2048, 32, 8, 128)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    q = torch.randn(B, S, Hq, D, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(B, S, Hk, D, device=dev, dtype=dtype, requires_grad=True)
    theta = torch.rand(S, D // 2, device=dev)
    cos, sin = theta.cos(), theta.sin()

    def step():
        oq, ok = ops.apply_rotary(q, k, cos, sin)
        torch.autograd.grad((oq, ok), (q, k), (torch.ones_like(oq), torch.ones_like(ok)))

    return f"q({B},{S},{Hq},{D}) k({B},{S},{Hk},{D}) fwd+bwd", step


def _cross_entropy(dev, quick):
    N, V = (64, 1000) if quick else (16384, 50304)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    x = torch.randn(N, V, device=dev, dtype=dtype, requires_grad=True)
    t = torch.randint(0, V, (N,), device=dev)

    def step():
        torch.autograd.grad(ops.cross_entropy(x, t, inplace_backward=True), [x])

    return f"logits ({N}, {V}) fwd+bwd in place", step


def _linear_cross_entropy(dev, quick, shape=(16384, 768, 50304), chunk_size=None):
    N, D, V = (64, 32, 1000) if quick else shape
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    h = torch.randn(N, D, device=dev, dtype=dtype, requires_grad=True)
    w = (torch.randn(V, D, device=dev, dtype=dtype) / D**0.5).requires_grad_()
    t = torch.randint(0, V, (N,), device=dev)

    def step():
        torch.autograd.grad(ops.linear_cross_entropy(h, w, t, chunk_size=chunk_size), [h, w])

    return f"N{N} D{D} V{V} fwd+bwd" + (f" chunk {chunk_size}" if chunk_size else ""), step


def _adamw(dev, quick):
    shapes = gpt2_shapes(2, 64, vocab=512, ctx=128) if quick else gpt2_shapes(12, 768)
    params = [torch.nn.Parameter(torch.randn(s, device=dev)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = FusedAdamW(params, lr=1e-4, weight_decay=0.1, max_grad_norm=1.0)
    return f"{sum(p.numel() for p in params) / 1e6:.1f}M params, {len(params)} tensors, step +clip", opt.step


def _train_step(dev, quick, system="fmcore"):
    """One fmcore training step of GPT-2 124M (B16 T1024, bf16 autocast): the train benchmark's
    fmcore system (or its fmcore-tiles one: the wgmma attention kernels), so its gap to
    torch.compile can be read kernel by kernel."""
    if quick:
        cfg = dataclasses.replace(load_config("tiny").model, vocab_size=512, n_layers=1)
        case, (B, T), precision = "tiny-1L B2 T64 fp32", (2, 64), "fp32"
    else:
        cfg = load_config("gpt2-124m").model
        case, (B, T), precision = "gpt2-124m B16 T1024 bf16-autocast", (16, 1024), "bf16-autocast"
    step, _ = make_step(cfg, system, B, T, precision, dev)
    return f"{case} train step ({system})", step


CASES = {
    "attention": lambda dev, quick: _attention(dev, quick, deterministic=False),
    "attention-deterministic": lambda dev, quick: _attention(dev, quick, deterministic=True),
    "rope": _rope,
    "cross_entropy": _cross_entropy,
    "linear_cross_entropy": _linear_cross_entropy,
    # The large-vocabulary bar case, at its default chunk (448 rows) and at 384 (whole 192-row tiles):
    # which matmul tiles cuBLAS picks there, and what each chunk's matmuls cost (bench/linear_cross_entropy.py).
    "linear_cross_entropy-V128256": lambda dev, quick: _linear_cross_entropy(dev, quick, (8192, 4096, 128256)),
    "linear_cross_entropy-V128256-chunk384": lambda dev, quick: _linear_cross_entropy(
        dev, quick, (8192, 4096, 128256), chunk_size=None if quick else 384),
    "adamw": _adamw,
    "train-step": _train_step,
}
# And the train step on the last wgmma tile configuration (3 to 6) the benchmarks may time
# (fmcore.bench.bench_tiles: after gpu_check's test-tiles stage, only those that passed).
_WGMMA_TILES = [t for t in bench_tiles() if t >= 3]
if _WGMMA_TILES:
    _system = f"fmcore-tiles{_WGMMA_TILES[-1]}"
    CASES[f"train-step-tiles{_WGMMA_TILES[-1]}"] = lambda dev, quick: _train_step(dev, quick, _system)
TOP = {name: 30 for name in CASES if name.startswith("train-step")}  # kernels listed (default: --top)


def profile_op(step, dev: torch.device, iters: int) -> list[dict]:
    """Per kernel (per op on the CPU): calls and device time per iteration of step, largest first."""
    for _ in range(3):  # warm-up: allocator, cuBLAS handles, lazy init
        step()
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            step()
        if cuda:
            torch.cuda.synchronize(dev)
    rows = []
    for ev in prof.key_averages():
        on_device = ev.device_type == torch.autograd.DeviceType.CUDA
        if cuda != on_device:
            continue
        us = (ev.self_device_time_total if cuda else ev.self_cpu_time_total) / iters
        if us > 0:
            rows.append({"kernel": ev.key, "calls": ev.count / iters, "us": us})
    rows.sort(key=lambda r: -r["us"])
    return rows


def wall_us(step, dev: torch.device, iters: int) -> dict:
    """Wall time of one iteration of step beside the kernel sum, so the gap (host work the GPU waits
    for: syncs, launches, Python) shows directly. "bench": as the benchmarks time it (time_ms: the
    median of single calls between CUDA events, L2 flushed before each). "back_to_back": iters calls
    between two events, divided by iters: host work that the GPU's queue hides drops out of it."""
    bench = time_ms(step, dev, warmup=1, rep=iters) * 1e3
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(dev)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        torch.cuda.synchronize(dev)
        back_to_back = start.elapsed_time(end) * 1e3 / iters
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        back_to_back = (time.perf_counter() - t0) * 1e6 / iters
    return {"bench": bench, "back_to_back": back_to_back}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--top", type=int, default=8, help="kernels listed per op")
    args = parser.parse_args()
    dev = torch.device(args.device)
    quick = dev.type != "cuda"
    results = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "ops": {}}
    for name, make in CASES.items():
        case, step = make(dev, quick)
        iters = 2 if quick else 10
        rows = profile_op(step, dev, iters=iters)
        total = sum(r["us"] for r in rows)
        wall = wall_us(step, dev, iters)
        results["ops"][name] = {"case": case, "total_us": total, "wall_us": wall, "kernels": rows}
        print(f"\n### {name}: {case}: {total:.1f} us per iteration ({'CPU ops' if quick else 'CUDA kernels'}); "
              f"wall {wall['bench']:.1f} us as benchmarked, {wall['back_to_back']:.1f} us back to back")
        print("| us | % | calls | kernel |\n|---|---|---|---|")
        for r in rows[: TOP.get(name, args.top)]:
            print(f"| {r['us']:.1f} | {100 * r['us'] / total:.0f} | {r['calls']:g} | {r['kernel'][:110]} |")
        if args.json:  # rewritten after every op, like the benchmarks: a cut run keeps what it measured
            args.json.write_text(json.dumps(results, indent=1) + "\n")
        del step
        if dev.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
