"""fmcore.ops.cross_entropy against F.cross_entropy on float64, on CPU always and CUDA when present."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import fmcore  # noqa: F401  (registers the ops)
from fmcore.ops import cross_entropy
from tests.util import assert_close_to_ref, assert_compiles_like_eager

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REDUCTIONS = ["none", "mean", "sum"]


def torch_loss(logits, target, ignore_index=-100, label_smoothing=0.0, reduction="mean", z_loss=0.0):
    """What users write today, in logits' own dtype: F.cross_entropy (+ z_loss * lse^2 per row)."""
    V = logits.shape[-1]
    x, t = logits.reshape(-1, V), target.reshape(-1).long()  # torch takes no int32 targets
    if z_loss == 0.0:
        out = F.cross_entropy(x, t, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)
        return out.view(target.shape) if reduction == "none" else out
    rows = F.cross_entropy(x, t, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
    valid = t != ignore_index
    rows = rows + z_loss * torch.logsumexp(x, -1).pow(2) * valid
    if reduction == "none":
        return rows.view(target.shape)
    return rows.sum() / valid.sum() if reduction == "mean" else rows.sum()


def check(logits, target, grad_seed=0, **kw):
    """fmcore's loss and gradient vs the float64 reference, with torch's same-dtype error as the scale."""
    x = logits.detach().clone().requires_grad_()
    loss = cross_entropy(x, target, **kw)
    x64 = logits.detach().double().requires_grad_()
    ref = torch_loss(x64, target, **kw_torch(kw))
    xt = logits.detach().clone().requires_grad_()
    tout = torch_loss(xt, target, **kw_torch(kw))
    assert loss.dtype == logits.dtype and loss.shape == ref.shape
    assert_close_to_ref(loss, ref, tout, "loss")
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64).to(logits.device)
    loss.backward(g.to(loss.dtype))
    ref.backward(g)
    tout.backward(g.to(tout.dtype))
    assert_close_to_ref(x.grad, x64.grad, xt.grad, "grad")


def kw_torch(kw):
    return {k: v for k, v in kw.items() if k in ("ignore_index", "label_smoothing", "reduction", "z_loss")}


