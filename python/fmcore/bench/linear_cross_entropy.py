"""Linear cross-entropy benchmark: fmcore vs F.linear + F.cross_entropy (eager and torch.compile),
Liger's fused linear cross-entropy and Cut Cross-Entropy, fwd+bwd.

Every system computes the mean loss of hidden (N, D) @ weight (V, D)^T against random targets and
the gradients of hidden and weight (torch.autograd.grad). Reported: median ms, peak MiB above the
inputs (the bar: at most the returned gradients + 128 MiB), the same peak split into the forward's
("MiB fwd") and the backward's ("MiB bwd", with what the forward left for it), and TFLOP/s of the
three N x V x D matmuls (6 N V D FLOPs) against the matmul rate measured in this run.

Cut Cross-Entropy ("cce") runs with its defaults, among them filter_eps="auto": the backward skips
the blocks of the gradient whose softmax values are all below a small threshold, so its gradients
are not exact (fmcore's, torch's and Liger's are); its time and memory are for that approximation.

On the GPU, fmcore also runs with other chunk sizes ("fmcore-chunk<rows>"), to choose the default
from timings: the one H200 profile (N16384 D768 V50304, 2026-12-04) showed cuBLAS running all three
chunk matmuls on 192 x 192 tiles, where the default chunk was 1152 rows (6 tiles). At V128256 the
default is 448 rows (2.33 tiles: the logits and grad_hidden matmuls would compute 576 rows for 448,
and the last chunk's 128 rows pay a whole grad_weight pass), against 384 (2 tiles of 192, 3 of 128)
in 22 chunks instead of 19 (three more reads and writes of grad_weight).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from fmcore.bench import BenchContext, Row, measure_system, try_import
from fmcore.bench.timing import phase_peaks_mib, time_ms
from fmcore.ops import linear_cross_entropy


def _torch_lce(h, w, t):
    return F.cross_entropy(F.linear(h, w), t)


def _systems(device, chunks=()):
    """(name, fn) pairs; fmcore at each of chunks' sizes right after its default, so that a stage cut
    short still has them."""
    systems = [("fmcore", linear_cross_entropy)]
    systems += [(f"fmcore-chunk{c}", functools.partial(linear_cross_entropy, chunk_size=c)) for c in chunks]
    systems += [
        ("torch-eager", _torch_lce),
        ("torch-compile", torch.compile(_torch_lce)),
    ]
    if device.type == "cuda":
        liger = try_import("liger_kernel.ops.fused_linear_cross_entropy")
        if liger is not None:
            def liger_fn(h, w, t):
                out = liger.LigerFusedLinearCrossEntropyFunction.apply(h, w, t)
                return out[0] if isinstance(out, tuple) else out

            systems.append(("liger", liger_fn))
        cce = try_import("cut_cross_entropy")
        if cce is not None:
            # CCE's default filter_eps="auto" skips the gradient blocks whose softmax is below a
            # threshold: its gradients are approximate (the others' are exact); see the docstring.
            systems.append(("cce", lambda h, w, t: cce.linear_cross_entropy(h, w, t)))
    return systems


def _fwd_bwd(fn, h, w, t):
    return torch.autograd.grad(fn(h, w, t), [h, w])


def _measure(ctx, case, system, fn, N, D, V, dtype, flops) -> list[Row]:
    dev = ctx.device
    h = torch.randn(N, D, device=dev, dtype=dtype, requires_grad=True)
    w = (torch.randn(V, D, device=dev, dtype=dtype) / D**0.5).requires_grad_()
    t = torch.randint(0, V, (N,), device=dev)
    ms = time_ms(lambda: _fwd_bwd(fn, h, w, t), dev, warmup=3, rep=10)
    rows = ctx.compute_rows("linear_cross_entropy", case, system, ms, flops, ms_unit="ms fwd+bwd",
                            rate_unit="TFLOP/s (6 N V D)")
    peaks = phase_peaks_mib(lambda: fn(h, w, t), lambda loss: torch.autograd.grad(loss, [h, w]), dev)
    if peaks is not None:  # the call's peak is the larger of its two halves'
        fwd, bwd = peaks
        rows += [Row("linear_cross_entropy", case, system, "MiB", max(fwd, bwd), "MiB peak above inputs"),
                 Row("linear_cross_entropy", case, system, "MiB fwd", fwd, "MiB peak above inputs, forward"),
                 Row("linear_cross_entropy", case, system, "MiB bwd", bwd,
                     "MiB peak above inputs, backward (with what the forward left)")]
    return rows


def run(ctx: BenchContext) -> Iterator[Row]:
    dev = ctx.device
    # (N, D, V, dtype, chunk sizes timed beside the default on the GPU)
    shapes = [(512, 64, 4096, torch.float32, ())] if ctx.quick else [
        (16384, 768, 50304, torch.bfloat16, ()), (8192, 4096, 128256, torch.bfloat16, (384,))]
    for N, D, V, dtype, chunks in shapes:
        case = f"N{N} D{D} V{V} {str(dtype).removeprefix('torch.')}"
        flops = 6 * N * D * V
        grads_mib = (N * D + V * D) * torch.finfo(dtype).bits / 8 / 2**20
        # A fresh compile per case, as norm, gelu and swiglu do: without it the second case's
        # torch-compile recompiles with dynamic shapes (automatic dynamic), unlike the first.
        torch._dynamo.reset()
        for system, fn in _systems(dev, chunks):
            yield from measure_system("linear_cross_entropy", case, system,
                                      lambda: _measure(ctx, case, system, fn, N, D, V, dtype, flops))
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        if dev.type == "cuda":
            yield Row("linear_cross_entropy", case, "bar", "MiB", grads_mib + 128,
                      "MiB: returned gradients + 128")
