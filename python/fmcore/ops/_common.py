"""Helpers shared by the Python side of fmcore's ops."""

from __future__ import annotations

import torch


def dense_last_dim(t: torch.Tensor) -> torch.Tensor:
    """t with a contiguous last dim. Autograd can hand backward expanded (stride-0) gradients."""
    return t if t.stride(-1) == 1 or t.size(-1) <= 1 else t.contiguous()


def tensor_meta(t: torch.Tensor) -> tuple:
    """What backward needs to build a zero gradient for t, without keeping t alive."""
    return (t.shape, t.dtype, t.device)


def zeros_if_none(grad: torch.Tensor | None, meta: tuple) -> torch.Tensor:
    """Autograd passes None for outputs that did not reach the loss."""
    if grad is not None:
        return grad
    shape, dtype, device = meta
    return torch.zeros(shape, dtype=dtype, device=device)