def make(shape, device, dtype, scale=1.0, ignore_every=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    target = torch.randint(0, shape[-1], shape[:-1], generator=g)
    if ignore_every:
        target.view(-1)[1::ignore_every] = -100  # some ignored rows (none when N = 1)
    return logits, target.to(device)


# (shape, why)
SHAPES = [
    (13, 7),  # V=7: smaller than one 16-byte vector, every row misaligned
    (1, 32001),  # N=1 and Llama's 32001 (odd: rows start misaligned from the second on)
    (3, 50257),  # GPT-2's 50257
    (2, 5, 300),  # (B, S, V) input
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_torch(device, shape, reduction, dtype):
    logits, target = make(shape, device, dtype, ignore_every=4)
    check(logits, target, reduction=reduction)


@pytest.mark.parametrize("options", [(0.1, 0.0), (0.0, 1e-3), (0.25, 1e-4), (1.0, 0.0)], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_label_smoothing_and_z_loss(device, options, reduction, dtype):
    label_smoothing, z_loss = options
    logits, target = make((37, 1001), device, dtype, scale=3.0)
    check(logits, target, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss)


@pytest.mark.parametrize("ignore_index", [-100, 0, 3])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored(device, reduction, ignore_index):
    # Every target ignored: torch gives nan for mean, 0 for sum, zeros for none, and zero gradients.
    logits = torch.randn(6, 11, device=device, requires_grad=True)
    target = torch.full((6,), ignore_index, device=device)
    loss = cross_entropy(logits, target, reduction=reduction, ignore_index=ignore_index, label_smoothing=0.1)
    ref = F.cross_entropy(logits, target, reduction=reduction, ignore_index=ignore_index, label_smoothing=0.1)
    torch.testing.assert_close(loss, ref, equal_nan=True)
    loss.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_custom_ignore_index_inside_vocab(device):
    # ignore_index=0 is a valid class id: rows with target 0 are skipped, not scored.
    logits, target = make((40, 17), device, torch.float32, ignore_every=0)
    target[::3] = 0
    check(logits, target, ignore_index=0, label_smoothing=0.1)


def test_int32_target(device):
    logits, target = make((29, 103), device, torch.bfloat16)
    check(logits, target.int(), reduction="mean")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_magnitude_1e4_stays_finite(device, dtype):
    # exp(1e4) overflows every float type: only a max-subtracted log-sum-exp survives. Uniform in
    # [-1e4, 1e4] so per-row losses (<= 2e4) and their mean fit float16.
    logits, target = make((9, 257), device, dtype)
    logits = ((torch.rand(logits.shape, dtype=torch.float64) * 2 - 1) * 1e4).to(device=device, dtype=dtype)
    # (no z-loss in float16: torch's own lse**2 = 1e8 overflows there, leaving no error to compare to)
    check(logits, target, reduction="mean", label_smoothing=0.1, z_loss=0.0 if dtype == torch.float16 else 1e-6)


@pytest.mark.parametrize("offset", [1e4, 6e4])
def test_label_smoothing_with_a_large_common_offset(device, offset):
    # Logits offset + randn: label smoothing's mean logit was a plain fp32 sum of the logits, which
    # lost the rows' spread to the offset (1.4 off at 6e4 and V = 256000; 40x torch's error at 1e4).
    # Now measured from the max (CPU) or the row's first logit (CUDA).
    g = torch.Generator().manual_seed(5)
    logits = (offset + 3 * torch.randn(4, 50000, generator=g)).to(device)
    target = torch.randint(0, 50000, (4,), generator=g).to(device)
    check(logits, target, reduction="none", label_smoothing=0.1)
    # 3e38: the plain sum overflowed (loss -inf where torch's is finite)
    huge = torch.tensor([[2e38, 2e38, 1.0], [3e38, 3e38, 3e38], [-3e38, -3e38, -3e38]], device=device)
    target = torch.tensor([2, 1, 0], device=device)
    got = cross_entropy(huge, target, label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(got, F.cross_entropy(huge, target, label_smoothing=0.1, reduction="none"))


def test_strided_and_misaligned_rows(device):
    # A slice of a wider buffer: rows start 1 element in (misaligned) and are V + 3 apart.
    base = torch.randn(21, 8 * 64 + 3 + 4, device=device, dtype=torch.bfloat16)
    logits = base[:, 1 : 1 + 8 * 64 + 3]
    assert not logits.is_contiguous()
    target = torch.randint(0, logits.shape[1], (21,), device=device)
    check(logits, target)


@pytest.mark.parametrize("factor", [1.0, 2.5])  # 1: the scaling pass is skipped; 2.5: it runs
@pytest.mark.parametrize("reduction", REDUCTIONS)  # mean/sum: the fused forward; none: the backward
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_backward(device, dtype, reduction, factor):
    logits, target = make((2, 33, 515), device, dtype)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, reduction=reduction)
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, target, **kw)
    g = torch.full_like(loss, factor)
    loss.backward(g)
    # logits made by an op (the usual lm-head case) so the gradient buffer can be checked
    leaf = logits.clone().requires_grad_()
    y = leaf * 1.0
    loss2 = cross_entropy(y, target, inplace_backward=True, **kw)
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)
    loss2.backward(g)
    # the fused path rounds (1/count) * dloss and then * grad_output: equal up to rounding
    torch.testing.assert_close(leaf.grad, x.grad, **({} if factor != 1.0 else dict(rtol=0, atol=0)))
    assert torch.equal(y.detach(), leaf.grad), "the gradient was not written into the logits buffer"


def test_inplace_backward_all_ignored_and_twice(device):
    x = torch.randn(4, 9, device=device, requires_grad=True)
    y = x * 1.0
    loss = cross_entropy(y, torch.full((4,), -100, device=device), inplace_backward=True)
    assert loss.isnan()  # 0/0, as torch
    loss.backward(retain_graph=True)
    assert torch.equal(x.grad, torch.zeros_like(x))
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()


@pytest.mark.parametrize("hooks", ["none", "save_on_cpu", "identity"])
def test_inplace_backward_none_twice_raises(device, hooks):
    """reduction "none" writes the gradient over the saved logits in the backward: a second backward
    (retain_graph) raises the op's own error. Saved-tensor hooks (CPU offloading) skip autograd's
    version check; the second gradient was computed from the first one, silently."""
    logits, target = make((6, 11), device, torch.float32)
    x = logits.clone().requires_grad_()
    ctx = {"none": contextlib.nullcontext(), "save_on_cpu": torch.autograd.graph.save_on_cpu(),
           "identity": torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)}[hooks]
    with ctx:
        loss = cross_entropy(x * 1.0, target, reduction="none", inplace_backward=True).sum()
    loss.backward(retain_graph=True)
    ref = logits.clone().requires_grad_()
    F.cross_entropy(ref, target, reduction="sum").backward()
    torch.testing.assert_close(x.grad, ref.grad)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()



