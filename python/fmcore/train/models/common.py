"""Pieces both model families share: the ops switch, causal (document-masked) attention, RoPE and the loss.

Every function takes ``ops``: "fmcore" calls fmcore's kernels (flash attention, the RoPE op, the fused
linear cross-entropy that never materialises the logits, the fused residual add + norm), "torch" the
plain PyTorch equivalents (SDPA, rotate-half, F.cross_entropy on the logits, ``h + branch`` then the norm). Both compute the same function; the A/B benchmark and the
quality comparison rely on that.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fmcore.nn.rotary import rope_cos_sin


@dataclass
class DocMask:
    """Where the documents packed into a batch start, in the form each ops path wants.

    cu_seqlens: int32 (n_docs + 1,) offsets into the flattened (B*S) tokens, for varlen flash attention.
    max_seqlen: the longest document (the loader knows it; S is a safe bound that needs no device sync).
    mask: bool (B, 1, S, S), True where query i may attend key j (same document and j <= i), for SDPA.
    """

    cu_seqlens: torch.Tensor | None
    max_seqlen: int
    mask: torch.Tensor | None


def doc_mask(positions: torch.Tensor, cu_seqlens: torch.Tensor | None, ops: str,
             max_seqlen: int | None = None) -> DocMask:
    """DocMask from the loader's positions (B, S) (restarting at 0 at each document) and cu_seqlens.

    Without cu_seqlens the fmcore path derives them from positions (one host sync), the documents the
    torch path's mask takes from positions: both paths compute the same function either way."""
    B, S = positions.shape
    if ops == "fmcore":
        if cu_seqlens is None:
            starts = positions == 0
            starts[:, 0] = True  # a row's start opens a document (as the torch path's cumsum, and the loader)
            idx = starts.reshape(-1).nonzero().squeeze(1)
            cu_seqlens = torch.cat([idx, idx.new_full((1,), B * S)])
        return DocMask(cu_seqlens.to(device=positions.device, dtype=torch.int32), max_seqlen or S, None)
    doc = torch.cumsum(positions == 0, dim=1)  # (B, S) document index within each row
    same = doc[:, :, None] == doc[:, None, :]
    causal = torch.ones(S, S, dtype=torch.bool, device=positions.device).tril()
    return DocMask(None, S, (same & causal)[:, None])


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ops: str,
                     docs: DocMask | None = None, window: int = 0) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + causal mask) v. q (B, S, Hq, D), k and v (B, S, Hk, D) with Hk | Hq.

    Returns (B, S, Hq, D). With docs, tokens attend only within their own document; with a window > 0,
    only to themselves and the window - 1 tokens before them."""
    B, S, H, D = q.shape
    if ops == "fmcore" and _flash_covers(q):
        from fmcore.ops import flash_attention, flash_attention_varlen

        window_size = (window - 1, 0) if window else (-1, -1)
        # q, k, v already carry autocast's dtype (they come out of a Linear).
        if docs is None:
            return flash_attention(q, k, v, causal=True, window_size=window_size)
        out = flash_attention_varlen(q.reshape(B * S, H, D), k.reshape(B * S, -1, D), v.reshape(B * S, -1, D),
                                     docs.cu_seqlens, docs.cu_seqlens, docs.max_seqlen, docs.max_seqlen,
                                     causal=True, window_size=window_size)
        return out.view(B, S, H, D)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = k.shape[1] != H
    if docs is not None and docs.mask is None:  # fmcore's varlen inputs, but its kernel does not apply
        docs = DocMask(None, S, _mask_from_cu_seqlens(docs.cu_seqlens, B, S))
    mask = None if docs is None else docs.mask
    if window and window < S:  # (SDPA has no window: an explicit mask, off its flash path)
        i = torch.arange(S, device=q.device)
        band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
        mask = band if mask is None else mask & band
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2)


def causal_attention_packed(qkv: torch.Tensor, ops: str, docs: DocMask | None = None) -> torch.Tensor:
    """causal_attention for q, k, v packed in qkv (B, S, 3, H, D), as a fused projection makes them
    (H heads each: no GQA). On the fmcore path one op whose backward writes qkv's gradient whole,
    where unbinding would make autograd stack the three gradients (a copy of them, every layer)."""
    B, S, _, H, D = qkv.shape
    if ops == "fmcore" and _flash_covers(qkv):
        from fmcore.ops import flash_attention_qkvpacked

        if docs is None:
            return flash_attention_qkvpacked(qkv, causal=True)
        out = flash_attention_qkvpacked(qkv.reshape(B * S, 3, H, D), docs.cu_seqlens, docs.max_seqlen, causal=True)
        return out.view(B, S, H, D)
    return causal_attention(*qkv.unbind(2), ops, docs)


_warned: set = set()


def _flash_covers(q: torch.Tensor) -> bool:
    """Whether fmcore's flash attention has a kernel for q (the CPU reference covers everything; CUDA
    covers bf16/fp16 and head dims 64/96/128). Otherwise SDPA runs instead, with a one-time warning."""
    if not q.is_cuda:
        return True
    from fmcore.ops import attention

    dtypes = getattr(attention, "CUDA_DTYPES", (torch.bfloat16, torch.float16))
    dims = getattr(attention, "CUDA_HEAD_DIMS", (64, 96, 128))
    if q.dtype in dtypes and q.shape[-1] in dims:
        return True
    key = (q.dtype, q.shape[-1])
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"fmcore flash attention has no CUDA kernel for {q.dtype} head dim {q.shape[-1]}; "
                      "using torch SDPA for this model", stacklevel=3)
    return False


def _mask_from_cu_seqlens(cu_seqlens: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """(B, 1, S, S) causal same-document mask from segment ends in the flattened (B*S) batch."""
    flat = torch.zeros(B * S, dtype=torch.int64, device=cu_seqlens.device)
    flat[cu_seqlens[1:-1].long()] = 1
    doc = torch.cumsum(flat, 0).view(B, S)
    causal = torch.ones(S, S, dtype=torch.bool, device=cu_seqlens.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def add_norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fmcore's fused residual add + norm with the parameters of ``norm`` (nn.LayerNorm or nn.RMSNorm):
    (norm(residual + x), residual + x), the stream being x itself when residual is None.

    The fmcore path's blocks hand the next norm (branch output, stream) so the add happens in its
    kernel. Under autocast the normed output comes in the autocast dtype: it feeds a matmul (the next
    projection or the head), which would cast nn.LayerNorm's fp32 output to exactly these values."""
    from fmcore.ops import add_norm as fused

    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    stream_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    eps = norm.eps if norm.eps is not None else torch.finfo(stream_dtype).eps  # nn.RMSNorm's default
    kind = "rms" if isinstance(norm, nn.RMSNorm) else "layer"
    return fused(x, residual, norm.weight, getattr(norm, "bias", None), eps=eps, kind=kind, out_dtype=out_dtype)


