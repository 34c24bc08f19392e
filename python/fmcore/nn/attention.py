"""Attention: fused qkv projection, RoPE (fmcore's op), flash attention, output projection."""

from __future__ import annotations

import torch
from torch import nn

from fmcore.nn.rotary import RotaryEmbedding
from fmcore.ops.attention import _window, flash_attention, flash_attention_varlen


class Attention(nn.Module):
    """Multi-head self-attention with GQA/MQA, rotary positions and optional document masking.

    Args:
        dim: model width.
        n_heads: query heads Hq.
        n_kv_heads: key/value heads Hk (must divide n_heads); defaults to n_heads (MHA).
        head_dim: per-head width; defaults to dim // n_heads (64, 96 or 128 for the CUDA kernels).
        max_seq_len: length of the cached RoPE tables: without positions, S must not exceed it
            (explicit positions are computed, not looked up, and may be any ints).
        rope_base: RoPE frequency base; None disables rotary embeddings.
        causal: causal masking (language models).
        window: a sliding window (left, right), flash_attention's window_size: each token sees the
            tokens at most `left` before it and `right` after it (-1: no bound; right must be -1 or
            0 when causal). (-1, -1), the default, is none; Mistral's sliding window W is (W - 1, 0).
        bias: biases on the qkv and output projections.

    forward(x (B, S, dim), positions=None, cu_seqlens=None, max_seqlen=None) -> (B, S, dim).
    positions (B, S) int are the RoPE positions (default 0..S-1); with packed documents they restart
    at each document. cu_seqlens (N + 1,) int32 are cumulative document lengths over the B * S
    flattened tokens (documents never cross a row of the batch when they come from fmcore's loader,
    but nothing here requires it): attention then stays within each document (varlen kernel).
    max_seqlen: the longest document (when None: computed from cu_seqlens with a host sync, or B * S,
        an upper bound, under torch.compile).
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None, *,
                 max_seq_len: int = 4096, rope_base: float | None = 10000.0, causal: bool = True,
                 window: tuple[int, int] = (-1, -1), bias: bool = False):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise ValueError(f"expected n_heads > 0 and n_kv_heads > 0 dividing it, got n_heads={n_heads}, "
                             f"n_kv_heads={n_kv_heads}")
        if head_dim is None and dim % n_heads:
            raise ValueError(f"expected dim ({dim}) to be a multiple of n_heads ({n_heads}), or an explicit head_dim")
        head_dim = dim // n_heads if head_dim is None else head_dim
        if head_dim <= 0:
            raise ValueError(f"expected head_dim > 0, got {head_dim} (dim={dim}, n_heads={n_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim, self.causal = n_heads, n_kv_heads, head_dim, causal
        self.window = _window(window, causal)  # checked now, not at the first forward
        self.qkv = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * head_dim, bias=bias)
        self.proj = nn.Linear(n_heads * head_dim, dim, bias=bias)
        self.rope = RotaryEmbedding(head_dim, max_seq_len, base=rope_base) if rope_base is not None else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.qkv.in_features:
            raise ValueError(f"expected x of shape (B, S, {self.qkv.in_features}), got {tuple(x.shape)}")
        B, S, _ = x.shape
        Hq, Hk, hd = self.n_heads, self.n_kv_heads, self.head_dim
        # One projection; q, k, v are strided views of it, read in place by the kernels.
        q, k, v = self.qkv(x).view(B, S, Hq + 2 * Hk, hd).split([Hq, Hk, Hk], dim=2)
        if self.rope is not None:
            q, k = self.rope(q, k, positions)
        if cu_seqlens is None:
            out = flash_attention(q, k, v, causal=self.causal, window_size=self.window)
        else:
            if max_seqlen is None and torch.compiler.is_compiling():
                max_seqlen = B * S  # an upper bound: the exact one is data the trace cannot read
            elif max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            out = flash_attention_varlen(q.reshape(B * S, Hq, hd), k.reshape(B * S, Hk, hd),
                                         v.reshape(B * S, Hk, hd), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                         causal=self.causal, window_size=self.window)
        return self.proj(out.reshape(B, S, Hq * hd))
