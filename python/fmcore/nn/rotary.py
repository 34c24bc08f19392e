"""RotaryEmbedding: cached cos/sin tables and fmcore's RoPE op, plus Hugging Face's call signature."""

from __future__ import annotations

import torch
from torch import nn

from fmcore.ops.rope import _SEQ_DIM, apply_rotary


def rope_cos_sin(positions: torch.Tensor, dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin of the rotary angles position * base^(-i/dim), i = 0, 2, ..., dim - 2, computed
    in fp64: shape (*positions.shape, dim/2), on positions' device."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim
    angles = positions.to(torch.float64).unsqueeze(-1) * (1.0 / (base ** exponents))
    return angles.cos().float(), angles.sin().float()


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over the first ``dim`` features of each head.

    Args:
        dim: the rotary dim R (even); usually the head dim.
        max_seq_len: the length of the cached table, used when no positions are given.
        base: the frequency base (10000 for GPT-NeoX/Llama 2, 500000 for Llama 3).
        interleaved: GPT-J pairs instead of rotate-half.

    The table is fp32 buffers of shape (max_seq_len, dim/2), computed in fp64, not saved in the state
    dict (a pure function of the arguments), and recomputed whenever the module moves or is cast:
    ``.to(torch.bfloat16)`` leaves it fp32. Built on the meta device, it is computed by
    ``.to_empty()``, or (after ``load_state_dict(..., assign=True)``, which skips it) on the device of
    the first real q. Explicit positions (any ints, any length) are computed the same way, not looked
    up, so none is ever out of the table's range.
    """

    def __init__(self, dim: int, max_seq_len: int, base: float = 10000.0, interleaved: bool = False):
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"expected an even rotary dim > 0, got dim={dim}")
        if max_seq_len <= 0:
            raise ValueError(f"expected max_seq_len > 0, got {max_seq_len}")
        if not 0 < base < float("inf"):
            raise ValueError(f"expected a finite base > 0, got {base}")
        self.dim, self.max_seq_len, self.base, self.interleaved = dim, max_seq_len, base, interleaved
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._build_table(self.cos.device)  # the default device (meta under torch.device("meta"))

    def _build_table(self, device: torch.device) -> None:
        # Never inference tensors: tables made under torch.inference_mode (a first forward there of a module
        # built on meta; any .to() there, even to where it already was) made every later training forward
        # raise "Inference tensors cannot be saved for backward" (the rope backward saves them).
        with torch.inference_mode(False):
            self.cos, self.sin = rope_cos_sin(torch.arange(self.max_seq_len, device=device), self.dim, self.base)

    def _apply(self, fn, recurse=True):
        try:
            super()._apply(fn, recurse)
        except NotImplementedError:
            if not self.cos.is_meta:
                raise
            # "Cannot copy out of meta tensor": .to(device) of a module built on the meta device
            # whose weights came by load_state_dict(assign=True), which skips these non-persistent
            # buffers. forward builds them where its q is.
            return self
        self._build_table(self.cos.device)  # fp32 and real whatever fn did (a cast, to_empty)
        return self

    def tables(self, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (max_seq_len, R/2), or (B, S, R/2) at integer positions (B, S)."""
        if positions is None:
            return self.cos, self.sin
        if not isinstance(positions, torch.Tensor) or positions.is_floating_point() or positions.is_complex():
            raise TypeError(f"expected positions to be an integer tensor, got "
                            f"{positions.dtype if isinstance(positions, torch.Tensor) else type(positions).__name__}")
        return rope_cos_sin(positions, self.dim, self.base)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None = None,
                layout: str = "bshd") -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q and k; positions (B, S) int, e.g. restarting at each packed document."""
        if self.cos.is_meta and not q.is_meta:  # (see _apply)
            self._build_table(q.device)
        seq_dim = _SEQ_DIM.get(layout)
        if positions is None and seq_dim is not None and isinstance(q, torch.Tensor) and q.dim() == 4 \
                and q.shape[seq_dim] > self.max_seq_len:  # (else apply_rotary's error names a cos it was not given)
            raise ValueError(f"expected at most max_seq_len={self.max_seq_len} positions in q ({layout!r}), got "
                             f"{q.shape[seq_dim]}: pass positions, or build RotaryEmbedding with a larger max_seq_len")
        cos, sin = self.tables(positions)
        return apply_rotary(q, k, cos, sin, interleaved=self.interleaved, layout=layout)

    def hf_cos_sin(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, R) tables in Hugging Face's convention (both halves repeated)."""
        cos, sin = self.tables(position_ids)
        return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         unsqueeze_dim: int = 1, *, position_ids: torch.Tensor | None = None):
    """Drop-in for Hugging Face's ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``: same
    arguments, same result.

    cos/sin are HF's (B, S, R) or (S, R) tables with both halves repeated; only the first half is
    read (no copy). unsqueeze_dim=1 means q is (B, H, S, D), 2 means (B, S, H, D). position_ids
    (keyword) is for callers written for transformers < 4.48, whose signature had it before
    unsqueeze_dim: with a whole (max_len, R) table it picks the rows, as transformers < 4.38 did;
    with per-sequence (B, S, R) tables it is ignored, as 4.38-4.47 did.
    """
    if not isinstance(unsqueeze_dim, int) or isinstance(unsqueeze_dim, bool) or unsqueeze_dim not in (1, 2):
        raise ValueError(f"expected unsqueeze_dim 1 ((B, H, S, D) inputs) or 2 ((B, S, H, D)), got {unsqueeze_dim!r}"
                         " (transformers < 4.48 callers: pass position_ids by keyword)")
    if position_ids is not None and cos.dim() == 2:
        cos, sin = cos[position_ids], sin[position_ids]
    half = cos.shape[-1] // 2
    try:
        return apply_rotary(q, k, cos[..., :half], sin[..., :half], layout="bhsd" if unsqueeze_dim == 1 else "bshd")
    except ValueError as e:
        if "cos" not in str(e) and "sin" not in str(e):
            raise
        # The op's message shows the half it was given: name the tables the caller passed.
        raise ValueError(f"{e} (the first half of the last dim of the Hugging Face tables passed: cos "
                         f"{tuple(cos.shape)}, sin {tuple(sin.shape)})") from None
