"""Drop-in modules built from fmcore's ops."""

from fmcore.nn.attention import Attention
from fmcore.nn.linear_cross_entropy import LinearCrossEntropy
from fmcore.nn.rotary import RotaryEmbedding, apply_rotary_pos_emb

__all__ = ["Attention", "LinearCrossEntropy", "RotaryEmbedding", "apply_rotary_pos_emb"]
