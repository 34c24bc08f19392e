"""fmcore.ops.bias_gelu (bias + GELU with the bias gradient fused into the backward) against a float64
reference, on CPU always and CUDA when present."""

import pytest
import torch
import torch.nn.functional as F

from fmcore.ops import bias_gelu
from tests.util import EXTREME_VALUES, assert_close_to_ref, assert_compiles_like_eager, assert_edges_like_torch

# (x, bias) dtypes: plain fp32, pure bf16 / fp16, and bf16 autocast (a bf16 matmul output, the fp32
# bias parameter)
CONFIGS = {
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16),
    "autocast": (torch.bfloat16, torch.float32),
}
# one row; a few; many rows (more than one row block) | GPT-2's 3072; not a multiple of 8 (scalar
# path); one column; wider than a block's 1024 columns and not a multiple of them
SHAPES = [(1, 3072), (3, 40), (1500, 3072), (37, 1001), (5, 1), (2, 2056)]


def make_inputs(shape, config, device, bias=True, seed=0):
    xd, bd = CONFIGS[config]
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(*shape, generator=g)).to(device, xd).requires_grad_()
    b = (torch.randn(shape[-1], generator=g)).to(device, bd).requires_grad_() if bias else None
    return x, b


def run(fn, x, b, grad):
    """fn(x, b)'s output and (grad_x, grad_bias) for the output gradient `grad`."""
    out = fn(x, b)
    inputs = (x,) if b is None else (x, b)
    grads = torch.autograd.grad(out, inputs, grad.to(out.dtype))
    return out, grads


def check(shape, config, device, approximate, bias=True):
    x, b = make_inputs(shape, config, device, bias)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, x.dtype)
    out, grads = run(lambda x, b: bias_gelu(x, b, approximate=approximate), x, b, grad)
    # the float64 reference on the same (rounded) inputs
    xr, br = x.detach().double().requires_grad_(), None if b is None else b.detach().double().requires_grad_()
    ref, ref_grads = run(lambda x, b: F.gelu(x if b is None else x + b, approximate=approximate), xr, br,
                         grad.double())
    # the unfused torch computation in the test's dtypes
    t_out, t_grads = run(lambda x, b: F.gelu(x if b is None else x + b.to(x.dtype), approximate=approximate),
                         x, b, grad)
    assert out.dtype == x.dtype and out.is_contiguous()
    assert_close_to_ref(out, ref, t_out, "out")
    assert_close_to_ref(grads[0], ref_grads[0], t_grads[0], "grad_x")
    if b is not None:
        assert grads[1].dtype == b.dtype
        # torch sums the gradient rounded to x's dtype; fmcore sums it in fp32 before rounding
        assert_close_to_ref(grads[1], ref_grads[1], t_grads[1].to(b.dtype), "grad_bias")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_against_reference(device, shape, config, approximate):
    check(shape, config, device, approximate)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_edges_of_the_range(device, approximate):
    # saturated exponentials, overflowing cubes, +-inf and NaN: torch's NaN / inf pattern, and finite
    # values where torch's are
    z = torch.tensor(EXTREME_VALUES)

    def out_and_grad(fn, z):
        x = z.clone().requires_grad_()
        out = fn(x)
        return out.detach().cpu(), torch.autograd.grad(out.sum(), (x,))[0].cpu()

    out, grad = out_and_grad(lambda x: bias_gelu(x, None, approximate=approximate), z.to(device))
    t_out, t_grad = out_and_grad(lambda x: F.gelu(x, approximate=approximate), z.to(device))
    ref, ref_grad = out_and_grad(lambda x: F.gelu(x, approximate=approximate), z.double())
    assert_edges_like_torch(out, ref, t_out, "out")
    assert_edges_like_torch(grad, ref_grad, t_grad, "grad_x")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_no_bias_and_3d_input(device, approximate):
    check((2, 5, 64), "bf16", device, approximate, bias=False)
    check((2, 5, 64), "autocast", device, approximate)