@pytest.mark.parametrize("inplace_backward", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_double_backward_raises(device, reduction, inplace_backward):
    """First-order gradients only: one taken with create_graph=True equals the plain one, and
    differentiating it again raises (autograd would otherwise drop the second-order terms)."""
    logits, target = make((6, 11), device, torch.float32)
    x = logits.clone().requires_grad_()
    f = lambda: cross_entropy(x * 1.0, target, reduction=reduction, inplace_backward=inplace_backward)  # noqa: E731
    (want,) = torch.autograd.grad(f().sum(), x)
    (got,) = torch.autograd.grad(f().sum(), x, create_graph=True)
    assert torch.equal(got.detach(), want)
    with pytest.raises(NotImplementedError, match="cross_entropy supports first-order gradients only"):
        torch.autograd.grad(got.square().sum(), x)


def test_inplace_backward_over_logits_another_node_saved_raises(device):
    """The gradient written over the logits bumps their version, so a node that saved the logits
    for its own backward raises instead of reading the gradient as if it were the logits."""
    logits, target = make((6, 11), device, torch.float32)
    x = logits.clone().requires_grad_()
    y = x * 1.0
    probs = y.exp()  # saves its output, not y: unaffected
    sq = y.square()  # saves y
    loss = cross_entropy(y, target, inplace_backward=True) + probs.sum() + sq.sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()

@pytest.mark.parametrize("inplace_backward", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nan_grad_output_leaves_ignored_rows_zero(device, reduction, inplace_backward):
    """As torch: an ignored row's gradient is 0 whatever grad_output holds (the fused in-place path
    used to multiply its zeros by a nan grad_output)."""
    logits, target = make((3, 11, 130), device, torch.float32)
    target[:, ::4] = -100
    grads = []
    for fn, inplace in ((F.cross_entropy, None), (cross_entropy, inplace_backward)):
        leaf = logits.clone().requires_grad_()
        kw = {} if inplace is None else dict(inplace_backward=inplace)
        loss = fn((leaf * 1.0).flatten(0, 1), target.flatten(), reduction=reduction, **kw)
        loss.backward(torch.full_like(loss, float("nan")))
        grads.append(leaf.grad)
    want, got = grads
    ignored = target == -100
    assert torch.equal(got[ignored], torch.zeros_like(got[ignored]))
    assert torch.equal(got.isnan(), want.isnan())


def test_return_lse(device):
    logits, target = make((4, 6, 77), device, torch.bfloat16)
    loss, lse = cross_entropy(logits, target, return_lse=True, z_loss=1e-4)
    assert lse.shape == target.shape and lse.dtype == torch.float32 and not lse.requires_grad
    ref = torch.logsumexp(logits.double(), -1).where(target != -100, 0.0)
    torch.testing.assert_close(lse.double(), ref, rtol=1e-6, atol=1e-5)


def test_scale_op(device):
    grad = torch.randn(7, 300, device=device, dtype=torch.bfloat16)
    factor = torch.tensor([1.0, 2.0, 0.5, 1.0, -3.0, 0.0, 1.0], device=device)
    out = grad.clone()
    torch.ops.fmcore.cross_entropy_scale_(out, factor)
    torch.testing.assert_close(out, (grad.float() * factor[:, None]).bfloat16(), rtol=0, atol=0)


def test_scale_op_zero_width(device):
    # A (N, 0) gradient is nothing to scale: the CUDA launcher once reported it as an invalid launch.
    grad = torch.empty(3, 0, device=device)
    torch.ops.fmcore.cross_entropy_scale_(grad, torch.full((3,), 2.0, device=device))
    assert grad.shape == (3, 0)


@pytest.mark.parametrize("V", [1, 2, 3])  # fewer classes than one thread's vector, and V = 1 (loss 0)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tiny_vocab(device, V, dtype):
    logits, target = make((37, V), device, dtype, scale=3.0, ignore_every=4)
    check(logits, target, reduction="sum", z_loss=1e-3)


def test_masked_and_nan_logits_as_torch(device):
    # -inf logits (a masked vocabulary) drop out of the log-sum-exp, also at the target (loss inf,
    # gradient p - 1 = -1 there); a NaN logit makes its row's loss and gradient NaN, and no other row.
    V = 300
    logits = torch.randn(6, V, device=device)
    logits[0, 100:] = float("-inf")
    logits[1, ::3] = float("-inf")
    logits[2, 7] = float("nan")
    logits[3, 5] = float("-inf")
    target = torch.tensor([4, 3, 9, 5, 0, 299], device=device)  # row 1's target and row 3's are -inf
    x, xt = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = cross_entropy(x, target, reduction="none")
    ref = F.cross_entropy(xt, target, reduction="none")
    torch.testing.assert_close(loss, ref, equal_nan=True)
    g = torch.linspace(0.5, 2.0, 6, device=device)
    loss.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, xt.grad, equal_nan=True)
    assert x.grad[2].isnan().all() and x.grad[[0, 1, 3, 4, 5]].isfinite().all()


def test_fused_forward_backward_op(device):
    # The fused kernel (used by linear_cross_entropy): loss, lse and grad_scale * dloss/dlogits in place.
    logits, target = make((30, 999), device, torch.float32)
    scale = torch.rand(30, device=device)
    x64 = logits.double().requires_grad_()
    rows = torch_loss(x64, target, reduction="none", label_smoothing=0.2, z_loss=1e-3)
    (rows * scale.double()).sum().backward()
    buf = logits.clone()
    loss, _ = torch.ops.fmcore.cross_entropy_fwd_bwd_(buf, target, scale, -100, 0.2, 1e-3)
    torch.testing.assert_close(loss.double(), rows.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(buf.double(), x64.grad, rtol=1e-5, atol=1e-6)


def test_gradcheck_fp64_cpu():
    logits = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 8, -100, 3, 3, 1])
    for reduction in REDUCTIONS:
        fn = lambda x: cross_entropy(x, target, reduction=reduction, label_smoothing=0.3, z_loss=0.01)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("bad", [7, -1, 100])
