"""Fused residual add + LayerNorm / RMSNorm: a pre-norm block boundary in one pass.

``add_norm(x, residual, weight, bias)`` returns ``(norm(x + residual) * weight + bias, x + residual)``:
the branch output x joins the residual stream and the next norm reads it in the same kernel, so the
stream crosses memory once each way instead of three times (the add's read, read, write, then the
norm's read). A block then hands the next one (branch output, stream) and the add happens there::

    normed, stream = add_norm(emb, None, ln_1.weight, ln_1.bias)        # first block: no add
    x = attention(normed)
    normed, stream = add_norm(x, stream, ln_2.weight, ln_2.bias)
    ...

Math in fp32 (fp64 for fp64 inputs on the CPU): the sum is rounded once to the stream's dtype and
the statistics are taken from that rounded sum, exactly what ``F.layer_norm(x + residual, ...)``
computes. The backward recomputes the normalised values from the saved sum and the per-row mean
and 1/std (fp32, 8 bytes a row); the weight and bias gradients are reduced deterministically
(per-block partial sums, then a second pass in a fixed order), and only the gradients some input
needs are computed (frozen norm weights cost no dweight pass). Kernels: csrc/kernels/norm.h.
Finite rows whose fp32 sum of squares overflows (values past ~1e19 / sqrt(D)) are normalized as in
float64 (the CPU sums in fp64; CUDA takes such a row's statistics again scaled by 2^-72), where
torch's fp32 statistics give rstd 0 (the output is the bias, the gradients 0) or NaN.

Autograd is C++ (csrc/ops/norm_autograd.cpp), not torch.library.register_autograd: the Python
autograd kernel cost ~90 us per call with grad, and the models call add_norm ~25 times a step
(docs/design-notes.md). For the same reason this wrapper is one dict lookup, the default out_dtype
and one call of the cached OpOverload; the C++ op validates every tensor. First-order gradients
only: double backward (differentiating a gradient taken with create_graph=True) raises.
"""

from __future__ import annotations

import torch

from fmcore.ops._common import expect_tensors, register_fake

_KINDS = {"layer": False, "rms": True}
# The overload itself: calling it skips the packet's per-call overload resolution.
_add_norm_fwd = torch.ops.fmcore.add_norm_fwd.default


def add_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    eps: float = 1e-5,
    kind: str = "layer",
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new_residual) for x (..., D) joining the residual stream.

    Args:
        x: the branch output (or, with no residual, the stream itself); float32/bfloat16/float16
            (float64 too on the CPU). Any strides (a non-contiguous x is copied first).
        residual: the stream before x is added, of x's shape and any float dtype, or None.
        weight, bias: (D,), one dtype; bias only for kind "layer" (None: no bias).
        eps: added to the variance (the mean square for RMSNorm).
        kind: "layer" (LayerNorm: subtract the mean) or "rms" (RMSNorm).
        out_dtype: normed's dtype. None: what ``F.layer_norm(x + residual, ...)`` (``F.rms_norm``)
            returns there: the stream's dtype, or float32 under CUDA autocast, which runs both norms
            in fp32. A caller whose next op is a matmul under autocast can pass the autocast dtype:
            the matmul receives the same values (fp32 math rounded once) and half the bytes move.
    Returns:
        normed: ``norm(x + residual) * weight (+ bias)``, x's shape, out_dtype.
        new_residual: ``x + residual`` in ``torch.promote_types(x.dtype, residual.dtype)``
            (an fp32 stream stays fp32 when bf16 branch outputs join it), or x itself (not a copy)
            when residual is None. Both carry gradients: the stream's gradient is added to the
            norm's inside the backward kernel.

    Raises ValueError naming the argument for bad shapes, dtypes or kind, RuntimeError for mixed
    devices. CUDA takes D up to 16384.
    """
    rms = _KINDS.get(kind)
    if rms is None:
        raise ValueError(f"expected kind 'layer' or 'rms', got {kind!r}")
    if out_dtype is None:
        out_dtype = _default_out_dtype(x, residual)
    try:
        out, stream, _, _ = _add_norm_fwd(x, residual, weight, bias, eps, rms, out_dtype)
    except (RuntimeError, NotImplementedError):
        expect_tensors(weight=weight)
        raise
    return out, (x if residual is None else stream)


def _default_out_dtype(x: torch.Tensor, residual: torch.Tensor | None) -> torch.dtype:
    expect_tensors(x=x)  # else an AttributeError below
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.float32
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


@register_fake("add_norm_fwd")
def _add_norm_fwd_fake(x, residual, weight, bias, eps, rms, out_dtype):
    stream = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    stats = torch.float64 if stream == torch.float64 else torch.float32
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    return (x.new_empty(x.shape, dtype=out_dtype),
            x.new_empty(x.shape if residual is not None else (0,), dtype=stream),
            x.new_empty((0 if rms else rows,), dtype=stats),
            x.new_empty((rows,), dtype=stats))


@register_fake("add_norm_bwd")
def _add_norm_bwd_fake(grad_out, grad_residual_out, s, weight, mean, rstd, rms, has_residual, has_bias, x_dtype,
                       residual_dtype, grad_input=True, grad_weight=True):
    D = s.shape[-1]
    return (s.new_empty(s.shape if grad_input else (0,), dtype=x_dtype),
            s.new_empty(s.shape if grad_input and residual_dtype is not None else (0,),
                        dtype=residual_dtype or s.dtype),
            weight.new_empty((D if grad_weight else 0,)),
            weight.new_empty((D if has_bias else 0,)))
