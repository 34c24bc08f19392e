"""Bias + GELU: ``bias_gelu(x, bias)`` is ``F.gelu(x + bias)``, with the bias gradient computed inside
the backward's one pass instead of a reduction of its own.

An MLP's first projection written as ``bias_gelu(F.linear(x, fc.weight), fc.bias)`` computes what
``F.gelu(fc(x))`` does. Eagerly, the linear adds its bias for free inside the matmul, but autograd then
sums the gradient over all rows in a separate kernel after gelu_backward wrote it: here the backward
reads (grad, x) once, writes grad_x and adds each block's rows into a partial row (summed in a fixed
order: bitwise reproducible). Math in fp32 (fp64 for fp64 inputs on the CPU), torch's formulas.
Kernels: csrc/kernels/gelu.h.

Autograd is C++ (csrc/ops/gelu_autograd.cpp), as add_norm's, for the per-call cost; first-order
gradients only.
"""

from __future__ import annotations

import torch

_TANH = {"none": False, "tanh": True}
# The overload itself: calling it skips the packet's per-call overload resolution.
_bias_gelu = torch.ops.fmcore.bias_gelu.default


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None = None, *, approximate: str = "none") -> torch.Tensor:
    """GELU of x + bias (broadcast over the last dim), as ``F.gelu(x + bias, approximate=...)``.

    Args:
        x: (..., D), float32/bfloat16/float16 (float64 too on the CPU). Any strides (a non-contiguous
            x is copied first).
        bias: (D,) of x's dtype or float32 (a float32 parameter under autocast), or None.
        approximate: "none" (the erf form) or "tanh" (GPT-2's).
    Returns:
        x's shape and dtype, contiguous.
    """
    tanh = _TANH.get(approximate)
    if tanh is None:
        raise ValueError(f"expected approximate 'none' or 'tanh', got {approximate!r}")
    return _bias_gelu(x, bias, tanh)


@torch.library.register_fake("fmcore::bias_gelu")
def _bias_gelu_fake(x, bias, tanh=False):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("fmcore::bias_gelu_bwd")
def _bias_gelu_bwd_fake(grad_out, x, bias, tanh=False, grad_bias=True):
    grad_bias_shape = (x.shape[-1],) if grad_bias and bias is not None else (0,)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(grad_bias_shape, dtype=x.dtype if bias is None else bias.dtype))
