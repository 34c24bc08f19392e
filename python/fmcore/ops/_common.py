"""Helpers shared by the Python side of fmcore's ops."""

from __future__ import annotations

import torch


def dense_last_dim(t: torch.Tensor) -> torch.Tensor:
    """t with a contiguous last dim. Autograd can hand backward expanded (stride-0) gradients."""
    return t if t.stride(-1) == 1 or t.size(-1) <= 1 else t.contiguous()