def test_out_of_range_target_raises(device, bad, target_dtype):
    logits = torch.randn(5, 7, device=device)
    target = torch.tensor([0, 1, bad, -100, 6], device=device, dtype=target_dtype)
    with pytest.raises(ValueError, match=r"target values in \[0, 7\).*got " + str(bad)):
        cross_entropy(logits, target)
    with pytest.raises(ValueError, match="target values"):
        torch.ops.fmcore.cross_entropy_fwd_bwd_(logits.clone(), target, torch.ones(5, device=device))
    # Each call checks its own targets: a valid call right after a bad one passes.
    target[2] = 3
    cross_entropy(logits, target)


def test_bad_inputs_name_the_argument(device):
    x = torch.randn(4, 10, device=device)
    t = torch.randint(0, 10, (4,), device=device)
    cases = [
        (lambda: cross_entropy(x.long(), t), ValueError, "logits"),
        (lambda: cross_entropy(x, t.float()), ValueError, "target"),
        (lambda: cross_entropy(x, t[:3]), ValueError, "target"),
        (lambda: cross_entropy(x[0], t), ValueError, "logits"),
        (lambda: cross_entropy(x.view(1, 2, 2, 10), t), ValueError, "logits"),
        (lambda: cross_entropy(x, t, reduction="avg"), ValueError, "reduction"),
        (lambda: cross_entropy(x, t, label_smoothing=1.5), ValueError, "label_smoothing"),
        (lambda: cross_entropy(x, t, z_loss=-1.0), ValueError, "z_loss"),
        (lambda: cross_entropy(x.t(), t.repeat(3)[:10]), ValueError, "logits"),  # last dim not contiguous
    ]
    if device.type == "cuda":
        cases.append((lambda: cross_entropy(x, t.cpu()), RuntimeError, "target"))
        cases.append((lambda: cross_entropy(x.double(), t), ValueError, "logits"))
    for fn, exc, name in cases:
        with pytest.raises(exc, match=name):
            fn()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(device, dtype):
    logits, target = make((11, 67), device, dtype)
    m = logits.float().amax(-1)
    stats = torch.stack([m, torch.logsumexp(logits.float(), -1) - m], -1)
    grad = torch.rand(11, device=device)
    ops = torch.ops.fmcore
    torch.library.opcheck(ops.cross_entropy_fwd, (logits.requires_grad_(), target, -100, 0.1, 1e-3, False))
    torch.library.opcheck(ops.cross_entropy_bwd, (logits.detach(), target, stats, grad, -100, 0.1, 1e-3))
    torch.library.opcheck(ops.cross_entropy_bwd_, (logits.detach().clone(), target, stats, grad, -100, 0.1, 1e-3))
    torch.library.opcheck(ops.cross_entropy_fwd_bwd_, (logits.detach().clone(), target, grad, -100, 0.0, 0.0))
    grad[::2] = 1.0  # rows with factor 1 are skipped
    torch.library.opcheck(ops.cross_entropy_scale_, (logits.detach().clone(), grad))