def test_non_contiguous_input(device):
    x = torch.randn(64, 6, device=device).t().requires_grad_()  # (6, 64), not contiguous
    b = torch.randn(64, device=device, requires_grad=True)
    out = bias_gelu(x, b, approximate="tanh")
    torch.testing.assert_close(out, F.gelu(x + b, approximate="tanh"))
    gx, gb = torch.autograd.grad(out.sum(), (x, b))
    x2, b2 = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    gx2, gb2 = torch.autograd.grad(F.gelu(x2 + b2, approximate="tanh").sum(), (x2, b2))
    torch.testing.assert_close(gx, gx2)
    torch.testing.assert_close(gb, gb2)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(0, 3072), (4, 0), (0, 0)], ids=str)
def test_empty(device, approximate, shape):
    x = torch.randn(*shape, device=device, requires_grad=True)
    b = torch.randn(shape[-1], device=device, requires_grad=True)
    out = bias_gelu(x, b, approximate=approximate)
    assert out.shape == shape
    gx, gb = torch.autograd.grad(out.sum(), (x, b))
    assert gx.shape == shape
    assert torch.equal(gb, torch.zeros_like(b))  # an empty sum, not the workspace's poison


def test_backward_is_deterministic(device):
    x, b = make_inputs((3000, 1024), "bf16", device)
    grad = torch.randn(3000, 1024, device=device, dtype=torch.bfloat16)
    first = torch.autograd.grad(bias_gelu(x, b), (x, b), grad)
    second = torch.autograd.grad(bias_gelu(x, b), (x, b), grad)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.parametrize("needs", ["x", "bias"])
def test_only_some_inputs_need_grad(device, needs):
    x, b = make_inputs((10, 48), "fp32", device)
    x.requires_grad_(needs == "x")
    b.requires_grad_(needs == "bias")
    out = bias_gelu(x, b)
    (g,) = torch.autograd.grad(out.sum(), (x if needs == "x" else b,))
    x2, b2 = x.detach().requires_grad_(), b.detach().requires_grad_()
    want = torch.autograd.grad(F.gelu(x2 + b2).sum(), (x2, b2))[0 if needs == "x" else 1]
    torch.testing.assert_close(g, want)


@pytest.mark.parametrize("grad_bias", [True, False])
def test_bwd_op_computes_only_what_is_asked(device, grad_bias):
    x = torch.randn(4, 16, device=device)
    b = torch.randn(16, device=device)
    gx, gb = torch.ops.fmcore.bias_gelu_bwd(torch.ones_like(x), x, b, False, grad_bias)
    assert gb.shape == ((16,) if grad_bias else (0,))
    gx0, gb0 = torch.ops.fmcore.bias_gelu_bwd(torch.ones_like(x), x, None, False, True)
    assert gb0.shape == (0,)
    torch.testing.assert_close(gx0, torch.ops.aten.gelu_backward(torch.ones_like(x), x))


def test_gradcheck():
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    for approximate in ("none", "tanh"):
        assert torch.autograd.gradcheck(lambda x, b: bias_gelu(x, b, approximate=approximate), (x, b))


def test_double_backward_raises(device):
    x, b = make_inputs((4, 8), "fp32", device)
    (gx,) = torch.autograd.grad(bias_gelu(x, b).sum(), (x,), create_graph=True)
    with pytest.raises(NotImplementedError, match="first-order gradients only"):
        gx.sum().backward()


def test_opcheck(device):
    samples = [
        (torch.randn(4, 64), torch.randn(64), True),
        (torch.randn(2, 3, 40).bfloat16(), torch.randn(40), False),
        (torch.randn(5, 9), None, True),
    ]
    for x, b, tanh in samples:
        args = [None if t is None else t.to(device).requires_grad_() for t in (x, b)]
        torch.library.opcheck(torch.ops.fmcore.bias_gelu, (*args, tanh))
    x, b = torch.randn(4, 64, device=device), torch.randn(64, device=device)
    for grad_bias in (True, False):
        torch.library.opcheck(torch.ops.fmcore.bias_gelu_bwd, (torch.randn_like(x), x, b, True, grad_bias))


