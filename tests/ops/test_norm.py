"""fmcore.ops.add_norm (fused residual add + LayerNorm / RMSNorm) against a float64 reference, on CPU
always and CUDA when present."""

import pytest
import torch
import torch.nn.functional as F

from fmcore.ops import add_norm
from tests.util import assert_close_to_ref, assert_compiles_like_eager

# (x, residual, weight/bias, out) dtypes, and why each is here
CONFIGS = {
    "fp32": (torch.float32, torch.float32, torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16),  # pure-bf16 training
    "fp16": (torch.float16, torch.float16, torch.float16, torch.float16),
    # bf16-autocast training: bf16 branch outputs join an fp32 stream, fp32 norm weights, and the
    # normed output goes to the next matmul in bf16
    "autocast": (torch.bfloat16, torch.float32, torch.float32, torch.bfloat16),
}
ROWS = [1, 3, 1000]  # one row; fewer rows than a warp-per-row block holds; many rows (grid-stride)
DIMS = [64, 768, 1001, 4096]  # one vector per lane; GPT-2's width; not a multiple of 8 (scalar path); block rows


def reference(x, residual, weight, bias, eps, kind, stream_dtype):
    """(normed, stream) in float64 from the stream rounded once to its dtype, as every path rounds it."""
    s = x.double() if residual is None else x.double() + residual.double()
    s = s.to(stream_dtype).double()
    w = weight.double()
    if kind == "layer":
        out = F.layer_norm(s, s.shape[-1:], w, None if bias is None else bias.double(), eps)
    else:
        out = F.rms_norm(s, s.shape[-1:], w, eps)
    return out, s


def torch_add_norm(x, residual, weight, bias, eps, kind, out_dtype):
    """The unfused PyTorch computation in the test's dtypes: what fmcore is held against."""
    s = x if residual is None else x + residual
    w = weight.to(s.dtype)
    if kind == "layer":
        out = F.layer_norm(s, s.shape[-1:], w, None if bias is None else bias.to(s.dtype), eps)
    else:
        out = F.rms_norm(s, s.shape[-1:], w, eps)
    return out.to(out_dtype), s


def make_inputs(rows, dim, config, kind, device, residual=True, bias=True, seed=0):
    xd, rd, wd, _ = CONFIGS[config]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g).to(device, xd).requires_grad_()
    # a stream with a mean far from 0 exercises the two-pass variance
    r = (torch.randn(rows, dim, generator=g) * 3 + 2).to(device, rd).requires_grad_() if residual else None
    w = (1 + 0.5 * torch.randn(dim, generator=g)).to(device, wd).requires_grad_()
    b = (0.5 * torch.randn(dim, generator=g)).to(device, wd).requires_grad_() if bias and kind == "layer" else None
    return x, r, w, b


