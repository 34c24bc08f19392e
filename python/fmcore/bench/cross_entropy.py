"""Cross-entropy benchmark: fmcore vs F.cross_entropy (eager and torch.compile) and Liger, fwd+bwd.

Every system computes the mean loss of (N, V) logits and its gradient (torch.autograd.grad, so no
.grad accumulation is timed). fmcore runs with inplace_backward=True, the configuration of the bar
(Liger also writes its gradient over the logits); "fmcore out-of-place" cases show the default.

Roofline: the least traffic any implementation needs is reading the logits once and writing their
gradient once, 2 * N * V * element bytes; GB/s = those bytes / time and roofline% = GB/s against
the copy bandwidth measured in this run. fmcore with inplace_backward (mean/sum) reads each row
once into shared memory (up to 110 KiB of it: all of a bf16 row up to V = 56320) and writes its
gradient in the same kernel, so it can approach that roofline; out of place it moves 3 x N x V
elements (forward read, backward read + write), a ceiling of 67%.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from fmcore.bench import BenchContext, Row, measure_system, try_import
from fmcore.bench.timing import peak_memory_mib, time_ms
from fmcore.ops import cross_entropy


def _liger_fn():
    mod = try_import("liger_kernel.ops.cross_entropy")
    if mod is None:
        return None

    def fn(x, t):
        out = mod.LigerCrossEntropyFunction.apply(x, t, None)  # no class weights; mean, ignore_index -100
        return out[0] if isinstance(out, tuple) else out

    return fn


def _systems(device):
    systems = [
        ("fmcore", lambda x, t: cross_entropy(x, t, inplace_backward=True)),
        ("torch-eager", F.cross_entropy),
        ("torch-compile", torch.compile(F.cross_entropy)),
    ]
    liger = _liger_fn()
    if liger is not None and device.type == "cuda":
        systems.append(("liger", liger))
    return systems


def _fwd_bwd(fn, x, t):
    loss = fn(x, t)
    (grad,) = torch.autograd.grad(loss, [x])
    return grad


def _measure(bench, case, system, fn, make_inputs, nbytes, ctx) -> list[Row]:
    dev = ctx.device
    x, t = make_inputs()
    # fmcore's inplace_backward and Liger write the gradient over the logits: without a restore, every
    # call after the first would be timed on the previous call's gradient (near-uniform logits), not on
    # the N(0, 1) logits the torch peers see. The copy runs before each call, outside the timing.
    x0 = x.detach().clone()

    def restore():
        with torch.no_grad():
            x.copy_(x0)

    ms = time_ms(lambda: _fwd_bwd(fn, x, t), dev, setup=restore)
    rows = ctx.bandwidth_rows(bench, case, system, ms, nbytes, ms_unit="ms fwd+bwd",
                              rate_unit="GB/s (2 N V bytes / time)")
    restore()
    mib = peak_memory_mib(lambda: _fwd_bwd(fn, x, t), dev)
    if mib is not None:
        rows.append(Row(bench, case, system, "MiB", mib, "MiB peak above inputs"))
    return rows  # x, t and x0 are freed here, before the next system allocates its own


def run(ctx: BenchContext) -> Iterator[Row]:
    dev = ctx.device
    shapes = [(512, 4096, torch.float32), (64, 32001, torch.float32)] if ctx.quick else [
        (16384, 50304, torch.bfloat16), (8192, 128256, torch.bfloat16)]
    for N, V, dtype in shapes:
        case = f"logits ({N}, {V}) {str(dtype).removeprefix('torch.')}"
        nbytes = 2 * N * V * torch.finfo(dtype).bits // 8

        def make_inputs(N=N, V=V, dtype=dtype):
            x = torch.randn(N, V, device=dev, dtype=dtype, requires_grad=True)
            return x, torch.randint(0, V, (N,), device=dev)

        # A fresh compile per case, as norm, gelu and swiglu do: without it the second case's
        # torch-compile recompiles with dynamic shapes (automatic dynamic), unlike the first.
        torch._dynamo.reset()
        for system, fn in _systems(dev):
            yield from measure_system("cross_entropy", case, system,
                                      lambda: _measure("cross_entropy", case, system, fn, make_inputs, nbytes, ctx))
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        yield from _measure("cross_entropy", case + " out-of-place", "fmcore", lambda x, t: cross_entropy(x, t),
                            make_inputs, nbytes, ctx)
        floor_ms = nbytes / (ctx.roofline.copy_gbps * 1e9) * 1e3
        yield Row("cross_entropy", case, "floor", "ms", floor_ms, "ms: 2 N V bytes at the copy bandwidth")