@pytest.mark.parametrize("inplace_backward", [False, True])
def test_torch_compile(device, inplace_backward):
    logits, target = make((3, 17, 130), device, torch.float32)

    def step(x):
        y = x * 2.0  # a producer op, so the in-place gradient has a non-leaf buffer to land in
        return cross_entropy(y, target, label_smoothing=0.1, z_loss=1e-3, inplace_backward=inplace_backward)

    assert_compiles_like_eager(step, (logits.clone().requires_grad_(),), device)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_autocast_loss_is_float32(device, reduction, inplace_backward):
    # Autocast runs F.cross_entropy in fp32: a bf16 loss (3 significant digits) was a silent mismatch.
    logits, target = make((4, 6, 50), device, torch.bfloat16)
    x, xt = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = cross_entropy(x * 1.0, target, reduction=reduction, inplace_backward=inplace_backward)
        ref = F.cross_entropy(xt.view(-1, 50), target.view(-1), reduction=reduction)
    assert loss.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(loss, ref.view(loss.shape))
    loss.sum().backward()
    ref.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad, xt.grad)


@pytest.mark.cuda
def test_cuda_target_check_does_not_wait_for_the_loss_kernel():
    # The target check is its own small launch queued before the loss kernel, and the host waits for
    # it alone: the call returns while the loss kernel (~1 ms on (16384, 50304) bf16) still runs.
    # Waiting for a flag the loss kernel wrote left the GPU idle through all the host work after it.
    x = torch.randn(16384, 50304, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 50304, (16384,), device="cuda")
    for inplace_backward in (False, True):
        cross_entropy(x, t, inplace_backward=inplace_backward)  # warm-up: allocator, pinned memory
        torch.cuda.synchronize()
        cross_entropy(x, t, inplace_backward=inplace_backward)
        assert not torch.cuda.current_stream().query(), "the call waited for its loss kernel"
        torch.cuda.synchronize()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_large_rows(dtype):
    # Enough rows for a grid-stride pass over many blocks, GPT-2's vocab, and the bf16 fast path.
    logits, target = make((512, 50257), "cuda", dtype, scale=2.0)
    check(logits, target, label_smoothing=0.1, z_loss=1e-4)
    check(logits, target, reduction="none")