def cotangents(outputs, seed=1):
    """Fixed random output gradients, rounded to each output's dtype (every path gets these values)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outputs]


def grads(outputs, inputs, cots=None):
    """Gradients of sum(out_i * cot_i) w.r.t. the inputs that are not None (both outputs count)."""
    cots = cotangents(outputs) if cots is None else [c.to(o.dtype) for c, o in zip(cots, outputs)]
    live = [t for t in inputs if t is not None]
    it = iter(torch.autograd.grad(outputs, live, cots))
    return [None if t is None else next(it) for t in inputs]


def check_against_reference(x, r, w, b, kind, out_dtype, eps=1e-5):
    stream_dtype = x.dtype if r is None else torch.promote_types(x.dtype, r.dtype)
    out, stream = add_norm(x, r, w, b, eps=eps, kind=kind, out_dtype=out_dtype)
    assert out.dtype == out_dtype and stream.dtype == stream_dtype
    x64, r64, w64, b64 = (None if t is None else t.detach().double().requires_grad_() for t in (x, r, w, b))
    ref_out, ref_stream = reference(x64, r64, w64, b64, eps, kind, stream_dtype)
    t_out, t_stream = torch_add_norm(x, r, w, b, eps, kind, out_dtype)
    assert_close_to_ref(out, ref_out, t_out, "normed")
    assert_close_to_ref(stream, ref_stream, t_stream, "stream")

    inputs = (x, r, w, b)
    cots = cotangents((out, stream))
    got = grads((out, stream), inputs, cots)
    ref = grads((ref_out, ref_stream), (x64, r64, w64, b64), cots)
    tor = grads((t_out, t_stream), inputs, cots)
    for name, gg, gr, gt in zip(("grad_x", "grad_residual", "grad_weight", "grad_bias"), got, ref, tor):
        if gr is None:
            assert gg is None, name
            continue
        assert gg.dtype == gt.dtype, f"{name}: {gg.dtype} != {gt.dtype}"
        assert_close_to_ref(gg, gr, gt, name)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("rows", ROWS)
def test_against_reference(device, rows, dim, config, kind):
    x, r, w, b = make_inputs(rows, dim, config, kind, device)
    check_against_reference(x, r, w, b, kind, CONFIGS[config][3])


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("config", ["fp32", "bf16", "autocast"])
def test_no_residual(device, config, kind):
    """The first block: the embedding is the stream; it comes back itself, not a copy."""
    x, _, w, b = make_inputs(37, 768, config, kind, device, residual=False)
    out, stream = add_norm(x, None, w, b, kind=kind, out_dtype=CONFIGS[config][3])
    assert stream is x
    check_against_reference(x, None, w, b, kind, CONFIGS[config][3])


def test_no_bias_and_3d_input(device):
    """LayerNorm without a bias (cfg.bias False) on (B, S, D) activations."""
    x, r, w, _ = make_inputs(6, 96, "fp32", "layer", device, bias=False)
    x3 = x.detach().view(2, 3, 96).requires_grad_()
    r3 = r.detach().view(2, 3, 96).requires_grad_()
    check_against_reference(x3, r3, w, None, "layer", torch.float32)


def test_residual_of_narrower_dtype(device):
    """fp32 x + bf16 residual: the stream is fp32 (torch's promotion) and grad_residual is bf16."""
    x, _, w, b = make_inputs(5, 64, "fp32", "layer", device, residual=False)
    r = torch.randn(5, 64).to(device, torch.bfloat16).requires_grad_()
    check_against_reference(x, r, w, b, "layer", torch.float32)


def test_non_contiguous_inputs(device):
    """A transposed x (last dim not contiguous) is copied first; the result is the same."""
    x, r, w, b = make_inputs(64, 32, "fp32", "layer", device)
    xt = x.detach().t().contiguous().t().requires_grad_()  # same values, strides (1, 64)
    assert xt.stride(-1) != 1
    check_against_reference(xt, r, w, b, "layer", torch.float32)


def test_zero_rows(device):
    x, r, w, b = make_inputs(0, 64, "fp32", "layer", device)
    out, stream = add_norm(x, r, w, b)
    assert out.shape == (0, 64) and stream.shape == (0, 64)
    gx, gr, gw, gb = grads((out, stream), (x, r, w, b))
    assert gx.shape == (0, 64) and torch.equal(gw, torch.zeros_like(gw)) and torch.equal(gb, torch.zeros_like(gb))


def test_backward_is_deterministic(device):
    x, r, w, b = make_inputs(3000, 768, "bf16", "layer", device)
    out, stream = add_norm(x, r, w, b)
    first = grads((out, stream), (x, r, w, b))
    out, stream = add_norm(x, r, w, b)
    second = grads((out, stream), (x, r, w, b))
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("residual", [True, False])
def test_gradcheck(kind, residual):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, dtype=torch.float64, generator=g, requires_grad=True)
    r = torch.randn(3, 10, dtype=torch.float64, generator=g, requires_grad=True) if residual else None
    w = torch.randn(10, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(10, dtype=torch.float64, generator=g, requires_grad=True) if kind == "layer" else None

    def fn(x, r, w, b):
        out, stream = add_norm(x, r, w, b, kind=kind)
        return out, stream * 1.0  # without a residual the stream is x itself; autograd wants a new tensor

    assert torch.autograd.gradcheck(fn, (x, r, w, b))


@pytest.mark.parametrize("needs", ["x", "residual", "weight", "bias", "weight,bias", "x,residual", "x,weight"])
@pytest.mark.parametrize("residual", [True, False])
def test_only_some_inputs_need_grad(device, needs, residual):
    """The backward asks add_norm_bwd only for what some input needs (frozen norm weights: no dweight
    sums; only the weights: no row gradients). Autocast dtypes (bf16 x, fp32 stream): the residual's
    gradient alone comes out in its own dtype. The kernels are the same, so the bits are too."""
    if "residual" in needs and not residual:
        pytest.skip("no residual")
    full = [None if t is None else t.detach() for t in make_inputs(37, 96, "autocast", "layer", device, residual=residual)]
    want = set(needs.split(","))
    inputs = [None if t is None else t.clone().requires_grad_(n in want)
              for n, t in zip(("x", "residual", "weight", "bias"), full)]
    out, stream = add_norm(*inputs, out_dtype=torch.bfloat16)
    cots = cotangents((out, stream))
    live = [t for t in inputs if t is not None and t.requires_grad]
    # without a residual the stream is x, which may not require grad
    outs = [(o, c) for o, c in zip((out, stream), cots) if o.requires_grad]
    got = torch.autograd.grad([o for o, _ in outs], live, [c for _, c in outs])
    full = [None if t is None else t.requires_grad_() for t in full]
    ref = grads(add_norm(*full, out_dtype=torch.bfloat16), full, cots)
    ref = [g for t, g in zip(inputs, ref) if t is not None and t.requires_grad]
    assert len(got) == len(ref) == len(want)
    for t, g, gr in zip(live, got, ref):
        assert g.dtype == t.dtype and torch.equal(g, gr)
    # The stream is x + residual: it requires grad exactly when one of them does, as torch's sum would
    # (it did whenever weight or bias did, its gradient wrt them zeros).
    if residual:
        assert stream.requires_grad == bool(want & {"x", "residual"})


@pytest.mark.parametrize("grad_input", [True, False])
@pytest.mark.parametrize("grad_weight", [True, False])
@pytest.mark.parametrize("has_bias", [True, False])
def test_bwd_op_computes_only_what_is_asked(device, grad_input, grad_weight, has_bias):
    """Gradients not asked for are (0,); the rest equal the full computation's, bit for bit."""
    x, r, w, b = (t.detach() for t in make_inputs(40, 512, "autocast", "layer", device))
    out, s, mean, rstd = torch.ops.fmcore.add_norm_fwd(x, r, w, b, 1e-5, False, torch.bfloat16)
    go, gs = cotangents((out, s))
    args = (go, gs, s, w, mean, rstd, False, True)
    full = torch.ops.fmcore.add_norm_bwd(*args, True, torch.bfloat16, torch.float32)
    got = torch.ops.fmcore.add_norm_bwd(*args, has_bias, torch.bfloat16, torch.float32, grad_input, grad_weight)
    for name, wanted, g, f in zip(("grad_x", "grad_residual", "grad_weight", "grad_bias"),
                                  (grad_input, grad_input, grad_weight, has_bias), got, full):
        if wanted:
            assert torch.equal(g, f), name
        else:
            assert g.shape == (0,), name


@pytest.mark.parametrize("used", ["normed", "stream"])
def test_one_output_unused(device, used):
    """An output that does not reach the loss gets no gradient (no zeros materialised for the stream);
    with only the stream used, the norm contributes nothing."""
    x, r, w, b = make_inputs(9, 64, "fp32", "layer", device)
    out, stream = add_norm(x, r, w, b)
    if used == "stream":
        gx, gr, gw, gb = torch.autograd.grad((stream * 1.5).sum(), (x, r, w, b))
        for g in (gx, gr):
            assert torch.equal(g, torch.full_like(g, 1.5))
        assert torch.equal(gw, torch.zeros_like(gw)) and torch.equal(gb, torch.zeros_like(gb))
        return
    cot = cotangents((out,))[0]
    got = torch.autograd.grad(out, (x, r, w, b), cot)
    t_out, _ = torch_add_norm(x, r, w, b, 1e-5, "layer", torch.float32)
    want = torch.autograd.grad(t_out, (x, r, w, b), cot)
    for g, gw_ in zip(got, want):
        torch.testing.assert_close(g, gw_)


def test_double_backward_raises(device):
    """First-order gradients only: a gradient taken with create_graph=True is right, and
    differentiating it again raises (torch's fallback for an op without autograd warned and gave 0)."""
    x, r, w, b = make_inputs(4, 64, "fp32", "layer", device)
    out, stream = add_norm(x, r, w, b)
    gx, = torch.autograd.grad((out * out).sum() + stream.sum(), x, create_graph=True)
    out, stream = add_norm(x, r, w, b)
    want, = torch.autograd.grad((out * out).sum() + stream.sum(), x)
    assert torch.equal(gx.detach(), want)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(gx.sum(), w)


@pytest.mark.filterwarnings("ignore:.*torch.jit.script")  # torch.autograd.forward_ad's own import
def test_forward_mode_ad_raises(device):
    import torch.autograd.forward_ad as fwAD

    x, r, w, b = (t.detach() for t in make_inputs(4, 64, "fp32", "layer", device))
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match="jvp is not implemented"):
            add_norm(dual, r, w, b)


