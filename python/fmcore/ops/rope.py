"""Rotary position embedding (RoPE) for q and k in one kernel.

``apply_rotary(q, k, cos, sin)`` rotates the first R features of every head of q and k, where
cos/sin have shape (S, R/2) or (B, S, R/2); features R..D-1 pass through. Math in fp32 whatever the
input dtype. The backward is the inverse rotation of the incoming gradients (no activations saved,
only cos/sin). Layouts: "bshd" (B, S, H, D), what flash attention and a fused qkv projection give,
and "bhsd" (B, H, S, D), what Hugging Face models use. Any strides work as long as the last dim is
contiguous, so q and k sliced out of a qkv projection need no copy.
"""

from __future__ import annotations

import torch

from fmcore.ops._common import dense_last_dim, tensor_meta, zeros_if_none

_SEQ_DIM = {"bshd": 1, "bhsd": 2}


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
        inplace: overwrite q and k (no autograd).
        layout: "bshd" or "bhsd".
    Returns:
        (q_rotated, k_rotated); q and k themselves when inplace.
    """
    if layout not in _SEQ_DIM:
        raise ValueError(f"expected layout 'bshd' or 'bhsd', got {layout!r}")
    seq_dim = _SEQ_DIM[layout]
    if inplace:
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            raise ValueError("inplace=True overwrites q and k, which autograd needs; use inplace=False")
        torch.ops.fmcore.rope_(q, k, cos, sin, interleaved, False, seq_dim)
        return q, k
    return torch.ops.fmcore.rope(q, k, cos, sin, interleaved, False, seq_dim)


@torch.library.register_fake("fmcore::rope")
def _rope_fake(q, k, cos, sin, interleaved=False, conjugate=False, seq_dim=1):
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.register_fake("fmcore::rope_")
def _rope_inplace_fake(q, k, cos, sin, interleaved=False, conjugate=False, seq_dim=1):
    return None


def _rope_setup_context(ctx, inputs, output):
    _, _, cos, sin, interleaved, conjugate, seq_dim = inputs
    ctx.save_for_backward(cos, sin)
    ctx.interleaved, ctx.conjugate, ctx.seq_dim = interleaved, conjugate, seq_dim
    ctx.q_meta, ctx.k_meta = tensor_meta(output[0]), tensor_meta(output[1])


def _rope_backward(ctx, grad_q, grad_k):
    cos, sin = ctx.saved_tensors
    grad_q = dense_last_dim(zeros_if_none(grad_q, ctx.q_meta))
    grad_k = dense_last_dim(zeros_if_none(grad_k, ctx.k_meta))
    # A rotation's transpose is its inverse: rotate the gradients backwards.
    dq, dk = torch.ops.fmcore.rope(grad_q, grad_k, cos, sin, ctx.interleaved, not ctx.conjugate, ctx.seq_dim)
    return dq, dk, None, None, None, None, None


torch.library.register_autograd("fmcore::rope", _rope_backward, setup_context=_rope_setup_context)
