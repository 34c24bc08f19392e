"""RoPE benchmark: fmcore vs Hugging Face's eager rotate_half, torch.compile of it, and Liger.

Bytes moved = read q, k + write q, k (cos/sin are tiny and cached). Forward and backward are timed
separately; the backward of every system is the inverse rotation of random output gradients.
Liger's rope (system "liger") writes its result into q and k (in place: no output allocation and
no output write beyond the inputs'), where fmcore and torch return new tensors; its numbers are for
that in-place form. The rotation is repeated on the same tensors, which the timing does not mind.
call_overhead_us() measures the other side: the host cost of one eager call on tiny tensors, with
and without grad (the issue's aim: under 15 us per call on CUDA).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fmcore.bench import BenchContext, Row, measure_system, try_import
from fmcore.bench.timing import host_us_per_call, time_ms
from fmcore.ops import apply_rotary


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def hf_rope(q, k, cos, sin):
    """Hugging Face's apply_rotary_pos_emb on (B, S, H, D) with cos/sin (S, D)."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _tables(seqlen: int, dim: int, device, dtype):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(seqlen, device=device, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()  # (S, D/2) fp32


def _systems(q, k, cos_half, sin_half):
    """(name, forward fn on (q, k)) for each importable system; all compute the same rotation."""
    cos_full = torch.cat([cos_half, cos_half], -1).to(q.dtype)
    sin_full = torch.cat([sin_half, sin_half], -1).to(q.dtype)
    systems = [
        ("fmcore", lambda q, k: apply_rotary(q, k, cos_half, sin_half)),
        ("torch-eager", lambda q, k: hf_rope(q, k, cos_full, sin_full)),
    ]
    compiled = torch.compile(hf_rope, fullgraph=True)
    systems.append(("torch-compile", lambda q, k: compiled(q, k, cos_full, sin_full)))
    liger = try_import("liger_kernel.ops.rope")
    if liger is not None and q.is_cuda:
        # Liger takes (B, H, S, D) and cos/sin (1, S, D); the transposed views hold the same bytes.
        def liger_fn(q, k):
            out = liger.LigerRopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2), cos_full[None], sin_full[None])
            return out[0].transpose(1, 2), out[1].transpose(1, 2)

        systems.append(("liger", liger_fn))
    return systems


def call_overhead_us(device, *, calls: int = 2000, reps: int = 9) -> dict[tuple[str, str], float]:
    """Host microseconds per eager call on tiny tensors, {(system, what): us}: the cost of a call
    beyond its (negligible) kernel, i.e. dispatcher, autograd and Python wrapper.

    what: "op fwd no-grad" (torch.ops.fmcore.rope itself, fmcore only), "fwd no-grad", "fwd grad"
    (inputs require grad: autograd records the node) and "fwd+bwd" (forward, then autograd.grad);
    and "one op (neg) no-grad", torch-eager only: a single aten op (one allocation, one launch), the
    floor any op's call stands on on this machine.
    Each value is the median over `reps` runs of the mean of `calls` back-to-back calls (on CUDA
    the launches queue asynchronously; each run ends with a synchronize; on the CPU one intra-op
    thread: bench.timing.host_us_per_call).
    """
    device = torch.device(device)
    q = torch.randn(1, 1, 1, 64, device=device)
    k = torch.randn(1, 1, 1, 64, device=device)
    cos, sin = _tables(1, 64, device, torch.float32)
    cos_full, sin_full = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    op = torch.ops.fmcore.rope.default

    def fwd_bwd(fn):
        def call():
            out = fn(qg, kg)
            torch.autograd.grad(out, (qg, kg), (gq, gk))
        return call

    fm = lambda q, k: apply_rotary(q, k, cos, sin)  # noqa: E731
    hf = lambda q, k: hf_rope(q, k, cos_full, sin_full)  # noqa: E731
    cases = {
        ("fmcore", "op fwd no-grad"): lambda: op(q, k, cos, sin, False, False, 1),
        ("fmcore", "fwd no-grad"): lambda: fm(q, k),
        ("fmcore", "fwd grad"): lambda: fm(qg, kg),
        ("fmcore", "fwd+bwd"): fwd_bwd(fm),
        ("torch-eager", "one op (neg) no-grad"): lambda: torch.neg(q),
        ("torch-eager", "fwd no-grad"): lambda: hf(q, k),
        ("torch-eager", "fwd grad"): lambda: hf(qg, kg),
        ("torch-eager", "fwd+bwd"): fwd_bwd(hf),
    }
    return {key: host_us_per_call(fn, device, calls=calls, reps=reps, warmup=max(calls // 10, 10))
            for key, fn in cases.items()}


def run(ctx: BenchContext) -> Iterator[Row]:
    dev = ctx.device
    if ctx.quick:
        B, S, Hq, Hk, D, dtype = 2, 256, 8, 2, 64, torch.float32
    else:
        B, S, Hq, Hk, D, dtype = 8, 2048, 32, 8, 128, torch.bfloat16
    case = f"q({B},{S},{Hq},{D}) k({B},{S},{Hk},{D}) {str(dtype).removeprefix('torch.')}"
    q = torch.randn(B, S, Hq, D, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(B, S, Hk, D, device=dev, dtype=dtype, requires_grad=True)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    cos, sin = _tables(S, D, dev, torch.float32)
    nbytes = 2 * (q.numel() + k.numel()) * q.element_size()
    for system, fn in _systems(q, k, cos, sin):
        def measure(fn=fn, system=system):
            with torch.no_grad():
                fwd = time_ms(lambda: fn(q, k), dev)
            out = fn(q, k)
            # autograd.grad, not backward: no .grad accumulation kernels inside the timing
            bwd = time_ms(lambda: torch.autograd.grad(out, (q, k), (gq, gk), retain_graph=True), dev)
            return [row for phase, ms in (("fwd", fwd), ("bwd", bwd))
                    for row in ctx.bandwidth_rows("rope", f"{case} {phase}", system, ms, nbytes)]

        # A peer that fails (torch.compile raising, Liger's API moved) is skipped, not fatal.
        yield from measure_system("rope", case, system, measure)
    # Per-call overhead rows: metric "ms" (the row vocabulary has no "us"); the case says what.
    overhead = call_overhead_us(dev, calls=300, reps=5) if ctx.quick else call_overhead_us(dev)
    for (system, what), us in overhead.items():
        label = f"per-call overhead q(1,1,1,64) {what}"
        yield Row("rope", label, system, "ms", us / 1e3, "ms/call")
