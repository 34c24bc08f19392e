"""fmcore.ops.linear_cross_entropy and fmcore.nn.LinearCrossEntropy against F.linear + F.cross_entropy
on float64, on CPU always and CUDA when present."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fmcore  # noqa: F401  (registers the ops)
from fmcore.nn import LinearCrossEntropy
from fmcore.ops import linear_cross_entropy
from tests.ops.test_cross_entropy import torch_loss
from tests.util import assert_close_to_ref, assert_compiles_like_eager

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REDUCTIONS = ["none", "mean", "sum"]


def make(N, D, V, device, dtype, bias=False, lead=None, ignore_every=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = lead if lead is not None else (N,)
    hidden = torch.randn(*shape, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    target = torch.randint(0, V, shape, generator=g)
    if ignore_every:
        target.view(-1)[1::ignore_every] = -100
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), target.to(device)


def check(hidden, weight, bias, target, grad_seed=0, **kw):
    """fmcore's loss and input gradients vs float64 autograd, scaled by torch's same-dtype error."""
    chunk = kw.pop("chunk_size", None)
    leaves = lambda dtype: [None if t is None else t.detach().to(dtype).requires_grad_()  # noqa: E731
                            for t in (hidden, weight, bias)]
    ours, ref, theirs = leaves(hidden.dtype), leaves(torch.float64), leaves(hidden.dtype)
    loss = linear_cross_entropy(*ours[:2], target, ours[2], chunk_size=chunk, **kw)
    ref_loss = torch_loss(F.linear(*ref[:2], ref[2]), target, **kw)
    torch_out = torch_loss(F.linear(*theirs[:2], theirs[2]), target, **kw)
    assert loss.dtype == hidden.dtype
    assert_close_to_ref(loss, ref_loss, torch_out, "loss")
    g = torch.randn(ref_loss.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    g = g.to(hidden.device)
    loss.backward(g.to(loss.dtype))
    ref_loss.backward(g)
    torch_out.backward(g.to(torch_out.dtype))
    for name, a, r, t in zip(("grad_hidden", "grad_weight", "grad_bias"), ours, ref, theirs):
        if a is not None:
            assert_close_to_ref(a.grad, r.grad, t.grad, name)


# (N, D, V, chunk_size, why)
CASES = [
    (37, 24, 101, None, "one chunk"),
    (37, 24, 101, 8, "5 chunks, the last one short"),
    (1, 16, 7, None, "N=1, V=7"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[-1].replace(" ", "_"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_torch(device, case, reduction, dtype):
    N, D, V, chunk, _ = case
    hidden, weight, _, target = make(N, D, V, device, dtype)
    check(hidden, weight, None, target, reduction=reduction, chunk_size=chunk)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bias_label_smoothing_z_loss(device, reduction, dtype):
    hidden, weight, bias, target = make(0, 32, 203, device, dtype, bias=True, lead=(3, 11))  # (B, S, D) input
    check(hidden, weight, bias, target, reduction=reduction, label_smoothing=0.1, z_loss=1e-3, chunk_size=7)


@pytest.mark.parametrize("V", [32001, 50257])
def test_real_vocab_sizes(device, V):
    hidden, weight, _, target = make(6, 32, V, device, torch.bfloat16)
    check(hidden, weight, None, target, chunk_size=4)


def test_int32_target_and_custom_ignore_index(device):
    hidden, weight, _, target = make(20, 16, 50, device, torch.float32, ignore_every=0)
    target[::4] = 3
    check(hidden, weight, None, target.int(), ignore_index=3, chunk_size=6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored(device, reduction):
    hidden, weight, _, target = make(9, 8, 13, device, torch.float32)
    target.fill_(-100)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    loss = linear_cross_entropy(h, w, target, reduction=reduction, chunk_size=4)
    ref = F.cross_entropy(F.linear(hidden, weight), target, reduction=reduction)
    torch.testing.assert_close(loss, ref, equal_nan=True)
    loss.sum().backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_tied_embedding_weight(device):
    # weight shared with the input embedding: both uses' gradients must add up.
    V, D, B, S = 61, 16, 2, 9
    g = torch.Generator().manual_seed(0)
    emb64 = torch.randn(V, D, generator=g, dtype=torch.float64)
    proj64 = torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5
    ids = torch.randint(0, V, (B, S), generator=g).to(device)
    target = torch.randint(0, V, (B, S), generator=g).to(device)

    def run(dtype, fused):
        emb = emb64.to(device=device, dtype=dtype).clone().requires_grad_()
        proj = proj64.to(device=device, dtype=dtype).clone().requires_grad_()
        hidden = torch.tanh(F.embedding(ids, emb) @ proj)
        if fused:
            loss = linear_cross_entropy(hidden, emb, target, chunk_size=5)
        else:
            loss = F.cross_entropy(F.linear(hidden, emb).view(-1, V), target.view(-1))
        loss.backward()
        return loss, emb.grad, proj.grad

    ours, ref, theirs = run(torch.float32, True), run(torch.float64, False), run(torch.float32, False)
    for name, a, r, t in zip(("loss", "grad_embedding", "grad_proj"), ours, ref, theirs):
        assert_close_to_ref(a, r, t, name)


def test_no_grad_work_when_nothing_requires_grad(device):
    hidden, weight, _, target = make(10, 8, 30, device, torch.float32)
    loss = linear_cross_entropy(hidden, weight, target)
    assert not loss.requires_grad
    with torch.no_grad():
        loss2 = linear_cross_entropy(hidden.requires_grad_(), weight, target)
    assert not loss2.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(hidden, weight), target))
    # the op itself returns empty gradients when none is asked for
    _, _, gh, gw, gb = torch.ops.fmcore.linear_cross_entropy(hidden.detach(), weight, target)
    assert gh.numel() == gw.numel() == gb.numel() == 0


def test_reduction_none_forward_computes_no_gradients(device):
    # "none": the per-row factors come with the backward, which runs the chunk loop again with
    # grad_rows. The forward once also ran both gradient matmuls per chunk and allocated
    # grad_hidden and grad_weight, only to drop them.
    hidden, weight, bias, target = make(12, 8, 30, device, torch.float32, bias=True)
    op = torch.ops.fmcore.linear_cross_entropy
    loss, _, gh, gw, gb = op(hidden, weight, target, bias, None, -100, 0.0, 0.0, 0, 5, True, True, True)
    assert loss.shape == (12,) and gh.numel() == gw.numel() == gb.numel() == 0
    rows = torch.rand(12, device=device)
    _, _, gh, gw, gb = op(hidden, weight, target, bias, rows, -100, 0.0, 0.0, 0, 5, True, True, True)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    (F.cross_entropy(F.linear(h, w, b), target, reduction="none") * rows).sum().backward()
    for mine, theirs in ((gh, h.grad), (gw, w.grad), (gb, b.grad)):
        torch.testing.assert_close(mine, theirs)


@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_only_one_input_requires_grad(device, which):
    hidden, weight, _, target = make(12, 8, 30, device, torch.float32)
    h = hidden.clone().requires_grad_(which == "hidden")
    w = weight.clone().requires_grad_(which == "weight")
    linear_cross_entropy(h, w, target, chunk_size=5).backward()
    h2, w2 = hidden.clone().requires_grad_(which == "hidden"), weight.clone().requires_grad_(which == "weight")
    F.cross_entropy(F.linear(h2, w2), target).backward()
    mine, theirs = (h, h2) if which == "hidden" else (w, w2)
    torch.testing.assert_close(mine.grad, theirs.grad)
    assert (w if which == "hidden" else h).grad is None


def test_backward_twice_raises(device):
    hidden, weight, _, target = make(8, 8, 20, device, torch.float32)
    loss = linear_cross_entropy(hidden.requires_grad_(), weight, target)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_activation_checkpointing(device, reduction, use_reentrant):
    # Non-reentrant checkpointing refuses a second unpack of ctx.saved_tensors in one backward.
    hidden, weight, bias, target = make(6, 8, 11, device, torch.float32, bias=True)
    mine = tuple(t.clone().requires_grad_() for t in (hidden, weight, bias))
    theirs = tuple(t.clone().requires_grad_() for t in (hidden, weight, bias))
    f = lambda h, w, b: linear_cross_entropy(h, w, target, b, reduction=reduction).sum()  # noqa: E731
    torch.utils.checkpoint.checkpoint(f, *mine, use_reentrant=use_reentrant).backward()
    f(*theirs).backward()
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # functorch's per-sample loop
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_per_sample_gradients_with_torch_func(reduction):
    # torch.func.grad raised "it must override the setup_context staticmethod" (torch's Function for a
    # registered op has the old form); under vmap the backward's in-place scaling had no batching rule.
    hidden, weight, bias, target = make(12, 8, 11, "cpu", torch.float64, bias=True)
    hidden, target = hidden.view(3, 4, 8), target.view(3, 4)

    def loss(f):
        return lambda h, w, b, t: f(h, w, t, b, reduction=reduction).sum()

    def reference(h, w, t, b, reduction):
        return F.cross_entropy(F.linear(h, w, b), t, reduction=reduction)

    per_sample = [torch.func.vmap(torch.func.grad(loss(f), argnums=(0, 1, 2)), in_dims=(0, None, None, 0))(
        hidden, weight, bias, target) for f in (linear_cross_entropy, reference)]
    torch.testing.assert_close(*per_sample)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # functorch's per-sample loop
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_vmap_over_hidden_that_requires_grad(reduction):
    # Under vmap hidden is a BatchedTensor whose requires_grad is False: the forward computed no
    # grad_hidden and hidden.grad came out None, silently.
    hidden, weight, bias, target = make(12, 8, 11, "cpu", torch.float32, bias=True)
    hidden, target = hidden.view(3, 4, 8), target.view(3, 4)
    mine = tuple(t.clone().requires_grad_() for t in (hidden, weight, bias))
    theirs = tuple(t.clone().requires_grad_() for t in (hidden, weight, bias))
    per_sample = lambda h, t: linear_cross_entropy(h, mine[1], t, mine[2], reduction=reduction)  # noqa: E731
    loss = torch.func.vmap(per_sample)(mine[0], target)
    ref = torch.stack([F.cross_entropy(F.linear(h, theirs[1], theirs[2]), t, reduction=reduction)
                       for h, t in zip(theirs[0], target)])
    torch.testing.assert_close(loss, ref)
    loss.sum().backward()
    ref.sum().backward()
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a.grad, b.grad)


def _storage(t):
    return t.untyped_storage().data_ptr()


class _RecordAllocations(TorchDispatchMode):
    """Records where the op's gradient outputs live and (func, shape, storage) of every tensor
    produced while recording is on. It keeps no tensor: an extra reference to a gradient would make
    AccumulateGrad copy it instead of taking it."""

    def __init__(self):
        super().__init__()
        self.op_grads, self.produced, self.recording = [], [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
        if func is torch.ops.fmcore.linear_cross_entropy.default:
            self.op_grads = [_storage(g) for g in out[2:4]]
        if self.recording:
            self.produced += [(func, tuple(o.shape), _storage(o)) for o in outs]
        return out


@pytest.mark.parametrize("grad_api", ["backward", "autograd.grad"])
def test_backward_allocates_no_second_gradient(device, grad_api):
    # The backward must scale the op's own gradient buffers and hand exactly those back: autograd once
    # materialized zeros for the op's unused gradient outputs (a second grad_hidden and grad_weight
    # alive with the first: 2x the gradients at the peak), and AccumulateGrad copies a gradient it
    # cannot steal. Every gradient-sized tensor the backward produces must share their storage.
    hidden, weight, _, target = make(64, 16, 100, device, torch.float32)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    with _RecordAllocations() as rec:
        loss = linear_cross_entropy(h, w, target, chunk_size=16)
        rec.recording = True
        if grad_api == "backward":
            loss.backward()
            grads = [h.grad, w.grad]
        else:
            grads = list(torch.autograd.grad(loss, [h, w]))
    assert [_storage(g) for g in grads] == rec.op_grads
    big = [(func, shape) for func, shape, ptr in rec.produced
           if math.prod(shape) >= hidden.numel() and ptr not in rec.op_grads]
    assert not big, f"the backward allocated gradient-sized tensors: {big}"


def test_gradcheck_fp64_cpu():
    # gradcheck runs the backward many times per forward, which only reduction "none" allows (the
    # others hand out gradients computed in the forward once); test_float64_cpu covers them.
    hidden, weight, bias, target = make(7, 5, 9, "cpu", torch.float64, bias=True)
    fn = lambda h, w, b: linear_cross_entropy(h, w, target, b, reduction="none",  # noqa: E731
                                              label_smoothing=0.2, z_loss=0.01, chunk_size=3)
    assert torch.autograd.gradcheck(fn, [t.clone().requires_grad_() for t in (hidden, weight, bias)])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float64_cpu(reduction):
    hidden, weight, bias, target = make(11, 6, 17, "cpu", torch.float64, bias=True)
    check(hidden, weight, bias, target, reduction=reduction, label_smoothing=0.2, z_loss=0.01, chunk_size=4)


def test_out_of_range_target_raises(device):
    hidden, weight, _, target = make(10, 8, 30, device, torch.float32)
    target[7] = 30
    with pytest.raises(ValueError, match=r"target values in \[0, 30\).*got 30"):
        linear_cross_entropy(hidden.requires_grad_(), weight, target, chunk_size=3)


def test_bad_inputs_name_the_argument(device):
    h, w, b, t = make(6, 8, 20, device, torch.float32, bias=True)
    cases = [
        (lambda: linear_cross_entropy(h.long(), w, t), ValueError, "hidden"),
        (lambda: linear_cross_entropy(h, w.double(), t), ValueError, "weight"),
        (lambda: linear_cross_entropy(h, w[:, :7], t), ValueError, "weight"),
        (lambda: linear_cross_entropy(h, w, t[:5]), ValueError, "target"),
        (lambda: linear_cross_entropy(h, w, t.float()), ValueError, "target"),
        (lambda: linear_cross_entropy(h, w, t, b[:3]), ValueError, "bias"),
        (lambda: linear_cross_entropy(h[0], w, t), ValueError, "hidden"),
        (lambda: linear_cross_entropy(h, w, t, chunk_size=0), ValueError, "chunk_size"),
        (lambda: linear_cross_entropy(h, w, t, reduction="avg"), ValueError, "reduction"),
        (lambda: linear_cross_entropy(h, w, t, label_smoothing=-0.1), ValueError, "label_smoothing"),
    ]
    if device.type == "cuda":
        cases.append((lambda: linear_cross_entropy(h, w.cpu(), t), RuntimeError, "weight"))
        cases.append((lambda: linear_cross_entropy(h, w, t.cpu()), RuntimeError, "target"))
    for fn, exc, name in cases:
        with pytest.raises(exc, match=name):
            fn()


@pytest.mark.parametrize("flags", [(True, True, True), (False, True, False), (False, False, False)], ids=str)
@pytest.mark.parametrize("reduction", [0, 1])
def test_opcheck(device, flags, reduction):
    h, w, b, t = make(9, 8, 23, device, torch.float32, bias=True)
    args = (h.requires_grad_(flags[0]), w.requires_grad_(flags[1]), t, b.requires_grad_(flags[2]), None,
            -100, 0.1, 1e-3, reduction, 4, *flags)
    torch.library.opcheck(torch.ops.fmcore.linear_cross_entropy, args)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile(device, reduction):
    h0, w0, _, t = make(0, 16, 57, device, torch.float32, lead=(2, 13))

    def step(h, w):
        loss = linear_cross_entropy(torch.tanh(h), w, t, reduction=reduction, z_loss=1e-4, chunk_size=10)
        return loss if reduction == "mean" else loss.square().sum()

    assert_compiles_like_eager(step, (h0.clone().requires_grad_(), w0.clone().requires_grad_()), device)


def test_autocast(device):
    # fp32 parameters under bf16 autocast: the matmuls run in bf16, the gradients come back fp32.
    hidden, weight, _, target = make(10, 16, 40, device, torch.float32)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, target)
        ref = F.cross_entropy(F.linear(h2, w2), target)
    loss.float().backward()
    ref.float().backward()
    assert loss.dtype == ref.dtype == torch.float32
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    torch.testing.assert_close(loss.float(), ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w.grad, w2.grad, rtol=2e-2, atol=2e-3)


def test_autocast_leaves_float64_alone():
    # Autocast casts no float64 tensor: torch's fp64 F.linear + F.cross_entropy stay fp64 under it.
    hidden, weight, _, target = make(6, 16, 40, "cpu", torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, target)
        ref = F.cross_entropy(F.linear(hidden, weight), target)
    assert loss.dtype == ref.dtype == torch.float64
    torch.testing.assert_close(loss, ref)


def test_module_and_tying(device):
    head = LinearCrossEntropy(16, 40, bias=True).to(device)
    hidden = torch.randn(3, 5, 16, device=device, requires_grad=True)
    target = torch.randint(0, 40, (3, 5), device=device)
    loss = head(hidden, target, label_smoothing=0.1)
    ref = F.cross_entropy(head.logits(hidden).view(-1, 40), target.view(-1), label_smoothing=0.1)
    torch.testing.assert_close(loss, ref)
    embed = torch.nn.Embedding(40, 16).to(device)
    head.weight = embed.weight  # tie
    head(embed(target), target).backward()
    assert embed.weight.grad is not None and head.bias.grad is not None
    assert "vocab_size=40" in repr(head)
    plain = LinearCrossEntropy(16, 40).to(device)  # no bias by default, as a language model's head
    assert plain.bias is None
    torch.testing.assert_close(plain(hidden, target), F.cross_entropy((hidden @ plain.weight.T).view(-1, 40),
                                                                      target.view(-1)))
    for dim, vocab in ((0, 40), (16, 0)):
        with pytest.raises(ValueError, match=f"expected dim > 0 and vocab_size > 0, got dim={dim}, vocab_size={vocab}"):
            LinearCrossEntropy(dim, vocab)


@pytest.mark.cuda
def test_cuda_peak_memory_within_bar():
    # The bar: peak memory above the inputs <= the returned gradients + 128 MiB.
    N, D, V = 4096, 512, 50304
    hidden, weight, _, target = make(N, D, V, "cuda", torch.bfloat16)
    hidden.requires_grad_()
    weight.requires_grad_()
    linear_cross_entropy(hidden, weight, target).backward()  # cuBLAS allocates its workspaces once
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    linear_cross_entropy(hidden, weight, target).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grads = (hidden.numel() + weight.numel()) * 2
    assert peak <= grads + 128 * 2**20, f"peak {peak / 2**20:.0f} MiB above inputs, grads {grads / 2**20:.0f} MiB"


@pytest.mark.cuda
def test_cuda_backward_allocates_nothing_gradient_sized():
    # The backward only scales the gradients the forward computed, in place: its peak above what the
    # forward left allocated must be a few scalars, not another copy of the gradients (the benchmark
    # at N8192 D4096 V128256 once peaked at exactly 2 x (grad_hidden + grad_weight)). Gradients of
    # 64 MiB (weight) + 4 MiB (hidden) make any copy stand far above the 1 MiB allowed.
    hidden, weight, _, target = make(2048, 1024, 32768, "cuda", torch.bfloat16)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    torch.autograd.grad(linear_cross_entropy(h, w, target), [h, w])  # cuBLAS allocates its workspaces once
    loss = linear_cross_entropy(h, w, target)
    torch.cuda.synchronize()
    after_forward = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = torch.autograd.grad(loss, [h, w])
    torch.cuda.synchronize()
    backward_peak = torch.cuda.max_memory_allocated() - after_forward
    assert backward_peak <= 2**20, f"the backward peaked {backward_peak / 2**20:.1f} MiB above the forward's"
    assert grads[1].shape == weight.shape


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_default_chunks(dtype):
    # Several default-sized chunks (112 MiB of logits each at V = 50257 => 1152 rows) and a remainder.
    hidden, weight, _, target = make(3000, 128, 50257, "cuda", dtype)
    check(hidden, weight, None, target, label_smoothing=0.1)



@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_double_backward_raises(device, reduction):
    """First-order gradients only: one taken with create_graph=True equals the plain one, and
    differentiating it again raises (the gradients computed in the forward would otherwise come
    out as constants, their second-order terms silently dropped)."""
    hidden, weight, bias, target = make(6, 8, 11, device, torch.float32, bias=True)
    inputs = tuple(t.requires_grad_() for t in (hidden, weight, bias))
    f = lambda: linear_cross_entropy(*inputs[:2], target, inputs[2], reduction=reduction).sum()  # noqa: E731
    want = torch.autograd.grad(f(), inputs)
    got = torch.autograd.grad(f(), inputs, create_graph=True)
    for g, w in zip(got, want):
        assert torch.equal(g.detach(), w)
    with pytest.raises(NotImplementedError, match="linear_cross_entropy supports first-order gradients only"):
        torch.autograd.grad(got[0].square().sum(), inputs[1])


@pytest.mark.filterwarnings("ignore:.*torch.jit.script")  # torch.autograd.forward_ad's own import
def test_forward_mode_ad_raises():
    h, w, t = torch.randn(4, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 6, (4,))
    with pytest.raises(NotImplementedError, match="no forward-mode derivative"):
        torch.func.jvp(lambda a: linear_cross_entropy(a, w, t), (h,), (torch.randn_like(h),))


def test_meta_tensors_give_shapes():
    # torch.is_autocast_enabled refuses the "meta" device type: modules built on meta must still trace.
    h = torch.empty(4, 8, device="meta", requires_grad=True)
    w = torch.empty(6, 8, device="meta", requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.zeros(4, dtype=torch.long, device="meta"))
    assert loss.shape == () and loss.device.type == "meta"
    loss.backward()
    assert h.grad.shape == h.shape and w.grad.shape == w.shape


def test_chunk_size_bool_is_refused():
    h, w, t = torch.randn(4, 8), torch.randn(6, 8), torch.randint(0, 6, (4,))
    with pytest.raises(ValueError, match="chunk_size to be a positive int"):
        linear_cross_entropy(h, w, t, chunk_size=True)


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_compiled_call_stays_one_graph_as_ignore_index_changes(op):
    # ignore_index was an `int` in the schemas (torch's is SymInt): dynamo specialized on it and
    # compiled a graph per value until its recompile limit (fullgraph=True: then an error).
    from torch._dynamo.testing import CompileCounter

    from fmcore.ops import cross_entropy

    counter = CompileCounter()
    torch._dynamo.reset()
    hidden, weight, _, target = make(8, 4, 10, "cpu", torch.float32, ignore_every=0)

    @torch.compile(backend=counter, fullgraph=True)
    def loss(ignore_index):
        if op == "cross_entropy":
            return cross_entropy(hidden @ weight.T, target, ignore_index=ignore_index)
        return linear_cross_entropy(hidden, weight, target, ignore_index=ignore_index)

    for ignore_index in range(12):
        torch.testing.assert_close(loss(ignore_index), loss.__wrapped__(ignore_index))
    assert counter.frame_count <= 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_return_lse_gives_each_rows_log_sum_exp(dtype, reduction):
    # (B, S) rows, a bias, an ignored row (its lse is 0), label smoothing and z-loss (which the lse
    # does not include): the logsumexp of the logits, detached, in hidden's dtype
    torch.manual_seed(0)
    h = torch.randn(2, 5, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(40, 16, dtype=dtype, requires_grad=True)
    b = torch.randn(40, dtype=dtype)
    t = torch.randint(0, 40, (2, 5))
    t[0, 1] = -100
    loss, lse = linear_cross_entropy(h, w, t, bias=b, reduction=reduction, label_smoothing=0.1, z_loss=1e-3,
                                     return_lse=True)
    want = torch.logsumexp(h.detach().double() @ w.detach().double().T + b.double(), -1)
    want[0, 1] = 0.0
    assert lse.dtype == dtype and lse.shape == t.shape and not lse.requires_grad
    torch.testing.assert_close(lse, want.to(dtype))
    torch.testing.assert_close(loss, linear_cross_entropy(h, w, t, bias=b, reduction=reduction, label_smoothing=0.1,
                                                          z_loss=1e-3), rtol=0, atol=0)
