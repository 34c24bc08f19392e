"""fmcore.ops.swiglu (silu(gate) * up, separate or packed as one fused projection's output) against a
float64 reference, on CPU always and CUDA when present."""

import pytest
import torch
import torch.nn.functional as F

from fmcore.ops import swiglu
from tests.util import EXTREME_VALUES, assert_close_to_ref, assert_compiles_like_eager, assert_edges_like_torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (leading dims, F): one row of Llama-3.2-1B's 8192; a few rows; many rows (several row blocks); F
# not a multiple of 8 (scalar path); one column; wider than a block's 1024 columns, not a multiple
SHAPES = [((1,), 8192), ((3,), 40), ((1500,), 2048), ((37,), 1001), ((5,), 1), ((2, 3), 2056)]


def torch_swiglu(gate, up):
    return F.silu(gate) * up


def check(lead, F_, dtype, device, packed):
    g = torch.Generator().manual_seed(0)
    if packed:
        inputs = ((2 * torch.randn(*lead, 2 * F_, generator=g)).to(device, dtype).requires_grad_(),)
    else:
        inputs = tuple((2 * torch.randn(*lead, F_, generator=g)).to(device, dtype).requires_grad_() for _ in range(2))
    grad = torch.randn(*lead, F_, generator=g).to(device, dtype)

    def run(fn, inputs, grad):
        out = fn(*inputs)
        return out, torch.autograd.grad(out, inputs, grad)

    def unfused(*inputs):
        return torch_swiglu(*(inputs[0].chunk(2, dim=-1) if packed else inputs))

    out, grads = run(swiglu, inputs, grad)
    ref, ref_grads = run(unfused, tuple(t.detach().double().requires_grad_() for t in inputs), grad.double())
    t_out, t_grads = run(unfused, inputs, grad)
    assert out.dtype == dtype and out.shape == (*lead, F_) and out.is_contiguous()
    assert_close_to_ref(out, ref, t_out, "out")
    for got, want, t_got, name in zip(grads, ref_grads, t_grads, ("grad_gate", "grad_up")):
        assert got.shape == want.shape
        assert_close_to_ref(got, want, t_got, "grad (packed)" if packed else name)


@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,F_", SHAPES, ids=str)
def test_against_reference(device, lead, F_, dtype, packed):
    check(lead, F_, dtype, device, packed)


@pytest.mark.parametrize("up_value", [2.0, -0.5])
def test_edges_of_the_range(device, up_value):
    # a gate across the whole range (saturated sigmoid, overflowing products, +-inf, NaN) times an
    # ordinary up: torch's NaN / inf pattern, and finite values where torch's are
    gate = torch.tensor(EXTREME_VALUES)
    up = torch.full_like(gate, up_value)

    def out_and_grads(fn, gate, up):
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        out = fn(g, u)
        return (out.detach().cpu(), *(t.cpu() for t in torch.autograd.grad(out.sum(), (g, u))))

    got = out_and_grads(swiglu, gate.to(device), up.to(device))
    want = out_and_grads(torch_swiglu, gate.to(device), up.to(device))
    ref = out_and_grads(torch_swiglu, gate.double(), up.double())
    for name, g, r, w in zip(("out", "grad_gate", "grad_up"), got, ref, want):
        assert_edges_like_torch(g, r, w, name)


def test_non_contiguous_inputs(device):
    gate = torch.randn(64, 6, device=device).t().requires_grad_()  # (6, 64), not contiguous
    up = torch.randn(6, 64, device=device, requires_grad=True)
    out = swiglu(gate, up)
    torch.testing.assert_close(out, torch_swiglu(gate, up))
    got = torch.autograd.grad(out.sum(), (gate, up))
    want = torch.autograd.grad(torch_swiglu(gate, up).sum(), (gate, up))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_packed_from_a_fused_projection(device):
    # the Llama MLP's use: one (F -> 2F) projection; its weight's gradient equals the unfused path's
    # (within torch's own fp32 error, both against float64: the loss squares and sums, so fp32
    # roundings, fmcore's or torch's, show at 1e-5)
    x = torch.randn(5, 16, device=device)
    w = torch.randn(2 * 24, 16, device=device, requires_grad=True)

    def weight_grad(fn, x, w):
        return torch.autograd.grad(fn(F.linear(x, w)).square().sum(), (w,))[0]

    def unfused(y):
        return torch_swiglu(*y.chunk(2, dim=-1))

    w64 = w.detach().double().requires_grad_()
    assert_close_to_ref(weight_grad(swiglu, x, w), weight_grad(unfused, x.double(), w64),
                        weight_grad(unfused, x, w), "weight grad")


