"""LinearCrossEntropy: the lm head and its loss in one module, without materialising the logits."""

from __future__ import annotations

import math

import torch
from torch import nn

from fmcore.ops.linear_cross_entropy import linear_cross_entropy


class LinearCrossEntropy(nn.Module):
    """``F.cross_entropy(F.linear(hidden, weight, bias), target)`` via fmcore.ops.linear_cross_entropy.

    Args:
        dim: the hidden size D.
        vocab_size: the number of classes V.
        bias: add a learnable (V,) bias.

    ``weight`` is an ordinary (V, D) parameter, initialised like nn.Linear's; to tie it to an input
    embedding assign the embedding's parameter (``head.weight = model.embed.weight``): autograd then
    sums both uses' gradients. Keyword arguments of forward (ignore_index, label_smoothing,
    reduction, z_loss, chunk_size, return_lse) are those of the op.
    """

    def __init__(self, dim: int, vocab_size: int, bias: bool = False, *, device=None, dtype=None):
        super().__init__()
        if dim <= 0 or vocab_size <= 0:
            raise ValueError(f"expected dim > 0 and vocab_size > 0, got dim={dim}, vocab_size={vocab_size}")
        self.dim, self.vocab_size = dim, vocab_size
        self.weight = nn.Parameter(torch.empty(vocab_size, dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(vocab_size, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialisation
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.dim)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, hidden: torch.Tensor, target: torch.Tensor, **kwargs):
        """Loss of hidden (N, D) or (B, S, D) against target (N,) or (B, S)."""
        return linear_cross_entropy(hidden, self.weight, target, self.bias, **kwargs)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The full logits, for generation and evaluation code that needs them."""
        return nn.functional.linear(hidden, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, vocab_size={self.vocab_size}, bias={self.bias is not None}"
