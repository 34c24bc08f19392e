"""The CPU paths of the elementwise and loss ops (fmcore's own vectorized loops) beside the plain PyTorch
they replace, under pytest-benchmark: one group per op, fmcore's and torch's forward + backward, on the
tiny preset's shapes (16 x 128 tokens; MLP width 512, vocabulary 4096)."""

import pytest
import torch
import torch.nn.functional as F

from fmcore.ops import bias_gelu, cross_entropy, swiglu

ROWS = 16 * 128


def fwd_bwd(benchmark, fn, *inputs):
    """Times fn(*inputs) and its backward from a random output gradient, as a layer inside a model
    receives (the gradient of a .sum() would be an expanded scalar, which torch's elementwise backward
    reads as it is and fmcore's copies out)."""
    grad = torch.randn_like(fn(*inputs))
    benchmark(lambda: torch.autograd.grad(fn(*inputs), inputs, grad))


@pytest.mark.parametrize("system", ["fmcore", "torch"])
def test_bias_gelu_tanh(benchmark, system):
    benchmark.group = "bias + GELU (tanh) (2048, 512) fp32 fwd+bwd"
    x = torch.randn(ROWS, 512, requires_grad=True)
    b = torch.randn(512, requires_grad=True)
    fn = ((lambda x, b: bias_gelu(x, b, approximate="tanh")) if system == "fmcore"
          else (lambda x, b: F.gelu(x + b, approximate="tanh")))
    fwd_bwd(benchmark, fn, x, b)


@pytest.mark.parametrize("system", ["fmcore", "torch"])
def test_swiglu(benchmark, system):
    benchmark.group = "SwiGLU (2048, 2 x 512) fp32 fwd+bwd"
    gate_up = torch.randn(ROWS, 2 * 512, requires_grad=True)
    fn = swiglu if system == "fmcore" else (lambda gu: F.silu(gu[:, :512]) * gu[:, 512:])
    fwd_bwd(benchmark, fn, gate_up)


@pytest.mark.parametrize("system", ["fmcore", "torch"])
def test_cross_entropy(benchmark, system):
    benchmark.group = "cross-entropy (2048, 4096) fp32 fwd+bwd"
    logits = torch.randn(ROWS, 4096, requires_grad=True)
    target = torch.randint(0, 4096, (ROWS,))
    fn = cross_entropy if system == "fmcore" else F.cross_entropy
    benchmark(lambda: torch.autograd.grad(fn(logits, target), (logits,)))
