"""The RoPE CPU path (the reference users without a GPU run) under pytest-benchmark."""

import torch

from fmcore.ops import apply_rotary


def test_rope_cpu_fp32(benchmark):
    q = torch.randn(2, 512, 16, 64)
    k = torch.randn(2, 512, 4, 64)
    theta = torch.rand(512, 32)
    cos, sin = theta.cos(), theta.sin()
    benchmark(apply_rotary, q, k, cos, sin)
