"""fmcore's tensor ops. Each mirrors the signature users already call in PyTorch or Hugging Face."""

from fmcore.ops.adamw import grad_norm
from fmcore.ops.rope import apply_rotary

__all__ = ["apply_rotary", "grad_norm"]