def test_no_grad_outputs_need_no_grad(device):
    x, r, w, b = make_inputs(4, 64, "fp32", "layer", device)
    with torch.no_grad():
        out, stream = add_norm(x, r, w, b)
    assert not out.requires_grad and not stream.requires_grad
    with torch.inference_mode():
        out, stream = add_norm(x, r, w, b)
    assert out.is_inference()


def test_opcheck(device):
    samples = [
        (torch.randn(4, 64), torch.randn(4, 64), torch.randn(64), torch.randn(64), 1e-5, False, torch.float32),
        (torch.randn(2, 3, 40), None, torch.randn(40), None, 1e-6, True, torch.float32),
        (torch.randn(5, 32).bfloat16(), torch.randn(5, 32), torch.randn(32), None, 1e-5, False, torch.bfloat16),
    ]
    for x, r, w, b, eps, rms, out_dtype in samples:
        args = [None if t is None else t.to(device).requires_grad_(t.dtype.is_floating_point) for t in (x, r, w, b)]
        torch.library.opcheck(torch.ops.fmcore.add_norm_fwd, (*args, eps, rms, out_dtype))
    s = torch.randn(4, 64, device=device)
    w = torch.randn(64, device=device)
    _, _, mean, rstd = torch.ops.fmcore.add_norm_fwd(s, None, w, None, 1e-5, False, torch.float32)
    args = (torch.randn_like(s), None, s, w, mean, rstd, False, False)
    torch.library.opcheck(torch.ops.fmcore.add_norm_bwd, (*args, False, torch.float32, None))
    # the gradients not asked for are (0,) in the fake impl too
    torch.library.opcheck(torch.ops.fmcore.add_norm_bwd, (*args, True, torch.float32, None, False, True))
    torch.library.opcheck(torch.ops.fmcore.add_norm_bwd, (*args, False, torch.float32, None, True, False))


