"""Rotary position embedding (RoPE) for q and k in one kernel.

``apply_rotary(q, k, cos, sin)`` rotates the first R features of every head of q and k, where
cos/sin have shape (S, R/2) or (B, S, R/2); features R..D-1 pass through. Math in fp32 whatever the
input dtype. The backward is the inverse rotation of the incoming gradients (no activations saved,
only cos/sin). Layouts: "bshd" (B, S, H, D), what flash attention and a fused qkv projection give,
and "bhsd" (B, H, S, D), what Hugging Face models use. Any strides work as long as the last dim is
contiguous, so q and k sliced out of a qkv projection need no copy.

Autograd for both ops is C++ (csrc/ops/rope_autograd.cpp), not torch.library.register_autograd:
the Python autograd kernel cost ~45 us per call with grad (docs/design-notes.md). This wrapper is
kept to one dict lookup and one op call for the same reason; the C++ op validates every tensor.
"""

from __future__ import annotations

import torch

from fmcore.ops._common import expect_tensors, register_fake

_SEQ_DIM = {"bshd": 1, "bhsd": 2}
# The overloads themselves: calling them skips the packet's per-call overload resolution.
_rope = torch.ops.fmcore.rope.default
_rope_ = torch.ops.fmcore.rope_.default


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    interleaved: bool = False,
    inplace: bool = False,
    layout: str = "bshd",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, S, Hq, D) and k (B, S, Hk, D) by the angles whose cos/sin are given.

    Args:
        q, k: float32/bfloat16/float16, same dtype and device; Hk must divide Hq (GQA/MQA).
        cos, sin: (S', R/2) or (B, S', R/2) with S' >= S (a longer cached table is fine, its first S
            rows are used) and R <= D; float32 or q's dtype.
        interleaved: GPT-J pairs (x[2i], x[2i+1]) instead of GPT-NeoX/Llama rotate-half (x[i], x[i+R/2]).
        inplace: overwrite q and k (no autograd: raises ValueError if q or k requires grad while
            grad mode is on).
        layout: "bshd" or "bhsd".
    Returns:
        (q_rotated, k_rotated); q and k themselves when inplace.
    """
    seq_dim = _SEQ_DIM.get(layout)
    if seq_dim is None:
        raise ValueError(f"expected layout 'bshd' or 'bhsd', got {layout!r}")
    try:
        if inplace:
            _rope_(q, k, cos, sin, interleaved, False, seq_dim)
            return q, k
        return _rope(q, k, cos, sin, interleaved, False, seq_dim)
    except (RuntimeError, NotImplementedError):
        expect_tensors(q=q, k=k, cos=cos, sin=sin)
        raise


@register_fake("rope")
def _rope_fake(q, k, cos, sin, interleaved=False, conjugate=False, seq_dim=1):
    return torch.empty_like(q), torch.empty_like(k)


@register_fake("rope_")
def _rope_inplace_fake(q, k, cos, sin, interleaved=False, conjugate=False, seq_dim=1):
    return None
