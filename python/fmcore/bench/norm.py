"""Fused residual add + norm benchmark: fmcore.ops.add_norm vs ``x + residual`` then F.layer_norm /
F.rms_norm in eager PyTorch and under torch.compile.

The cases are a transformer's block boundary at GPT-2 small (D 768) and Llama-7B (D 4096) widths over
16384 tokens: bf16 branch outputs x joining an fp32 stream (bf16 autocast, fp32 weights) or a bf16
stream (pure bf16), the normed output in bf16 (what the next matmul reads). The peers cast their
normed output to bf16 too, as autocast's matmul would.

The floor (bytes the fused op must move; weights and per-row statistics are negligible), per element
with a residual of r bytes (4 fp32, 2 bf16):
  forward:  read x (2) + read residual (r) + write stream (r) + write normed (2)   = 12 B fp32, 8 B bf16
  backward: read grad normed (2) + read grad stream (r) + read stream (r) + write grad_x (2)
            + write grad_residual (r, only when its dtype is not x's: else one tensor serves both)
                                                                                  = 16 B fp32, 8 B bf16
At the H100's measured 3.0 TB/s copy rate, (16384, 768): fwd 50 us / 34 us, bwd 67 us / 34 us
(fp32 / bf16 stream); (16384, 4096): fwd 268 us / 179 us, bwd 358 us / 179 us.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from fmcore.bench import BenchContext, Row, measure_system
from fmcore.bench.timing import host_us_per_call, time_ms
from fmcore.ops import add_norm


def torch_add_norm(x, residual, weight, bias, kind: str, out_dtype: torch.dtype):
    stream = x + residual
    if kind == "layer":
        out = F.layer_norm(stream, stream.shape[-1:], weight, bias)
    else:
        out = F.rms_norm(stream, stream.shape[-1:], weight)
    return out.to(out_dtype), stream


def fmcore_add_norm(x, residual, weight, bias, kind: str, out_dtype: torch.dtype):
    return add_norm(x, residual, weight, bias, kind=kind, out_dtype=out_dtype)


def floor_bytes(rows: int, dim: int, x_dtype: torch.dtype, res_dtype: torch.dtype) -> tuple[int, int]:
    """(forward, backward) bytes the fused op must move; see the module docstring."""
    xb, rb = x_dtype.itemsize, res_dtype.itemsize
    n = rows * dim
    fwd = n * (xb + rb + rb + xb)
    bwd = n * (xb + rb + rb + xb + (rb if res_dtype != x_dtype else 0))
    return fwd, bwd


def _measure(ctx: BenchContext, case: str, system: str, fn, inputs, kind: str, out_dtype, nbytes) -> list[Row]:
    dev = ctx.device
    x, residual, weight, bias = inputs
    with torch.no_grad():
        fwd = time_ms(lambda: fn(x, residual, weight, bias, kind, out_dtype), dev)
    out, stream = fn(x, residual, weight, bias, kind, out_dtype)
    grads = (torch.randn_like(out), torch.randn_like(stream))
    wanted = [t for t in inputs if t is not None]
    # autograd.grad, not backward: no .grad accumulation kernels inside the timing
    bwd = time_ms(lambda: torch.autograd.grad((out, stream), wanted, grads, retain_graph=True), dev)
    return ctx.fwd_bwd_rows("norm", case, system, (fwd, bwd), nbytes)


def call_overhead_ms(fn, device, *, kind: str = "layer", calls: int = 1000, reps: int = 5) -> dict[str, float]:
    """Host milliseconds per eager call on tiny (8, 64) fp32 tensors (x, residual, weight and, for
    LayerNorm, bias), where the kernel is negligible: "forward no-grad" (torch.no_grad), "forward"
    (the inputs require grad: autograd records a node) and "forward + autograd.grad". Medians of
    reps rounds (bench.timing.host_us_per_call)."""
    g = torch.Generator().manual_seed(0)
    x, r, w, b = (torch.randn(*shape, generator=g).to(device).requires_grad_()
                  for shape in ((8, 64), (8, 64), (64,), (64,)))
    b = b if kind == "layer" else None
    wanted = [t for t in (x, r, w, b) if t is not None]
    cots = (torch.randn(8, 64, generator=g).to(device), torch.randn(8, 64, generator=g).to(device))

    def fwd():
        return fn(x, r, w, b, kind, torch.float32)

    def fwd_no_grad():
        with torch.no_grad():
            return fwd()

    def fwd_bwd():
        torch.autograd.grad(fwd(), wanted, cots)

    return {what: host_us_per_call(call, device, calls=calls, reps=reps, warmup=20) / 1e3
            for what, call in (("forward no-grad", fwd_no_grad), ("forward", fwd),
                               ("forward + autograd.grad", fwd_bwd))}


def run(ctx: BenchContext) -> Iterator[Row]:
    dev = ctx.device
    rows_n, dims = (256, (64, 512)) if ctx.quick else (16384, (768, 4096))
    x_dtype, out_dtype = torch.bfloat16, torch.bfloat16
    for dim in dims:
        for res_dtype in (torch.float32, torch.bfloat16):
            for kind in ("layer", "rms"):
                # A fresh compile per case: eight cases (x grad mode) of one function would pass
                # dynamo's recompile limit.
                torch._dynamo.reset()
                compiled = torch.compile(torch_add_norm, fullgraph=True)
                systems = [("fmcore", fmcore_add_norm), ("torch-eager", torch_add_norm), ("torch-compile", compiled)]
                name = "LayerNorm" if kind == "layer" else "RMSNorm"
                case = f"({rows_n}, {dim}) {name} stream {str(res_dtype).removeprefix('torch.')}"
                x = torch.randn(rows_n, dim, device=dev, dtype=x_dtype, requires_grad=True)
                residual = torch.randn(rows_n, dim, device=dev, dtype=res_dtype, requires_grad=True)
                # fp32 norm weights with an fp32 stream (autocast), bf16 with a bf16 one (pure bf16)
                weight = (1 + 0.1 * torch.randn(dim, device=dev)).to(res_dtype).requires_grad_()
                bias = torch.randn(dim, device=dev, dtype=res_dtype, requires_grad=True) if kind == "layer" else None
                nbytes = floor_bytes(rows_n, dim, x_dtype, res_dtype)
                for system, fn in systems:
                    yield from measure_system("norm", case, system, lambda: _measure(
                        ctx, case, system, fn, (x, residual, weight, bias), kind, out_dtype, nbytes))
                yield from ctx.floor_rows("norm", case, nbytes)
    # Host cost per call (metric "ms": the row vocabulary has no "us"): 25 of these run per GPT-2
    # 124M step, each way; it is hidden while the GPU is the bottleneck. fmcore's autograd is C++
    # for this cost (csrc/ops/norm_autograd.cpp).
    for kind in ("layer", "rms"):
        name = "LayerNorm" if kind == "layer" else "RMSNorm"
        for system, fn in (("fmcore", fmcore_add_norm), ("torch-eager", torch_add_norm)):
            calls = 200 if ctx.quick else 1000
            for what, ms in call_overhead_ms(fn, dev, kind=kind, calls=calls).items():
                yield Row("norm", f"per-call overhead (8, 64) {name} {what}", system, "ms", ms, "ms/call")