def test_compile_fullgraph(device):
    def block_boundary(x, r, w, b):
        normed, stream = add_norm(x, r, w, b, out_dtype=torch.bfloat16)
        return (normed.float() * 2).sum() + stream.sum()

    assert_compiles_like_eager(block_boundary, make_inputs(8, 64, "autocast", "layer", device), device)


@pytest.mark.cuda
@pytest.mark.parametrize("dim", [8192, 16384, 8191, 16383])  # wide block rows; scalar rows of 16 and 32 a thread
def test_wide_rows_cuda(dim):
    x, r, w, b = make_inputs(5, dim, "autocast", "layer", torch.device("cuda"))
    check_against_reference(x, r, w, b, "layer", torch.bfloat16)


@pytest.mark.cuda
def test_unaligned_pointers_take_the_scalar_path():
    """Views that start 2 bytes into a buffer cannot use 16-byte accesses; results must not change."""
    dev = torch.device("cuda")
    x, r, w, b = make_inputs(7, 512, "bf16", "layer", dev)
    buf = torch.empty(7 * 512 + 1, device=dev, dtype=torch.bfloat16)
    xs = buf[1:].view(7, 512)
    xs.copy_(x.detach())
    xs.requires_grad_()
    check_against_reference(xs, r, w, b, "layer", torch.bfloat16)