@pytest.mark.cuda
@pytest.mark.bigmem
def test_offsets_past_2_31_elements_cuda():
    # N * V > 2^31 (a 32768 x 128256 batch is 4.2e9): every logit of the last rows lies past element
    # 2^31, and V = 50257 (odd) starts each row at another misalignment. A 32-bit row offset anywhere
    # (a wrapped read, or a gradient written into another row) makes the last rows differ from the
    # same rows computed alone. bf16: 4.3 GB of logits, 4.3 GB of gradient.
    V = 50257
    # The tail starts at a row that is a multiple of 8, so each of its rows has the same 16-byte
    # misalignment as in its fresh copy (the same split over threads, hence the same bits).
    start = (2**31 // V // 8 + 1) * 8
    N = start + 64
    assert start * V > 2**31
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs ~12 GB of GPU memory")
    torch.manual_seed(11)
    try:
        logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
        target = torch.randint(0, V, (N,), device="cuda")
        target[-3] = -100
        tail = slice(start, N)
        ops = torch.ops.fmcore
        loss, stats = ops.cross_entropy_fwd(logits, target, -100, 0.1, 1e-4, False)
        loss_s, stats_s = ops.cross_entropy_fwd(logits[tail].clone(), target[tail].clone(), -100, 0.1, 1e-4, False)
        assert torch.equal(loss[tail], loss_s) and torch.equal(stats[tail], stats_s)
        g = torch.rand(N, device="cuda")
        grad = ops.cross_entropy_bwd(logits, target, stats, g, -100, 0.1, 1e-4)
        grad_s = ops.cross_entropy_bwd(logits[tail].clone(), target[tail].clone(), stats_s, g[tail].clone(),
                                       -100, 0.1, 1e-4)
        assert torch.equal(grad[tail], grad_s)
        del grad
        # the fused kernel, gradient written over the logits in place
        expect = logits[tail].clone()
        ops.cross_entropy_fwd_bwd_(expect, target[tail].clone(), g[tail].clone(), -100, 0.1, 1e-4)
        ops.cross_entropy_fwd_bwd_(logits, target, g, -100, 0.1, 1e-4)
        assert torch.equal(logits[tail], expect)
        assert torch.equal(logits[-3], torch.zeros_like(logits[-3]))  # ignored row: zeros, not logits
    finally:
        logits = grad = None
        torch.cuda.empty_cache()


@pytest.mark.cuda
@pytest.mark.bigmem
def test_vocab_at_the_int32_limit_cuda():
    # V = 2^31 - 1, the largest the op takes. The per-element loops past the row's last 16-byte
    # vector counted in int: i = V - 1 + blockDim.x overflowed (a wrapped, negative index). One row
    # starting 2 bytes into its buffer (head and tail elements, and the backward's element-by-element
    # path: its fresh gradient row is aligned differently), then the fused kernel in place.
    V = 2**31 - 1
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs ~9 GB of GPU memory")
    ops = torch.ops.fmcore
    try:
        buf = torch.empty(V + 1, device="cuda", dtype=torch.bfloat16).normal_()
        logits = buf[1:].view(1, V)
        target = torch.tensor([V - 1], device="cuda")  # the target is a tail element
        loss, stats = ops.cross_entropy_fwd(logits, target, -100, 0.0, 0.0, False)
        m = logits.max().double()
        s = sum(torch.exp(c.double() - m).sum() for c in logits.view(-1).split(2**27))
        lse = m + torch.log(s)
        ref = (lse - logits[0, -1].double()).item()
        assert abs(loss.item() - ref) < 1e-2, (loss.item(), ref)
        assert abs(stats.sum().item() - lse.item()) < 1e-2
        ends = torch.cat([logits[0, :9], logits[0, -9:]]).double()
        want = torch.exp(ends - stats.double().sum())
        want[-1] -= 1.0  # d loss / d z_target = p - 1; the others are p ~ 3e-10: compare relatively
        grad = ops.cross_entropy_bwd(logits, target, stats, torch.ones(1, device="cuda"), -100, 0.0, 0.0)
        torch.testing.assert_close(torch.cat([grad[0, :9], grad[0, -9:]]).double(), want, rtol=1e-2, atol=0)
        del grad
        ops.cross_entropy_fwd_bwd_(logits, target, torch.ones(1, device="cuda"), -100, 0.0, 0.0)
        torch.testing.assert_close(torch.cat([logits[0, :9], logits[0, -9:]]).double(), want, rtol=1e-2, atol=0)
    finally:
        buf = logits = grad = None
        torch.cuda.empty_cache()


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # functorch's per-sample loop
@pytest.mark.parametrize("inplace_backward", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_per_sample_gradients_with_torch_func(reduction, inplace_backward):
    # torch.func.grad raised "it must override the setup_context staticmethod" (torch's Function for a
    # registered op has the old form). inplace_backward must not write over the caller's logits there.
    x, t = torch.randn(3, 4, 10, dtype=torch.float64), torch.randint(0, 10, (3, 4))
    t[0, 1] = -100
    kwargs = dict(reduction=reduction, label_smoothing=0.1)
    keep = x.clone()

    def loss(f, **extra):
        return lambda a, b: f(a, b, **kwargs, **extra).sum()

    got = torch.func.vmap(torch.func.grad(loss(cross_entropy, inplace_backward=inplace_backward)))(x, t)
    torch.testing.assert_close(got, torch.func.vmap(torch.func.grad(loss(F.cross_entropy)))(x, t))
    assert torch.equal(x, keep)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # functorch's per-sample loop
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_inplace_backward_under_vmap_with_autograd_outside(reduction, compiled):
    # vmap with the logits requiring grad outside it runs the op once per sample, each saving a view of
    # one buffer: the first sample's gradient written over its view made the others' backward raise
    # "modified by an inplace operation".
    x, t = torch.randn(3, 5, 10, dtype=torch.float64), torch.randint(0, 10, (3, 5))
    t[1, 2] = -100

    def run(f, **kw):
        xx = x.clone().requires_grad_()
        batched = torch.func.vmap(lambda a, b: f(a, b, reduction=reduction, label_smoothing=0.1, **kw))
        if compiled:
            batched = torch.compile(batched, fullgraph=True, backend="aot_eager")
        loss = batched(xx, t)
        (loss * torch.arange(1.0, loss.numel() + 1, dtype=loss.dtype).view(loss.shape)).sum().backward()
        return loss, xx.grad

    loss, grad = run(cross_entropy, inplace_backward=True)
    ref_loss, ref_grad = run(F.cross_entropy)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.filterwarnings("ignore:.*torch.jit.script")  # torch.autograd.forward_ad's own import
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_forward_mode_ad_raises(reduction):
    # torch.func.jvp gave an all-zero tangent: torch.library skips the op's autograd (and so the
    # missing jvp's error) when no input requires grad. A tangent must raise, never be dropped.
    x, t = torch.randn(4, 8, dtype=torch.float64), torch.randint(0, 8, (4,))
    with pytest.raises(NotImplementedError, match="no forward-mode derivative"):
        torch.func.jvp(lambda a: cross_entropy(a, t, reduction=reduction), (x,), (torch.randn_like(x),))


@pytest.mark.parametrize("inplace_backward", [False, True])
def test_int32_target_with_ignore_index_past_int32(inplace_backward):
    # An int32 target never equals 2**32, so nothing is ignored; torch compared target != 2**32 in
    # int32 (ignore_index wrapped to 0) and the mean divided by the count of targets != 0.
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 0, 2, 0, 4])
    want = F.cross_entropy(x, t)
    got = cross_entropy(x.detach().clone().requires_grad_(), t.int(), ignore_index=2**32,
                        inplace_backward=inplace_backward)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("reduction", ["mean", "sum"])  # the fused path: the forward writes the gradient
