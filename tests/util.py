"""Comparison helpers (tolerances relative to torch's own error, never magic numbers), and cpu_threads."""

from __future__ import annotations

import contextlib

import torch

# Floor under the "twice torch's error" rule, for outputs where torch happens to be exact.
ULP_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.detach().double() - ref.detach().double()).abs().max().item() if x.numel() else 0.0


def assert_close_to_ref(out: torch.Tensor, ref: torch.Tensor, torch_out: torch.Tensor, name: str,
                        factor: float = 2.0, floor_dtype: torch.dtype | None = None) -> None:
    """out's error against the float64 reference is at most factor x torch's same-dtype error
    (plus a per-dtype floor scaled by the reference's magnitude: out's dtype's, or floor_dtype's for an
    fp32 result of bf16 computations)."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (an unwritten element?)"
    err, terr = max_err(out, ref), max_err(torch_out, ref)
    scale = max(ref.abs().max().item(), 1.0) if ref.numel() else 1.0
    bound = factor * terr + ULP_FLOOR[floor_dtype or out.dtype] * scale
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (torch's own error {terr:.3g})"


# fp32 inputs across the whole range: 0, tiny, ordinary, where exponentials saturate, where cubes and
# products overflow, the largest finite values, +-inf and NaN (for elementwise ops' edge cases)
EXTREME_VALUES = [0.0, 1e-30, 1.0, 5.0, 10.0, 30.0, 100.0, 1e4, 1e13, 1e20, 3e38, float("inf")]
EXTREME_VALUES = [-v for v in EXTREME_VALUES[::-1]] + EXTREME_VALUES + [float("nan")]

# Whether torch.compile's partitioner recomputes fmcore's attention forward inside a full activation
# checkpoint. torch 2.11 leaves that op (a custom op with a Python autograd formula) untagged inside the
# checkpoint, so it keeps out and lse instead; 2.14 tags and recomputes it. (Versions between unchecked.)
COMPILE_RECOMPUTES_ATTENTION = torch.__version__ >= "2.14"


def assert_edges_like_torch(out: torch.Tensor, ref: torch.Tensor, torch_out: torch.Tensor, name: str) -> None:
    """For inputs at the edges of the range (EXTREME_VALUES): out is NaN and +-inf exactly where torch's
    own same-dtype result is, and its finite elements are within 1e-6 (absolute, or 1e-5 relative) of
    the float64 reference."""
    for what in ("isnan", "isposinf", "isneginf"):
        got, want = getattr(out, what)(), getattr(torch_out, what)()
        assert torch.equal(got, want), f"{name}: {what} at {got.nonzero().flatten().tolist()}, torch at " \
                                       f"{want.nonzero().flatten().tolist()}"
    finite = torch_out.isfinite()
    torch.testing.assert_close(out[finite].double(), ref[finite], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def assert_compiles_like_eager(fn, inputs: tuple[torch.Tensor, ...], device: torch.device) -> None:
    """fn (inputs -> a scalar loss) under torch.compile(fullgraph=True), with inductor on CUDA and
    aot_eager on the CPU, gives eager fn's loss and gradients with respect to inputs."""
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    loss_c = compiled(*inputs)
    got = torch.autograd.grad(loss_c, inputs)
    loss_e = fn(*inputs)
    want = torch.autograd.grad(loss_e, inputs)
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@contextlib.contextmanager
def cpu_threads(n: int):
    """torch's intra-op CPU thread count set to n inside the block, restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
