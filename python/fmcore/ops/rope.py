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

from fmcore.ops._common import expect_tensors, is_batched, register_fake, unwrap_batched

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
            grad mode is on). q and k may be slices of one fused qkv buffer, but not under
            torch.compile(dynamic=True) with inductor up to torch 2.14 at least, which passes such
            slices to an in-place op without their storage offsets (pytorch/pytorch#198068: with
            any custom op the writes land at the buffer's start, silently; here the call is refused
            as q and k sharing memory): use inplace=False there.
        layout: "bshd" or "bhsd".
    Returns:
        (q_rotated, k_rotated); q and k themselves when inplace.
    """
    seq_dim = _SEQ_DIM.get(layout)
    if seq_dim is None:
        raise ValueError(f"expected layout 'bshd' or 'bhsd', got {layout!r}")
    try:
        if inplace:
            if _copy_back(q, k):
                return _rope_by_copy(q, k, cos, sin, interleaved, seq_dim)
            _rope_(q, k, cos, sin, interleaved, False, seq_dim)
            return q, k
        return _rope(q, k, cos, sin, interleaved, False, seq_dim)
    except (RuntimeError, NotImplementedError):
        expect_tensors(q=q, k=k, cos=cos, sin=sin)
        raise


def _copy_back(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether inplace=True must rotate out of place and copy back: under torch.func.vmap, which has no
    batching rule for an in-place custom op ("Batching rule not implemented for fmcore::rope_"; the
    copies batch like any torch op)."""
    return is_batched(q) or is_batched(k)


def _rope_by_copy(q, k, cos, sin, interleaved, seq_dim):
    # rope_'s own checks first (the copies would accept k is q, rotating it once; and a copy into a
    # q or k that requires grad would be recorded by autograd, where rope_ refuses it).
    if torch.is_grad_enabled() and (_requires_grad(q) or _requires_grad(k)):
        raise ValueError("rope_ (apply_rotary inplace=True) overwrites q and k, which autograd needs for q or k "
                         "that require grad; use inplace=False")
    if q is k:
        raise ValueError("in-place rope: q and k share memory (k is q, or they overlap; views of one buffer with "
                         "other strides are refused where their extents meet); rotate them separately or use "
                         "inplace=False")
    q_rot, k_rot = _rope(q, k, cos, sin, interleaved, False, seq_dim)
    q.copy_(q_rot)
    k.copy_(k_rot)
    return q, k


def _requires_grad(t: torch.Tensor) -> bool:
    """t.requires_grad, through vmap's wrappers (while dynamo traces, t reports the requires_grad of the
    tensor vmap wraps)."""
    return t.requires_grad if torch.compiler.is_compiling() else unwrap_batched(t).requires_grad


@register_fake("rope")
def _rope_fake(q, k, cos, sin, interleaved=False, conjugate=False, seq_dim=1):
    return torch.empty_like(q), torch.empty_like(k)


@register_fake("rope_")
def _rope_inplace_fake(q, k, cos, sin, interleaved=False, conjugate=False, seq_dim=1):
    return None