def test_inplace_backward_logits_edited_after_forward_raises(device, reduction):
    """The fused forward leaves the gradient in the logits buffer, held outside save_for_backward:
    an in-place edit of the logits (or of the buffer they view) before the backward was scaled and
    returned as the gradient, silently; torch's saved logits raise "modified by an inplace operation"."""
    logits, target = make((2, 3, 11), device, torch.float32)
    x = logits.clone().requires_grad_()
    y = x * 1.0
    loss = cross_entropy(y, target, inplace_backward=True, reduction=reduction)
    with torch.no_grad():
        y.view(-1)[0] += 1.0  # through another view: one version counter
    with pytest.raises(RuntimeError, match="modified in place after the forward"):
        loss.backward()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_inplace_backward_over_disjoint_slices_of_one_logits_buffer(device, reduction):
    """The loss computed in chunks, each a slice of one logits buffer in its own call: every chunk's
    forward and backward writes its own rows, which bumps the version counter the slices share; the
    check for edits after the forward took those for an edit of the other chunks' logits."""
    logits, target = make((4, 3, 11), device, torch.float32)
    ref_x, x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    sum(F.cross_entropy(c.reshape(-1, 11), tc.reshape(-1), reduction=reduction)
        for c, tc in zip((ref_x[:2] * 1.0, ref_x[2:] * 1.0), target.split(2))).backward()
    y = x * 1.0
    loss = sum(cross_entropy(c, tc, inplace_backward=True, reduction=reduction)
               for c, tc in zip((y[:2], y[2:]), target.split(2)))
    loss.backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    # an edit after the forwards is still caught
    y = x.detach().clone().requires_grad_() * 1.0
    loss = sum(cross_entropy(c, tc, inplace_backward=True, reduction=reduction)
               for c, tc in zip((y[:2], y[2:]), target.split(2)))
    with torch.no_grad():
        y[3, 0, 0] += 1.0
    with pytest.raises(RuntimeError, match="modified in place after the forward"):
        loss.backward()
