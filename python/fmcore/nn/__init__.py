"""Drop-in modules built from fmcore's ops."""

from fmcore.nn.rotary import RotaryEmbedding, apply_rotary_pos_emb

__all__ = ["RotaryEmbedding", "apply_rotary_pos_emb"]