class HeadNorm(nn.RMSNorm):
    """RMSNorm over the last dim of q or k (B, S, H, head_dim), one weight (head_dim,) for every head
    (Qwen3's q_norm / k_norm). fp32 math rounded once to x's dtype on both ops paths, which flash
    attention and RoPE then read (under autocast: the projection's bf16): "fmcore" runs fmcore's
    RMSNorm kernel (add_norm without a residual), "torch" F.rms_norm.

    sum_grad: None, or (tensor parallelism, parallel.py) a function of the weight returning it with
    its gradient summed over the tensor-parallel ranks: each rank normalises its own heads, so its
    gradient of the replicated weight is a partial sum."""

    def __init__(self, head_dim: int, eps: float, ops: str):
        super().__init__(head_dim, eps=eps)
        self.ops = ops
        self.sum_grad = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.sum_grad is None else self.sum_grad(self.weight)
        if self.ops == "fmcore":
            from fmcore.ops import add_norm as fused

            return fused(x, None, weight, None, eps=self.eps, kind="rms", out_dtype=x.dtype)[0]
        math_dtype = torch.promote_types(x.dtype, torch.float32)  # (float64 stays float64)
        return F.rms_norm(x.to(math_dtype), (x.shape[-1],), weight.to(math_dtype), self.eps).to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, base: float,
                llama3: tuple[float, float, float, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos, sin of shape (max_seq_len, head_dim/2) (Llama's rotate-half angles), as
    fmcore.nn.RotaryEmbedding's table. llama3: (factor, low_freq_factor, high_freq_factor,
    original_max_len) of Llama 3.1's frequency scaling (model.rope_scaling "llama3"), else None."""
    if llama3 is None:
        return rope_cos_sin(torch.arange(max_seq_len), head_dim, base)
    angles = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * llama3_inv_freq(head_dim, base, *llama3)
    return angles.cos().float(), angles.sin().float()


def llama3_inv_freq(head_dim: int, base: float, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_len: int) -> torch.Tensor:
    """fp64 (head_dim/2,) RoPE inverse frequencies with Llama 3.1's scaling (transformers' rope_type
    "llama3"): a wavelength (2 pi / frequency) longer than original_max_len / low_freq_factor is stretched
    by factor, one shorter than original_max_len / high_freq_factor kept, and those between blended
    linearly in original_max_len / wavelength. (transformers computes the same in fp32.)"""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv / factor + smooth * inv
    long, short = wavelen > original_max_len / low_freq_factor, wavelen < original_max_len / high_freq_factor
    return torch.where(long, inv / factor, torch.where(short, inv, blended))


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ops: str):
    """Rotate-half RoPE of q (B, S, Hq, D) and k (B, S, Hk, D); cos/sin (S, D/2) or (B, S, D/2) fp32.

    Both paths compute in fp32 and round once to q's dtype."""
    if ops == "fmcore":
        from fmcore.ops import apply_rotary

        return apply_rotary(q, k, cos, sin)
    cos = cos.unsqueeze(-2)  # broadcast over heads
    sin = sin.unsqueeze(-2)

    def rotate(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def lm_loss(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ops: str) -> torch.Tensor:
    """Mean next-token cross-entropy of the head ``h @ weight.T`` against target; h (B, S, dim),
    weight (V, dim), target (B, S) int64 (-100 is ignored). fp32 loss."""
    h = h.reshape(-1, h.shape[-1])
    if ops == "fmcore":
        from fmcore.ops import linear_cross_entropy

        # Under autocast the op casts h and weight like F.linear would and returns an fp32 loss.
        if h.dtype in (torch.bfloat16, torch.float16) and weight.dtype == h.dtype and \
                h.device.type in ("cpu", "cuda") and not torch.is_autocast_enabled(h.device.type):
            # bf16 weights (train.precision "bf16"): outside autocast the op returns the loss in h's
            # dtype, as F.cross_entropy does, and .float() came too late: the logged train and eval
            # losses were bf16 roundings (6.9375 for 6.9399; steps of 1/32 near 7) where the torch
            # path's, on fp32 logits, were not. An autocast to h's own dtype casts nothing and
            # returns the fp32 loss the op accumulated. (Only for a weight of h's dtype: the autocast
            # cast an fp32 weight to bf16 silently, where the op and F.linear refuse the mismatch.)
            with torch.autocast(h.device.type, dtype=h.dtype):
                return linear_cross_entropy(h, weight, target.reshape(-1))
        return linear_cross_entropy(h, weight, target.reshape(-1)).float()
    logits = F.linear(h, weight)
    return F.cross_entropy(logits.float(), target.reshape(-1))
