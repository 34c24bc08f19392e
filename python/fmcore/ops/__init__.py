"""fmcore's tensor ops. Each mirrors the signature users already call in PyTorch or Hugging Face."""

from fmcore.ops.activation import bias_gelu, swiglu
from fmcore.ops.adamw import grad_norm
from fmcore.ops.attention import (
    attention_tiles,
    flash_attention,
    flash_attention_qkvpacked,
    flash_attention_varlen,
    scaled_dot_product_attention,
)
from fmcore.ops.cross_entropy import cross_entropy
from fmcore.ops.linear_cross_entropy import linear_cross_entropy
from fmcore.ops.norm import add_norm
from fmcore.ops.rope import apply_rotary

__all__ = [
    "add_norm",
    "apply_rotary",
    "attention_tiles",
    "bias_gelu",
    "cross_entropy",
    "flash_attention",
    "flash_attention_qkvpacked",
    "flash_attention_varlen",
    "grad_norm",
    "linear_cross_entropy",
    "scaled_dot_product_attention",
    "swiglu",
]
