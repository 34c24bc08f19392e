"""Bias + GELU benchmark: fmcore.ops.bias_gelu against what a GPT-2 MLP does without it, in eager
PyTorch and under torch.compile, over 16384 tokens (B16 T1024) at GPT-2 124M's width (768 -> 3072),
bf16 activations and an fp32 bias (bf16 autocast). One width: the four torch.compile builds are most
of the run.

Two views of each width:
- "mlp-in": the whole first half of the MLP, forward and backward: ``F.gelu(F.linear(x, w, b))``
  (eager: the bias inside the matmul, then gelu, gelu_backward and the bias gradient's reduction)
  against ``bias_gelu(F.linear(x, w), b)``. The matmuls dominate; this is the saving as a model sees
  it.
- "bias+gelu": the elementwise op alone against its floor, forward and backward:
  ``F.gelu(x + b)`` against ``bias_gelu(x, b)``.

The floor (bytes the fused op must move; the bias and the partial rows are negligible), per element
of bf16: forward read x + write out = 4 B; backward read grad + read x + write grad_x = 6 B. At the
H100's measured 3.0 TB/s, (16384, 3072): fwd 67 us, bwd 101 us.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from fmcore.bench import BenchContext, Row, measure_system
from fmcore.bench.timing import time_ms
from fmcore.ops import bias_gelu


def torch_mlp_in(x, w, b):
    return F.gelu(F.linear(x, w, b), approximate="tanh")


def fmcore_mlp_in(x, w, b):
    return bias_gelu(F.linear(x, w), b, approximate="tanh")


def torch_bias_gelu(h, b):
    return F.gelu(h + b.to(h.dtype), approximate="tanh")


def fmcore_bias_gelu(h, b):
    return bias_gelu(h, b, approximate="tanh")


def _fwd_bwd_ms(fn, inputs, device) -> tuple[float, float]:
    with torch.no_grad():
        fwd = time_ms(lambda: fn(*inputs), device)
    out = fn(*inputs)
    grad = torch.randn_like(out)
    # autograd.grad, not backward: no .grad accumulation kernels inside the timing
    bwd = time_ms(lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True), device)
    return fwd, bwd


def run(ctx: BenchContext) -> Iterator[Row]:
    dev = ctx.device
    tokens, widths = (256, ((64, 256),)) if ctx.quick else (16384, ((768, 3072),))
    # The model's bf16 autocast on CUDA (bf16 matmul outputs, the fp32 bias); fp32 on the CPU.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    for dim, ffn in widths:
        torch._dynamo.reset()  # a fresh compile per width (dynamo's recompile limit)
        x = torch.randn(tokens, dim, device=dev, requires_grad=True)
        w = (torch.randn(ffn, dim, device=dev) / dim**0.5).requires_grad_()
        b = torch.randn(ffn, device=dev, requires_grad=True)
        case = f"mlp-in N{tokens} {dim}->{ffn}"
        for system, fn in (("fmcore", fmcore_mlp_in), ("torch-eager", torch_mlp_in),
                           ("torch-compile", torch.compile(torch_mlp_in, fullgraph=True))):
            def measure(fn=fn, system=system):
                with autocast:
                    fwd, bwd = _fwd_bwd_ms(fn, (x, w, b), dev)
                return [Row("gelu", f"{case} fwd", system, "ms", fwd, "ms"),
                        Row("gelu", f"{case} bwd", system, "ms", bwd, "ms")]

            yield from measure_system("gelu", case, system, measure)

        h = torch.randn(tokens, ffn, device=dev, dtype=torch.bfloat16, requires_grad=True)
        case = f"bias+gelu ({tokens}, {ffn}) bf16, fp32 bias"
        nbytes = (4 * tokens * ffn, 6 * tokens * ffn)
        for system, fn in (("fmcore", fmcore_bias_gelu), ("torch-eager", torch_bias_gelu),
                           ("torch-compile", torch.compile(torch_bias_gelu, fullgraph=True))):
            def measure(fn=fn, system=system):
                return ctx.fwd_bwd_rows("gelu", case, system, _fwd_bwd_ms(fn, (h, b), dev), nbytes)

            yield from measure_system("gelu", case, system, measure)
        yield from ctx.floor_rows("gelu", case, nbytes)
