"""SwiGLU benchmark: fmcore.ops.swiglu on a fused gate/up projection's output against
``F.silu(gate) * up`` on its two halves in eager PyTorch and under torch.compile, and against
Liger-Kernel's fused gate-up SwiGLU (LigerFusedGateUpSiLUMulFunction, the same packed layout).

Cases: 16384 tokens at Llama-3.2-1B's F = 8192 and Llama-3-8B's F = 14336, bf16; the input is the
(tokens, 2F) projection output, the backward's result its (tokens, 2F) gradient.

The floor (bytes the fused op must move), per element of the (tokens, F) output in bf16: forward
read gate + up, write out = 6 B; backward read grad, gate, up, write grad gate and grad up = 10 B.
At the H100's measured 3.0 TB/s, F = 8192: fwd 268 us, bwd 447 us; F = 14336: fwd 470 us,
bwd 783 us.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from fmcore.bench import BenchContext, Row, measure_system, try_import
from fmcore.bench.timing import time_ms
from fmcore.ops import swiglu


def torch_swiglu(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _systems(device):
    systems = [("fmcore", swiglu), ("torch-eager", torch_swiglu),
               ("torch-compile", torch.compile(torch_swiglu, fullgraph=True))]
    liger = try_import("liger_kernel.ops.swiglu")
    if liger is not None and device.type == "cuda" and hasattr(liger, "LigerFusedGateUpSiLUMulFunction"):
        systems.append(("liger", liger.LigerFusedGateUpSiLUMulFunction.apply))
    return systems


def run(ctx: BenchContext) -> Iterator[Row]:
    dev = ctx.device
    tokens, widths = (256, (256,)) if ctx.quick else (16384, (8192, 14336))
    for ffn in widths:
        torch._dynamo.reset()  # a fresh compile per width (dynamo's recompile limit)
        gate_up = torch.randn(tokens, 2 * ffn, device=dev, dtype=torch.bfloat16, requires_grad=True)
        case = f"({tokens}, 2 x {ffn}) bf16"
        nbytes = (6 * tokens * ffn, 10 * tokens * ffn)
        for system, fn in _systems(dev):
            def measure(fn=fn, system=system):
                with torch.no_grad():
                    fwd = time_ms(lambda: fn(gate_up), dev)
                out = fn(gate_up)
                grad = torch.randn_like(out)
                # autograd.grad, not backward: no .grad accumulation kernels inside the timing
                bwd = time_ms(lambda: torch.autograd.grad(out, (gate_up,), grad, retain_graph=True), dev)
                return ctx.fwd_bwd_rows("swiglu", case, system, (fwd, bwd), nbytes)

            yield from measure_system("swiglu", case, system, measure)
        yield from ctx.floor_rows("swiglu", case, nbytes)
