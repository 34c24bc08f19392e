"""Attention benchmark: fmcore's flash attention vs torch SDPA's flash (FA2), cuDNN and
memory-efficient backends, forward and backward, on the issue's cases.

FLOPs (FlashAttention's convention): forward 4 * B * H * Sq * Sk * D, halved when causal; backward
2.5x the forward. roofline% is against the bf16 matmul rate measured in the same run. Every system
reads the same (B, S, H, D) tensors (SDPA through a (B, H, S, D) view, the layout its kernels take
without a copy). fmcore runs twice: its default backward (atomic dq, like FA2's) and deterministic=True;
on the GPU also with its alternative tile configurations (tiles=1 to 6; 3 to 6 run the forward and
dk/dv on Hopper's wgmma).
On the CPU (ctx.quick) small float32 shapes prove the path against torch's default SDPA.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from fmcore.bench import BenchContext, Row, bench_tiles, measure_system
from fmcore.bench.timing import time_ms
from fmcore.ops import flash_attention

# (B, H, S, D, causal): the bar.
CASES = [
    (8, 16, 1024, 128, True),
    (4, 16, 4096, 128, True),
    (2, 16, 8192, 128, True),
    (4, 16, 4096, 128, False),
    (8, 12, 2048, 64, True),
    (4, 32, 2048, 128, True),
]
QUICK_CASES = [(1, 4, 256, 64, True), (1, 4, 256, 64, False)]


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=causal).transpose(1, 2)

    return fn


def _systems(device: torch.device):
    systems = [
        ("fmcore", lambda q, k, v, causal: flash_attention(q, k, v, causal=causal)),  # atomic dq, as FA2
        ("fmcore-deterministic", lambda q, k, v, causal: flash_attention(q, k, v, causal=causal, deterministic=True)),
    ]
    if device.type == "cuda":
        # The alternative tile configurations (csrc/kernels/attention.cu's Tiles), timed beside the
        # default so that one GPU run says which to make the default per head dim and phase.
        systems += [(f"fmcore-tiles{t}", lambda q, k, v, causal, t=t: flash_attention(q, k, v, causal=causal, tiles=t))
                    for t in bench_tiles()]
        from torch.nn.attention import SDPBackend

        systems += [
            ("sdpa-flash", _sdpa(SDPBackend.FLASH_ATTENTION)),
            ("sdpa-cudnn", _sdpa(SDPBackend.CUDNN_ATTENTION)),
            ("sdpa-mem-efficient", _sdpa(SDPBackend.EFFICIENT_ATTENTION)),
        ]
    else:
        systems.append(("torch-eager", lambda q, k, v, causal: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2)))
    return systems


def _measure(ctx, case, fn, q, k, v, dout, causal, fwd_flops, system) -> list[Row]:
    dev = ctx.device
    out = fn(q, k, v, causal)  # a backend that cannot take this case raises here
    with torch.no_grad():
        fwd = time_ms(lambda: fn(q, k, v, causal), dev)
    # autograd.grad, not backward: no .grad accumulation kernels inside the timing
    bwd = time_ms(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), dev)
    rows = []
    for phase, ms, flops in (("fwd", fwd, fwd_flops), ("bwd", bwd, 2.5 * fwd_flops)):
        rows += ctx.compute_rows("attention", f"{case} {phase}", system, ms, flops)
    return rows


def run(ctx: BenchContext) -> Iterator[Row]:
    dev = ctx.device
    # bf16 on the GPU (the kernels' dtype); float32 on the CPU, what training there runs in
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    for B, H, S, D, causal in QUICK_CASES if ctx.quick else CASES:
        case = f"B{B} H{H} S{S} D{D} {'causal' if causal else 'full'} {'bf16' if dtype == torch.bfloat16 else 'fp32'}"
        q, k, v = (torch.randn(B, S, H, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
        dout = torch.randn(B, S, H, D, device=dev, dtype=dtype)
        fwd_flops = 4 * B * H * S * S * D / (2 if causal else 1)
        for system, fn in _systems(dev):
            yield from measure_system("attention", case, system,
                                      lambda: _measure(ctx, case, fn, q, k, v, dout, causal, fwd_flops, system))
