"""The MLP activations, each one pass over memory each way. Kernels: csrc/kernels/activation.h.

``bias_gelu(x, bias)`` is ``F.gelu(x + bias)``, with the bias gradient computed inside the backward's
one pass instead of a reduction of its own.

An MLP's first projection written as ``bias_gelu(F.linear(x, fc.weight), fc.bias)`` computes what
``F.gelu(fc(x))`` does. Eagerly, the linear adds its bias for free inside the matmul, but autograd then
sums the gradient over all rows in a separate kernel after gelu_backward wrote it: here the backward
reads (grad, x) once, writes grad_x and adds each block's rows into a partial row (summed in a fixed
order: bitwise reproducible).

``swiglu(gate, up)`` is ``F.silu(gate) * up`` (Llama's MLP); ``swiglu(gate_up)`` takes the output of one
fused gate/up projection, (..., 2F) with gate first, and its backward writes that projection's gradient
whole (no concatenation of two gradients). Eagerly the forward writes and re-reads silu(gate), and the
backward runs three products and a concatenation: 36 bytes an element in bf16 against 16 here.

Math in fp32 (fp64 for fp64 inputs on the CPU), torch's formulas, rounded once. Autograd is C++
(csrc/ops/activation_autograd.cpp), as add_norm's, for the per-call cost; first-order gradients only.
"""

from __future__ import annotations

import torch

from fmcore.ops._common import expect_tensors, register_fake

_TANH = {"none": False, "tanh": True}
# The overload itself: calling it skips the packet's per-call overload resolution.
_bias_gelu = torch.ops.fmcore.bias_gelu.default
_swiglu = torch.ops.fmcore.swiglu.default


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None = None, *, approximate: str = "none") -> torch.Tensor:
    """GELU of x + bias (broadcast over the last dim), as ``F.gelu(x + bias, approximate=...)``.

    Args:
        x: (..., D), float32/bfloat16/float16 (float64 too on the CPU). Any strides (a non-contiguous
            x is copied first).
        bias: (D,) of x's dtype, or float32 for a 16-bit x (a float32 parameter under autocast), or None.
        approximate: "none" (the erf form) or "tanh" (GPT-2's).
    Returns:
        x's shape and dtype, contiguous.
    """
    tanh = _TANH.get(approximate)
    if tanh is None:
        raise ValueError(f"expected approximate 'none' or 'tanh', got {approximate!r}")
    try:
        return _bias_gelu(x, bias, tanh)
    except (RuntimeError, NotImplementedError):
        expect_tensors(x=x)
        raise


def swiglu(gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """``F.silu(gate) * up``; with up None, gate is (..., 2F): the gate, then the up projection.

    Args:
        gate: (..., F), or (..., 2F) with up None; float32/bfloat16/float16 (float64 too on the CPU).
            Any strides (a non-contiguous input is copied first).
        up: (..., F) of gate's shape and dtype, or None.
    Returns:
        (..., F), gate's dtype, contiguous.
    """
    try:
        return _swiglu(gate, up)
    except (RuntimeError, NotImplementedError):
        expect_tensors(gate=gate)
        raise


@register_fake("bias_gelu")
def _bias_gelu_fake(x, bias, tanh=False):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@register_fake("bias_gelu_bwd")
def _bias_gelu_bwd_fake(grad_out, x, bias, tanh=False, grad_bias=True):
    grad_bias_shape = (x.shape[-1],) if grad_bias and bias is not None else (0,)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(grad_bias_shape, dtype=x.dtype if bias is None else bias.dtype))


@register_fake("swiglu")
def _swiglu_fake(gate, up):
    F = gate.shape[-1] if up is not None else gate.shape[-1] // 2
    return gate.new_empty((*gate.shape[:-1], F))


@register_fake("swiglu_bwd")
def _swiglu_bwd_fake(grad_out, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape if up is not None else (0,))