@pytest.mark.cuda
def test_default_out_dtype_under_cuda_autocast():
    """Under CUDA autocast F.layer_norm runs in fp32 and returns fp32; add_norm's default does too."""
    x, r, w, b = make_inputs(4, 64, "autocast", "layer", torch.device("cuda"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, _ = add_norm(x, r, w, b)
        want = F.layer_norm(x + r, (64,), w, b)
    assert out.dtype == want.dtype == torch.float32


def test_default_out_dtype_is_the_stream_dtype(device):
    x, r, w, b = make_inputs(4, 64, "autocast", "layer", device)
    out, stream = add_norm(x, r, w, b)
    assert out.dtype == stream.dtype == torch.float32


def test_bad_inputs(device):
    x = torch.randn(4, 64, device=device)
    w = torch.ones(64, device=device)
    with pytest.raises(ValueError, match="kind"):
        add_norm(x, None, w, kind="batch")
    with pytest.raises(ValueError, match=r"weight of shape \(D,\) = \(64,\)"):
        add_norm(x, None, torch.ones(63, device=device))
    with pytest.raises(ValueError, match="residual of the shape of x"):
        add_norm(x, torch.randn(4, 32, device=device), w)
    with pytest.raises(ValueError, match="no bias for kind 'rms'"):
        add_norm(x, None, w, torch.zeros(64, device=device), kind="rms")
    with pytest.raises(ValueError, match="bias to have the dtype of weight"):
        add_norm(x, None, w, torch.zeros(64, device=device, dtype=torch.float16))
    with pytest.raises(ValueError, match="expected x to be float32"):
        add_norm(x.long(), None, w)
    with pytest.raises(ValueError, match="expected residual to be float32"):
        add_norm(x, x.int(), w)
    with pytest.raises(ValueError, match="out_dtype"):
        add_norm(x, None, w, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="eps"):
        add_norm(x, None, w, eps=-1.0)
    if device.type == "cuda":
        with pytest.raises(RuntimeError, match="weight on the same device as x"):
            add_norm(x, None, w.cpu())
        with pytest.raises(ValueError, match="at most 16384"):
            add_norm(torch.randn(2, 16392, device=device), None, torch.ones(16392, device=device))


def test_bwd_op_bad_inputs(device):
    """The backward op is public: inputs the kernel cannot handle raise before any launch."""
    s = torch.randn(4, 64, device=device)
    w = torch.randn(64, device=device)
    _, _, mean, rstd = torch.ops.fmcore.add_norm_fwd(s, None, w, None, 1e-5, False, torch.float32)
    bwd = torch.ops.fmcore.add_norm_bwd
    empty = torch.empty(4, 0, device=device)  # D = 0 divided rows = numel / D (a host crash)
    with pytest.raises(ValueError, match="D >= 1"):
        bwd(empty, None, empty, torch.empty(0, device=device), mean, rstd, False, False, False, torch.float32, None)
    # without a residual s is x: the CUDA kernel reads s in x_dtype (bf16 s read as fp32 ran past its end)
    with pytest.raises(ValueError, match="x_dtype"):
        bwd(torch.randn_like(s), None, s.bfloat16(), w, mean, rstd, False, False, False, torch.float32, None)
    if device.type == "cuda":
        big = torch.randn(1, 16392, device=device)
        with pytest.raises(ValueError, match="at most 16384"):
            bwd(big, None, big, torch.ones(16392, device=device), torch.zeros(1, device=device),
                torch.ones(1, device=device), False, False, False, torch.float32, None)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dim", [768, 4096, 16384])  # warp rows; block rows of 2 and of 4 chunks
def test_stream_with_large_mean(device, dim, kind):
    """Rows with mean 1e3 and std 0.07 in fp32: a one-pass E[s^2] - mean^2 loses every digit, and a
    plain fp32 D-term sum for the mean is off by a few ulps of 1e3, several times torch's error in
    the output (the kernel corrects its mean with a second sum of s - mean)."""
    g = torch.Generator().manual_seed(3)
    x = (0.05 * torch.randn(4, dim, generator=g)).to(device).requires_grad_()
    r = (1e3 + 0.05 * torch.randn(4, dim, generator=g)).to(device).requires_grad_()
    w = (1 + 0.5 * torch.randn(dim, generator=g)).to(device).requires_grad_()
    b = (0.5 * torch.randn(dim, generator=g)).to(device).requires_grad_() if kind == "layer" else None
    check_against_reference(x, r, w, b, kind, torch.float32)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_variance_past_fp32_range(device, dtype, kind):
    """Finite rows whose squares overflow fp32 (1e20), whose sum of squares does (+-3e38), and a
    spread of 1e35 about 1e37. torch's fp32 statistics give the first two rstd 0 (the output is the
    bias, the gradients 0) or NaN; the CPU sums in fp64, and the CUDA kernel retries such a row
    scaled by 2^-72 (it returned NaN): both the float64 result, forward and backward."""
    g = torch.Generator().manual_seed(6)
    D = 64
    x = torch.stack([1e20 * torch.randn(D, generator=g), (torch.arange(D) % 2 * 2.0 - 1) * 3e38,
                     1e37 + 1e35 * torch.randn(D, generator=g)]).to(device, dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(D, generator=g)).to(device, dtype).requires_grad_()
    b = torch.randn(D, generator=g).to(device, dtype).requires_grad_() if kind == "layer" else None
    out, _ = add_norm(x, None, w, b, kind=kind)
    x64, w64, b64 = (None if t is None else t.detach().double().requires_grad_() for t in (x, w, b))
    want, _ = reference(x64, None, w64, b64, 1e-5, kind, dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.double(), want, **tol)
    cots = cotangents([out])
    got_g, want_g = grads([out], [x, w, b], cots), grads([want], [x64, w64, b64], cots)
    # dx is ~1 / std: each row to its own scale
    got_g[0], want_g[0] = (t.double() / want_g[0].abs().amax(1, keepdim=True) for t in (got_g[0], want_g[0]))
    for name, got_t, want_t in zip(("x", "weight", "bias"), got_g, want_g):
        if got_t is not None:
            torch.testing.assert_close(got_t.double(), want_t, **tol, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("dim", [6144, 6143])  # block rows of 2 vectors; scalar rows of 16 a thread
def test_backward_smem_just_under_48k(device, dim):
    """The backward's dynamic shared memory is 8 * D bytes: 48 KiB at D 6144, which with the kernel's
    static shared memory passed the 48 KiB a launch gets without opting in (a launch failure)."""
    x, r, w, b = make_inputs(3, dim, "fp32", "layer", device)
    check_against_reference(x, r, w, b, "layer", torch.float32)


def misaligned(t):
    """t's values in a view starting one element (4 bytes for fp32) into a buffer: no 16-byte accesses."""
    buf = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)
    view = buf[1:].view(t.shape)
    view.copy_(t.detach())
    return view.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("which", ["residual", "weight", "bias"])
def test_misaligned_operand_takes_the_scalar_path(device, which):
    """The 16-byte path needs every operand aligned, not only x: one misaligned residual, weight or
    bias (the weight is read in the backward too) must switch the whole launch to the scalar path."""
    x, r, w, b = make_inputs(9, 256, "fp32", "layer", device)
    if which == "residual":
        r = misaligned(r)
    elif which == "weight":
        w = misaligned(w)
    else:
        b = misaligned(b)
    check_against_reference(x, r, w, b, "layer", torch.float32)


def test_bwd_op_misaligned_gradients(device):
    """grad_out and grad_residual_out views not 16-byte aligned (the backward's own alignment check)."""
    x, r, w, b = (t.detach() for t in make_inputs(9, 256, "fp32", "layer", device))
    out, s, mean, rstd = torch.ops.fmcore.add_norm_fwd(x, r, w, b, 1e-5, False, torch.float32)
    go, gs = cotangents((out, s))
    args = (s, w, mean, rstd, False, True, True, torch.float32, None)
    want = torch.ops.fmcore.add_norm_bwd(go, gs, *args)
    got = torch.ops.fmcore.add_norm_bwd(misaligned(go), misaligned(gs), *args)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c)


@pytest.mark.cuda
@pytest.mark.bigmem
def test_offsets_past_2_31_elements_cuda():
    # rows * D > 2^31 bf16 elements (4.3 GB a tensor, ~30 GB in all): every offset of the last rows
    # passes 2^31 elements. A 32-bit offset anywhere (a wrapped read, or a write landing in another
    # row) makes the last rows differ from the same rows computed alone.
    D = 64
    rows = 2**31 // D + 64
    if torch.cuda.get_device_properties(0).total_memory < 60 * 2**30:
        pytest.skip("needs ~35 GB of GPU memory")
    torch.manual_seed(9)
    x, r, go, gs = (torch.randn(rows, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    w, b = torch.randn(D, device="cuda"), torch.randn(D, device="cuda")
    fwd = torch.ops.fmcore.add_norm_fwd(x, r, w, b, 1e-5, False, torch.bfloat16)
    tail = slice(rows - 64, rows)  # rows wholly past element 2^31
    fwd_s = torch.ops.fmcore.add_norm_fwd(x[tail].clone(), r[tail].clone(), w, b, 1e-5, False, torch.bfloat16)
    for name, a, c in zip(("out", "stream", "mean", "rstd"), fwd, fwd_s):
        assert torch.equal(a[tail], c), name
    _, s, mean, rstd = fwd
    gx = torch.ops.fmcore.add_norm_bwd(go, gs, s, w, mean, rstd, False, True, True, torch.bfloat16, None)[0]
    gx_s = torch.ops.fmcore.add_norm_bwd(go[tail].clone(), gs[tail].clone(), s[tail].clone(), w, mean[tail].clone(),
                                         rstd[tail].clone(), False, True, True, torch.bfloat16, None)[0]
    assert torch.equal(gx[tail], gx_s)


@pytest.mark.cuda
def test_backward_from_two_host_threads_cuda():
    """D 8192 (64 KiB of dynamic shared memory) and D 1040 (8 KiB) run the same backward kernel
    instantiation. When each call set its shared-memory limit to its own size just before launching,
    from two host threads (torch.ops calls release the GIL) the narrow call's set could land between
    the wide call's set and its launch and fail it with "invalid argument"; the limit is now only
    ever raised (allow_dynamic_smem in csrc/kernels/common.cuh)."""
    import threading

    dev = torch.device("cuda")
    jobs = []
    for dim in (8192, 1040):
        x, r, w, b = (t.detach() for t in make_inputs(4, dim, "fp32", "layer", dev))
        out, s, mean, rstd = torch.ops.fmcore.add_norm_fwd(x, r, w, b, 1e-5, False, torch.float32)
        go, gs = cotangents((out, s))
        args = (go, gs, s, w, mean, rstd, False, True, True, torch.float32, None)
        jobs.append((args, torch.ops.fmcore.add_norm_bwd(*args)))
    torch.cuda.synchronize()
    errors = []

    def hammer(args, want):
        try:
            for _ in range(300):
                got = torch.ops.fmcore.add_norm_bwd(*args)
            for a, c in zip(got, want):
                assert torch.equal(a, c)  # deterministic kernels: bitwise the single-thread result
        except Exception as e:  # noqa: BLE001  (reported below, with the thread's own message)
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.cuda.synchronize()
    assert not errors, errors


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_float64_uses_eps_unrounded(kind):
    # The CPU path added eps rounded to fp32 (the CUDA kernels' copy): 1e-5 became 1.0000000e-5 + 2.5e-14,
    # which rows whose mean square is near eps (|x| ~ 1e-2) showed as a relative error of 2.5e-9.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 256, dtype=torch.float64, generator=g) * 1e-2
    w = torch.randn(256, dtype=torch.float64, generator=g)
    out, _ = add_norm(x, None, w, eps=1e-5, kind=kind)
    ref = F.layer_norm(x, (256,), w, None, 1e-5) if kind == "layer" else F.rms_norm(x, (256,), w, 1e-5)
    assert ((out - ref).abs() / ref.abs().clamp_min(1e-300)).max() < 1e-13
