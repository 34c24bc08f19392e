"""RotaryEmbedding: cached cos/sin tables and fmcore's RoPE op, plus Hugging Face's call signature."""

from __future__ import annotations

import torch
from torch import nn

from fmcore.ops.rope import apply_rotary


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over the first ``rotary_dim`` features of each head.

    Args:
        dim: the rotary dim R (even); usually the head dim.
        max_seq_len: the table length; positions must be < max_seq_len.
        base: the frequency base (10000 for GPT-NeoX/Llama 2, 500000 for Llama 3).
        interleaved: GPT-J pairs instead of rotate-half.

    The tables are fp32 buffers of shape (max_seq_len, dim/2), not saved in the state dict (they are a
    pure function of the arguments).
    """

    def __init__(self, dim: int, max_seq_len: int, base: float = 10000.0, interleaved: bool = False):
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"expected an even rotary dim > 0, got dim={dim}")
        if max_seq_len <= 0:
            raise ValueError(f"expected max_seq_len > 0, got {max_seq_len}")
        self.dim, self.max_seq_len, self.base, self.interleaved = dim, max_seq_len, base, interleaved
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", freqs.cos().float(), persistent=False)
        self.register_buffer("sin", freqs.sin().float(), persistent=False)

    def tables(self, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (max_seq_len, R/2), or (B, S, R/2) gathered at positions (B, S)."""
        if positions is None:
            return self.cos, self.sin
        return self.cos[positions], self.sin[positions]

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None = None,
                layout: str = "bshd") -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q and k; positions (B, S) int, e.g. restarting at each packed document."""
        cos, sin = self.tables(positions)
        return apply_rotary(q, k, cos, sin, interleaved=self.interleaved, layout=layout)

    def hf_cos_sin(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, R) tables in Hugging Face's convention (both halves repeated)."""
        cos, sin = self.tables(position_ids)
        return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         position_ids: torch.Tensor | None = None, unsqueeze_dim: int = 1):
    """Drop-in for Hugging Face's ``apply_rotary_pos_emb``: same arguments, same result.

    cos/sin are HF's (B, S, R) or (S, R) tables with both halves repeated; only the first half is
    read (no copy). unsqueeze_dim=1 means q is (B, H, S, D), 2 means (B, S, H, D).
    """
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"expected unsqueeze_dim 1 ((B, H, S, D) inputs) or 2 ((B, S, H, D)), got {unsqueeze_dim}")
    half = cos.shape[-1] // 2
    return apply_rotary(q, k, cos[..., :half], sin[..., :half], layout="bhsd" if unsqueeze_dim == 1 else "bshd")