@pytest.mark.parametrize("rows, width", [(0, 64), (4, 0), (0, 0)], ids=str)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "separate"])
def test_empty(device, rows, width, packed):
    shape = (rows, 2 * width) if packed else (rows, width)
    inputs = tuple(torch.randn(*shape, device=device, requires_grad=True) for _ in range(1 if packed else 2))
    out = swiglu(*inputs)
    assert out.shape == (rows, width)
    grads = torch.autograd.grad(out.sum(), inputs)
    assert [g.shape for g in grads] == [i.shape for i in inputs]


@pytest.mark.parametrize("needs", ["gate", "up"])
def test_only_one_input_needs_grad(device, needs):
    gate = torch.randn(4, 8, device=device, requires_grad=needs == "gate")
    up = torch.randn(4, 8, device=device, requires_grad=needs == "up")
    (g,) = torch.autograd.grad(swiglu(gate, up).sum(), (gate if needs == "gate" else up,))
    gate2, up2 = gate.detach().requires_grad_(), up.detach().requires_grad_()
    want = torch.autograd.grad(torch_swiglu(gate2, up2).sum(), (gate2, up2))[0 if needs == "gate" else 1]
    torch.testing.assert_close(g, want)


def test_gradcheck():
    gate = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    up = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (gate, up))
    packed = torch.randn(3, 2, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: swiglu(t), (packed,))


def test_double_backward_raises(device):
    gate = torch.randn(4, 8, device=device, requires_grad=True)
    (g,) = torch.autograd.grad(swiglu(gate).sum(), (gate,), create_graph=True)
    with pytest.raises(NotImplementedError, match="first-order gradients only"):
        g.sum().backward()


def test_opcheck(device):
    for gate, up in [(torch.randn(4, 64), torch.randn(4, 64)), (torch.randn(2, 3, 40).bfloat16(), None),
                     (torch.randn(5, 18), None)]:
        args = [None if t is None else t.to(device).requires_grad_() for t in (gate, up)]
        torch.library.opcheck(torch.ops.fmcore.swiglu, tuple(args))
    gate = torch.randn(4, 64, device=device)
    torch.library.opcheck(torch.ops.fmcore.swiglu_bwd, (torch.randn(4, 32, device=device), gate, None))
    torch.library.opcheck(torch.ops.fmcore.swiglu_bwd, (torch.randn(4, 64, device=device), gate, gate.clone()))


def test_compile_fullgraph(device):
    def mlp(x, w_gate_up, w_down):
        return F.linear(swiglu(F.linear(x, w_gate_up)), w_down).square().sum()

    x = torch.randn(8, 32, device=device, requires_grad=True)
    w1 = torch.randn(96, 32, device=device, requires_grad=True)
    w2 = torch.randn(32, 48, device=device, requires_grad=True)
    assert_compiles_like_eager(mlp, (x, w1, w2), device)


@pytest.mark.cuda
def test_unaligned_pointers_take_the_scalar_path():
    base = torch.randn(3 * 128 + 1, device="cuda", dtype=torch.bfloat16)
    packed = base[1:].view(3, 128).detach().requires_grad_()  # 2-byte offset: not 16-byte aligned
    out = swiglu(packed)
    gate, up = packed.detach().float().chunk(2, dim=-1)
    torch.testing.assert_close(out, torch_swiglu(gate, up).bfloat16())
    (g,) = torch.autograd.grad(out.float().sum(), (packed,))
    p2 = packed.detach().float().requires_grad_()
    (g2,) = torch.autograd.grad(torch_swiglu(*p2.chunk(2, dim=-1)).sum(), (p2,))
    torch.testing.assert_close(g.float(), g2, atol=1e-2, rtol=1e-2)


def test_bad_inputs(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="expected up of the shape of gate"):
        swiglu(x, torch.randn(4, 7, device=device))
    with pytest.raises(ValueError, match="expected up to have the dtype of gate"):
        swiglu(x, x.bfloat16())
    with pytest.raises(ValueError, match=r"expected a packed gate \(up=None\) of shape \(..., 2F\) with an even"):
        swiglu(torch.randn(4, 7, device=device))
    with pytest.raises(ValueError, match="expected gate to be float32, bfloat16 or float16"):
        swiglu(torch.ones(4, 8, device=device, dtype=torch.int64))
    with pytest.raises(ValueError, match="expected gate of shape"):
        swiglu(torch.tensor(1.0, device=device))
    with pytest.raises(RuntimeError, match="for argument 'up'"):  # (the schema's own error, passed on)
        swiglu(x, "up")
    with pytest.raises(ValueError, match=r"expected grad_out of shape \(4, 4\)"):
        torch.ops.fmcore.swiglu_bwd(x, x, None)
    with pytest.raises(ValueError, match="expected grad_out to have the dtype of gate"):
        torch.ops.fmcore.swiglu_bwd(x.double(), x, x)
    if device.type == "cuda":
        with pytest.raises(RuntimeError, match="expected up on the same device as gate"):
            swiglu(x, torch.randn(4, 8))
