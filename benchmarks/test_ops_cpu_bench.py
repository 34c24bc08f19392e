"""The CPU paths of the elementwise and loss ops (fmcore's own vectorized loops) beside the plain PyTorch
they replace, under pytest-benchmark: one group per op, fmcore's and torch's forward + backward, on the
tiny preset's shapes (16 x 128 tokens; MLP width 512, vocabulary 4096)."""

import pytest
import torch
import torch.nn.functional as F

from fmcore.ops import bias_gelu, cross_entropy, swiglu

ROWS = 16 * 128


def fwd_bwd(fn, *inputs):
    """fn(*inputs) and the gradient of its sum with respect to the inputs."""
    return torch.autograd.grad(fn(*inputs).sum(), inputs)


@pytest.mark.parametrize("system", ["fmcore", "torch"])
def test_bias_gelu_tanh(benchmark, system):
    benchmark.group = "bias + GELU (tanh) (2048, 512) fp32 fwd+bwd"
    x = torch.randn(ROWS, 512, requires_grad=True)
    b = torch.randn(512, requires_grad=True)
    fn = ((lambda x, b: bias_gelu(x, b, approximate="tanh")) if system == "fmcore"
          else (lambda x, b: F.gelu(x + b, approximate="tanh")))
    benchmark(fwd_bwd, fn, x, b)


@pytest.mark.parametrize("system", ["fmcore", "torch"])
def test_swiglu(benchmark, system):
    benchmark.group = "SwiGLU (2048, 2 x 512) fp32 fwd+bwd"
    gate_up = torch.randn(ROWS, 2 * 512, requires_grad=True)
    fn = swiglu if system == "fmcore" else (lambda gu: F.silu(gu[:, :512]) * gu[:, 512:])
    benchmark(fwd_bwd, fn, gate_up)


@pytest.mark.parametrize("system", ["fmcore", "torch"])
def test_cross_entropy(benchmark, system):
    benchmark.group = "cross-entropy (2048, 4096) fp32 fwd+bwd"
    logits = torch.randn(ROWS, 4096, requires_grad=True)
    target = torch.randint(0, 4096, (ROWS,))
    fn = cross_entropy if system == "fmcore" else F.cross_entropy
    benchmark(lambda: torch.autograd.grad(fn(logits, target), (logits,)))
