"""fmcore's tensor ops. Each mirrors the signature users already call in PyTorch or Hugging Face."""

from fmcore.ops.attention import flash_attention, flash_attention_varlen, scaled_dot_product_attention
from fmcore.ops.rope import apply_rotary

__all__ = ["apply_rotary", "flash_attention", "flash_attention_varlen", "scaled_dot_product_attention"]