def test_compile_fullgraph(device):
    def mlp_in(x, w, b):
        return bias_gelu(F.linear(x, w), b, approximate="tanh").float().sum()

    x = torch.randn(8, 32, device=device, requires_grad=True)
    w = torch.randn(48, 32, device=device, requires_grad=True)
    b = torch.randn(48, device=device, requires_grad=True)
    assert_compiles_like_eager(mlp_in, (x, w, b), device)


@pytest.mark.cuda
def test_under_cuda_autocast():
    # GPT-2's MLP under bf16 autocast: a bf16 matmul output, the fp32 bias parameter; out bf16, the
    # bias gradient fp32
    x = torch.randn(16, 64, device="cuda", requires_grad=True)
    w = torch.randn(256, 64, device="cuda", requires_grad=True)
    b = torch.randn(256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = bias_gelu(F.linear(x, w), b, approximate="tanh")
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert b.grad.dtype == torch.float32 and torch.isfinite(b.grad).all()


@pytest.mark.cuda
def test_unaligned_pointers_take_the_scalar_path():
    base = torch.randn(3 * 64 + 1, device="cuda", dtype=torch.bfloat16)
    x = base[1:].view(3, 64).detach().requires_grad_()  # 2-byte offset: not 16-byte aligned
    b = torch.randn(64, device="cuda", requires_grad=True)
    out = bias_gelu(x, b)
    torch.testing.assert_close(out, F.gelu(x.float() + b).bfloat16())
    gx, gb = torch.autograd.grad(out.float().sum(), (x, b))
    x2, b2 = x.detach().float().requires_grad_(), b.detach().requires_grad_()
    gx2, gb2 = torch.autograd.grad(F.gelu(x2 + b2).sum(), (x2, b2))
    torch.testing.assert_close(gx.float(), gx2, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(gb, gb2, atol=1e-2, rtol=1e-2)


def test_bad_inputs(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="expected approximate 'none' or 'tanh', got 'erf'"):
        bias_gelu(x, None, approximate="erf")
    with pytest.raises(ValueError, match=r"expected bias of shape \(D,\) = \(8,\)"):
        bias_gelu(x, torch.randn(7, device=device))
    with pytest.raises(ValueError, match=r"expected bias to have the dtype of x \(Float\) or float32, got BFloat16"):
        bias_gelu(x, torch.randn(8, device=device, dtype=torch.bfloat16))
    if device.type == "cpu":  # (float64 runs on the CPU only) float32 is no option there: it said it was
        with pytest.raises(ValueError, match=r"expected bias to have the dtype of x \(Double\), got Float$"):
            bias_gelu(x.double(), torch.randn(8))
    with pytest.raises(ValueError, match="expected x to be float32, bfloat16 or float16"):
        bias_gelu(torch.ones(4, 8, device=device, dtype=torch.int64))
    with pytest.raises(ValueError, match="expected x of shape"):
        bias_gelu(torch.tensor(1.0, device=device))
    with pytest.raises(RuntimeError, match="for argument 'bias'"):  # (the schema's own error, passed on)
        bias_gelu(x, "bias")
    with pytest.raises(ValueError, match="expected grad_out of the shape of x"):
        torch.ops.fmcore.bias_gelu_bwd(torch.randn(4, 7, device=device), x, None)
    with pytest.raises(ValueError, match="expected grad_out to have the dtype of x"):
        torch.ops.fmcore.bias_gelu_bwd(x.double(), x, None)
    if device.type == "cuda":
        with pytest.raises(RuntimeError, match="expected bias on the same device as x"):
            bias_gelu(x, torch.randn(8))
