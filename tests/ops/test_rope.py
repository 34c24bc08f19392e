"""fmcore.ops.apply_rotary against a float64 reference, on CPU always and CUDA when present."""

import re

import pytest
import torch

import fmcore
from fmcore.nn import RotaryEmbedding, apply_rotary_pos_emb
from fmcore.ops import apply_rotary
from tests.util import assert_close_to_ref, assert_compiles_like_eager

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def reference(x, cos, sin, interleaved, conjugate=False):
    """Rotation of x (B, S, H, D) in float64; cos/sin (S, R/2) or (B, S, R/2), first S rows used."""
    B, S, H, D = x.shape
    x = x.double()
    half = cos.shape[-1]
    cos = cos[..., :S, :].double()
    sin = sin[..., :S, :].double() * (-1 if conjugate else 1)
    cos = cos[:, :, None, :] if cos.dim() == 3 else cos[None, :, None, :]
    sin = sin[:, :, None, :] if sin.dim() == 3 else sin[None, :, None, :]
    rot, rest = x[..., : 2 * half], x[..., 2 * half :]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    else:
        a, b = rot[..., :half], rot[..., half:]
        out = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    return torch.cat([out, rest], dim=-1)


def _torch_rope(x, cos, sin, interleaved):
    S, half = x.shape[1], cos.shape[-1]
    c = cos[..., :S, :].to(x.dtype)
    s = sin[..., :S, :].to(x.dtype)
    c = c[:, :, None] if c.dim() == 3 else c[None, :, None]
    s = s[:, :, None] if s.dim() == 3 else s[None, :, None]
    rot, rest = x[..., : 2 * half], x[..., 2 * half :]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([a * c - b * s, b * c + a * s], dim=-1).flatten(-2)
    else:
        a, b = rot[..., :half], rot[..., half:]
        out = torch.cat([a * c - b * s, b * c + a * s], dim=-1)
    return torch.cat([out, rest], dim=-1)


def tables(S, R, device, dtype=torch.float32, batch=None):
    """Random angles (not a real frequency table) so every position and feature is exercised."""
    shape = (S, R // 2) if batch is None else (batch, S, R // 2)
    theta = torch.rand(shape, device=device, dtype=torch.float64) * 6.3
    return theta.cos().to(dtype), theta.sin().to(dtype)


# (B, S, Hq, Hk, D, R), and why each is here
SHAPES = [
    (1, 1, 1, 1, 64, 64),  # B=1, S=1: the degenerate row
    (2, 423, 12, 4, 96, 96),  # awkward S, GQA 12/4, D=96 (not a power of two)
    (3, 17, 7, 1, 128, 64),  # MQA with 7 query heads, partial rotary R<D (pass-through features)
    (2, 33, 8, 8, 128, 128),  # plain MHA, D=128
    (1, 5, 2, 2, 10, 6),  # tiny odd-ish dims: R/2=3 forces the scalar (non-vector) kernel path
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_reference(device, shape, interleaved, layout, dtype):
    B, S, Hq, Hk, D, R = shape
    q = torch.randn(B, S, Hq, D, device=device, dtype=dtype)
    k = torch.randn(B, S, Hk, D, device=device, dtype=dtype)
    cos, sin = tables(S + 3, R, device)  # a longer cached table: only the first S rows are used
    if layout == "bshd":
        oq, ok = apply_rotary(q, k, cos, sin, interleaved=interleaved)
    else:  # the same data as (B, H, S, D) contiguous tensors
        qh, kh = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
        oq, ok = apply_rotary(qh, kh, cos, sin, interleaved=interleaved, layout="bhsd")
        oq, ok = oq.transpose(1, 2), ok.transpose(1, 2)
    for name, x, out in (("q", q, oq), ("k", k, ok)):
        ref = reference(x, cos, sin, interleaved)
        assert_close_to_ref(out, ref, _torch_rope(x, cos, sin, interleaved), name)


@pytest.mark.parametrize("cs_dtype", ["fp32", "same"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_per_sample_positions_and_cos_dtype(device, cs_dtype, dtype):
    # (B, S, R/2) tables: packed sequences where each sample has its own positions.
    B, S, H, D = 3, 50, 4, 64
    q = torch.randn(B, S, H, D, device=device, dtype=dtype)
    k = torch.randn(B, S, 2, D, device=device, dtype=dtype)
    cos, sin = tables(S, D, device, batch=B, dtype=torch.float32 if cs_dtype == "fp32" else dtype)
    oq, ok = apply_rotary(q, k, cos, sin)
    assert_close_to_ref(oq, reference(q, cos, sin, False), _torch_rope(q, cos, sin, False), "q")
    assert_close_to_ref(ok, reference(k, cos, sin, False), _torch_rope(k, cos, sin, False), "k")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shared_batch_table_misaligned_k_and_odd_tail(device, dtype):
    # cos/sin (1, S', R/2): one table for every sample (batch stride 0), longer than S. k sits one
    # element into its buffer while q is aligned: the 16-byte path is all-or-nothing per launch, so
    # the scalar path runs both. D - R = 4 also breaks the bf16/fp16 vector on its own.
    B, S, Hq, Hk, D, R = 2, 13, 4, 2, 68, 64
    q = torch.randn(B, S, Hq, D, device=device, dtype=dtype)
    base = torch.randn(B * S * Hk * D + 1, device=device, dtype=dtype)
    k = base[1:].view(B, S, Hk, D)
    cos, sin = tables(S + 2, R, device, batch=1)
    for interleaved in (False, True):
        oq, ok = apply_rotary(q, k, cos, sin, interleaved=interleaved)
        for name, x, out in (("q", q, oq), ("k", k, ok)):
            ref = reference(x, cos, sin, interleaved)
            assert_close_to_ref(out, ref, _torch_rope(x, cos, sin, interleaved), name)


def test_strided_q_k_from_fused_qkv(device):
    # q, k, v sliced out of one (B, S, Hq + 2 Hk, D) projection: strided, no copy allowed or needed.
    B, S, Hq, Hk, D = 2, 37, 6, 2, 64
    qkv = torch.randn(B, S, Hq + 2 * Hk, D, device=device, dtype=torch.bfloat16)
    q, k = qkv[:, :, :Hq], qkv[:, :, Hq : Hq + Hk]
    assert not q.is_contiguous()
    cos, sin = tables(S, D, device)
    oq, ok = apply_rotary(q, k, cos, sin)
    assert_close_to_ref(oq, reference(q, cos, sin, False), _torch_rope(q, cos, sin, False), "q")
    assert_close_to_ref(ok, reference(k, cos, sin, False), _torch_rope(k, cos, sin, False), "k")
    # in place on the slices rotates the qkv buffer itself and leaves v alone
    v_before = qkv[:, :, Hq + Hk :].clone()
    apply_rotary(q, k, cos, sin, inplace=True)
    torch.testing.assert_close(qkv[:, :, :Hq], oq, rtol=0, atol=0)
    torch.testing.assert_close(qkv[:, :, Hq : Hq + Hk], ok, rtol=0, atol=0)
    assert torch.equal(qkv[:, :, Hq + Hk :], v_before)


@pytest.mark.parametrize("interleaved", [False, True])
def test_inplace_partial_rotary_keeps_tail(device, interleaved):
    q = torch.randn(2, 9, 4, 96, device=device)
    k = torch.randn(2, 9, 4, 96, device=device)
    q0, k0 = q.clone(), k.clone()
    cos, sin = tables(9, 32, device)
    rq, rk = apply_rotary(q, k, cos, sin, interleaved=interleaved, inplace=True)
    assert rq is q and rk is k
    assert_close_to_ref(q, reference(q0, cos, sin, interleaved), _torch_rope(q0, cos, sin, interleaved), "q")
    assert torch.equal(q[..., 32:], q0[..., 32:]) and torch.equal(k[..., 32:], k0[..., 32:])


@pytest.mark.parametrize("interleaved", [False, True])
def test_gradcheck_fp64_cpu(interleaved):
    q = torch.randn(2, 5, 4, 12, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 5, 2, 12, dtype=torch.float64, requires_grad=True)
    cos, sin = tables(5, 8, "cpu", dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q, k: apply_rotary(q, k, cos, sin, interleaved=interleaved), (q, k))


@pytest.mark.parametrize("interleaved,layout", [(False, "bshd"), (True, "bhsd")])
def test_double_backward_fp64_cpu(interleaved, layout):
    # The backward is again a rotation recorded by autograd, so second derivatives (gradgradcheck:
    # the backward's own backward, a rotation forwards again) come out of the same op. Small
    # shapes: gradgradcheck's cost grows with the square of the element count.
    q = torch.randn(1, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 3, 1, 8, dtype=torch.float64, requires_grad=True)
    if layout == "bhsd":
        q, k = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k))
    cos, sin = tables(3, 6, "cpu", dtype=torch.float64)  # partial rotary: R=6 < D=8
    f = lambda q, k: apply_rotary(q, k, cos, sin, interleaved=interleaved, layout=layout)  # noqa: E731
    assert torch.autograd.gradgradcheck(f, (q, k))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_is_inverse_rotation(device, dtype):
    q = torch.randn(2, 31, 8, 64, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 31, 2, 64, device=device, dtype=dtype, requires_grad=True)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    cos, sin = tables(31, 48, device)
    oq, ok = apply_rotary(q, k, cos, sin)
    torch.autograd.backward((oq, ok), (gq, gk))
    for name, g, grad in (("dq", gq, q.grad), ("dk", gk, k.grad)):
        ref = reference(g, cos, sin, False, conjugate=True)
        assert_close_to_ref(grad, ref, _torch_rope(g, cos, -sin, False), name)


def test_backward_with_unused_k_and_expanded_grad(device):
    # Only q reaches the loss (k's grad is None) and sum() hands back an expanded, stride-0 gradient.
    q = torch.randn(1, 4, 2, 16, device=device, requires_grad=True)
    k = torch.randn(1, 4, 2, 16, device=device, requires_grad=True)
    cos, sin = tables(4, 16, device)
    oq, _ = apply_rotary(q, k, cos, sin)
    oq.sum().backward()
    ref = reference(torch.ones_like(q), cos, sin, False, conjugate=True)
    torch.testing.assert_close(q.grad.double(), ref, rtol=1e-5, atol=1e-5)
    assert k.grad is None or torch.count_nonzero(k.grad) == 0


@pytest.mark.parametrize("grad_of", ["q", "k"])
def test_an_output_requires_grad_only_if_its_input_does(device, grad_of):
    # As torch's own rotation: a frozen k (LoRA leaves k_proj frozen) gave a k_rot that required grad,
    # so autograd ran a backward path through attention for nothing.
    q = torch.randn(1, 4, 2, 16, device=device, requires_grad=grad_of == "q")
    k = torch.randn(1, 4, 2, 16, device=device, requires_grad=grad_of == "k")
    cos, sin = tables(4, 16, device)
    oq, ok = apply_rotary(q, k, cos, sin)
    assert (oq.requires_grad, ok.requires_grad) == (q.requires_grad, k.requires_grad)
    (oq if grad_of == "q" else ok).square().sum().backward()
    assert (q if grad_of == "q" else k).grad is not None


def test_inplace_bumps_version_and_refuses_grad(device):
    # rope_ overwrites q: a node that saved q for its backward must see that and raise, not read the
    # rotated values; and the raw op refuses q that requires grad (apply_rotary's own check moved here).
    q = torch.randn(1, 3, 2, 8, device=device)
    k = torch.randn(1, 3, 2, 8, device=device)
    cos, sin = tables(3, 8, device)
    w = torch.randn_like(q, requires_grad=True)
    loss = (w * q).sum()  # saves q for dL/dw
    version = q._version
    apply_rotary(q, k, cos, sin, inplace=True)
    assert q._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    qg = q.clone().requires_grad_()
    with pytest.raises(ValueError, match="inplace=False"):
        torch.ops.fmcore.rope_(qg, k, cos, sin)
    with torch.no_grad():  # allowed without grad mode, like any in-place op on a leaf under no_grad
        torch.ops.fmcore.rope_(qg, k, cos, sin)



@pytest.mark.filterwarnings("ignore:There is a performance drop")  # functorch's per-sample loop
@pytest.mark.parametrize("compiled", [False, True])
def test_inplace_under_vmap(compiled):
    # rope_ has no batching rule: under torch.func.vmap inplace=True raised "Batching rule not
    # implemented for fmcore::rope_" (out-of-place worked). It rotates each sample's q and k in place.
    q, k = torch.randn(3, 2, 5, 4, 8), torch.randn(3, 2, 5, 2, 8)
    angles = torch.rand(3, 5, 4) * 6
    expected = [apply_rotary(q[i], k[i], angles[i].cos(), angles[i].sin(), interleaved=True) for i in range(3)]
    rotate = torch.func.vmap(lambda a, b, c, s: apply_rotary(a, b, c, s, interleaved=True, inplace=True))
    if compiled:
        rotate = torch.compile(rotate, fullgraph=True, backend="aot_eager")
    rotate(q, k, angles.cos(), angles.sin())
    torch.testing.assert_close(q, torch.stack([e[0] for e in expected]), rtol=0, atol=0)
    torch.testing.assert_close(k, torch.stack([e[1] for e in expected]), rtol=0, atol=0)
    # rope_'s refusals hold under vmap too
    cos, sin = angles[0].cos(), angles[0].sin()
    x = torch.randn(3, 2, 5, 4, 8, requires_grad=True)
    with pytest.raises(ValueError, match="inplace=False"):
        torch.func.vmap(lambda a: apply_rotary(a * 1, a * 2, cos, sin, inplace=True))(x)
    with pytest.raises(ValueError, match="share memory"):
        torch.func.vmap(lambda a: apply_rotary(a, a, cos, sin, inplace=True))(q)


@pytest.mark.parametrize("inplace", [False, True])
def test_tables_that_require_grad_raise(device, inplace):
    """cos and sin get no gradient: a table that requires grad (computed from a learned parameter)
    raises rather than being left silently without one; detached, it runs."""
    q = torch.randn(1, 3, 2, 8, device=device, requires_grad=not inplace)
    k = torch.randn(1, 3, 2, 8, device=device, requires_grad=not inplace)
    cos, sin = tables(3, 8, device)
    with pytest.raises(NotImplementedError, match=r"cos.detach\(\) and sin.detach\(\)"):
        apply_rotary(q, k, cos.requires_grad_(), sin, inplace=inplace)
    apply_rotary(q, k, cos.detach(), sin, inplace=inplace)
    with torch.no_grad():
        apply_rotary(q, k, cos, sin, inplace=inplace)

@pytest.mark.filterwarnings("ignore:.*torch.jit.script")  # torch.autograd.forward_ad's own import
@pytest.mark.parametrize("dual", ["q", "cos", "q inplace"])
def test_forward_mode_ad_raises(dual):
    # Forward-mode AD is not implemented: a tangent must raise, never be silently dropped.
    import torch.autograd.forward_ad as fwAD

    t = dict(q=torch.randn(1, 3, 2, 8), k=torch.randn(1, 3, 2, 8))
    t["cos"], t["sin"] = tables(3, 8, "cpu")
    name = dual.split()[0]
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="jvp|forward-mode"):
        t[name] = fwAD.make_dual(t[name], torch.randn_like(t[name]))
        apply_rotary(t["q"], t["k"], t["cos"], t["sin"], inplace=dual.endswith("inplace"))


def test_inplace_refuses_elements_reachable_twice(device):
    # Each element is rotated where it is stored: k is q, or an expanded q, would be rotated twice
    # (torch's own in-place ops refuse such outputs too). Slices of one fused qkv buffer are fine.
    cos, sin = tables(5, 8, device)
    x = torch.randn(2, 5, 2, 8, device=device)
    with pytest.raises(ValueError, match="q and k share memory"):
        apply_rotary(x, x, cos, sin, inplace=True)
    expanded = torch.randn(1, 5, 2, 8, device=device).expand(3, 5, 2, 8)
    with pytest.raises(ValueError, match="elements of q share memory"):
        apply_rotary(expanded, torch.randn(3, 5, 2, 8, device=device), cos, sin, inplace=True)
    qkv = torch.randn(2, 5, 3, 2, 8, device=device)
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    want_q, want_k = apply_rotary(q, k, cos, sin)
    apply_rotary(q, k, cos, sin, inplace=True)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


def test_inplace_refuses_overlapping_slices_of_one_buffer(device):
    # Head slices of one (B, S, H, D) buffer that share a head (an off-by-one: q heads 0-1, k heads
    # 1-2): torch's overlap check answers "too hard" for such views, and head 1 was rotated twice.
    cos, sin = tables(5, 8, device)
    z = torch.randn(2, 5, 4, 8, device=device)
    with pytest.raises(ValueError, match="q and k share memory"):
        apply_rotary(z[:, :, 0:2], z[:, :, 1:3], cos, sin, inplace=True)
    with pytest.raises(ValueError, match="q and k share memory"):  # k's first head is q's last, GQA shapes
        apply_rotary(z[:, :, 0:3], z[:, :, 2:3], cos, sin, inplace=True)
    # Views with other strides: decided by their extents (both were rotated twice where they met, silently).
    for k in (z[:, :, ::2], z.view(2, 5, 2, 16)[..., :8]):
        with pytest.raises(ValueError, match="q and k share memory"):
            apply_rotary(z, k, cos, sin, inplace=True)
    # Disjoint slices, adjacent or interleaved, are what the in-place op is for; so are views with
    # other strides whose extents do not meet.
    two = torch.randn(2, 2 * 5 * 4 * 8, device=device)  # (rows of one storage)
    far = two[0].view(2, 5, 4, 8), two[1].view(2, 5, 2, 16)[..., :8]
    for q, k in [(z[:, :, 0:2], z[:, :, 2:4]), (z[:, :, 0::2], z[:, :, 1::2]), (z[:, :, 1:3], z[:, :, 3:4]), far]:
        want_q, want_k = apply_rotary(q, k, cos, sin)
        apply_rotary(q, k, cos, sin, inplace=True)
        assert torch.equal(q, want_q) and torch.equal(k, want_k)


def test_opcheck(device):
    q = torch.randn(2, 7, 4, 32, device=device, dtype=torch.float32, requires_grad=True)
    k = torch.randn(2, 7, 2, 32, device=device, dtype=torch.float32, requires_grad=True)
    cos, sin = tables(7, 32, device)
    torch.library.opcheck(torch.ops.fmcore.rope.default, (q, k, cos, sin, False, False, 1))
    torch.library.opcheck(torch.ops.fmcore.rope_.default, (q.detach().clone(), k.detach().clone(), cos, sin, True, False, 1))


def test_torch_compile_fullgraph(device):
    q = torch.randn(2, 9, 4, 32, device=device, requires_grad=True)
    k = torch.randn(2, 9, 2, 32, device=device, requires_grad=True)
    cos, sin = tables(9, 32, device)

    def f(q, k):
        oq, ok = apply_rotary(q, k, cos, sin)
        return (oq * 2).sum() + ok.square().sum()

    assert_compiles_like_eager(f, (q, k), device)


def test_rotary_embedding_module_and_hf_dropin(device):
    # fmcore.nn.RotaryEmbedding's tables and the HF-signature drop-in agree with HF's formula.
    B, H, S, D = 2, 4, 19, 64
    rope = RotaryEmbedding(D, max_seq_len=64).to(device)
    q = torch.randn(B, H, S, D, device=device)
    k = torch.randn(B, H, S, D, device=device)
    pos = torch.arange(S, device=device)[None].expand(B, S)
    cos, sin = rope.hf_cos_sin(pos)  # (B, S, D), HF's duplicated-halves convention
    oq, ok = apply_rotary_pos_emb(q, k, cos, sin)
    def rotate_half(x):
        x1, x2 = x.chunk(2, -1)
        return torch.cat((-x2, x1), -1)
    c, s = cos[:, None], sin[:, None]
    torch.testing.assert_close(oq, q * c + rotate_half(q) * s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ok, k * c + rotate_half(k) * s, rtol=1e-5, atol=1e-5)
    # the module's own call on (B, S, H, D) with positions
    oq2, _ = rope(q.transpose(1, 2), k.transpose(1, 2))
    torch.testing.assert_close(oq2.transpose(1, 2), oq, rtol=1e-5, atol=1e-5)


def test_hf_dropin_matches_transformers_signature():
    # transformers' (q, k, cos, sin, unsqueeze_dim=1): a positional unsqueeze_dim must land there
    # (fmcore's once had position_ids in that place, and took 2 for ids: the wrong layout, silently).
    # Callers written for transformers < 4.48 pass position_ids by keyword: a whole (max_len, R) table
    # is indexed with them (< 4.38); a (B, S, R) table is taken as it is (4.38-4.47).
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    B, S, H, D = 2, 5, 5, 16  # S == H: a layout mix-up cannot show as a shape error
    q, k = torch.randn(B, S, H, D), torch.randn(B, S, H, D)
    rope = RotaryEmbedding(D, max_seq_len=32)
    pos = torch.tensor([[3, 4, 5, 6, 7], [0, 9, 2, 11, 4]])
    cos, sin = rope.hf_cos_sin(pos)
    for got, want in zip(apply_rotary_pos_emb(q, k, cos, sin, 2), llama.apply_rotary_pos_emb(q, k, cos, sin, 2)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    table_cos, table_sin = rope.hf_cos_sin(torch.arange(32)[None])
    for got, want in zip(apply_rotary_pos_emb(q, k, table_cos[0], table_sin[0], 2, position_ids=pos),
                         llama.apply_rotary_pos_emb(q, k, cos, sin, 2)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="pass position_ids by keyword"):
        apply_rotary_pos_emb(q, k, cos, sin, pos)


def test_hf_dropin_errors_name_the_tables_passed():
    # The op sees the first half of HF's (B, S, R) tables: its error showed (2, 4, 8) for the (2, 4, 16)
    # tables the caller passed (too few positions for q's 6).
    q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16)
    cos, sin = RotaryEmbedding(16, max_seq_len=32).hf_cos_sin(torch.arange(4)[None].expand(2, 4))
    with pytest.raises(ValueError, match=r"S >= 6 .*cos \(2, 4, 16\), sin \(2, 4, 16\)"):
        apply_rotary_pos_emb(q, k, cos, sin)
    # an error about q or k is the op's own, passed on as it is
    with pytest.raises(ValueError, match=r"expected k of shape \(B, Hk, S, D\) = \(2, Hk, 4, 16\) to match q "
                                         r"\(2, 3, 4, 16\), got \(2, 3, 4, 8\)$"):
        apply_rotary_pos_emb(torch.randn(2, 3, 4, 16), torch.randn(2, 3, 4, 8), cos, sin)


@pytest.mark.parametrize("args, message", [((15, 8), "expected an even rotary dim > 0, got dim=15"),
                                           ((0, 8), "expected an even rotary dim > 0, got dim=0"),
                                           ((16, 0), "expected max_seq_len > 0, got 0"),
                                           ((16, 8, float("inf")), "expected a finite base > 0, got inf")])
def test_rotary_module_arguments_are_checked_by_name(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RotaryEmbedding(*args)


def test_rotary_module_positions_are_computed_not_looked_up(device):
    """Explicit positions give the table's rows where the table has them, and any other integer (past
    max_seq_len: a KV cache grown longer, or negative) without an out-of-range lookup, which on CUDA
    would be a device-side assert."""
    rope = RotaryEmbedding(16, max_seq_len=32).to(device)
    pos = torch.tensor([[0, 5, 31], [40, 1000, -3]], device=device)
    cos, sin = rope.tables(pos)
    assert torch.equal(cos[0], rope.cos[pos[0]]) and torch.equal(sin[0], rope.sin[pos[0]])
    inv_freq = 10000.0 ** -(torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    angles = pos.cpu().double()[..., None] * inv_freq
    torch.testing.assert_close(cos.cpu(), angles.cos().float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin.cpu(), angles.sin().float(), rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="integer"):
        rope.tables(pos.float())


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_rotary_module_longer_than_its_table_names_max_seq_len(device, layout):
    # Without positions the table's rows are the positions: a longer q raised about a "cos" the
    # caller never passed. With positions any length works.
    rope = RotaryEmbedding(16, max_seq_len=8).to(device)
    q = torch.randn(1, 12, 2, 16, device=device) if layout == "bshd" else torch.randn(1, 2, 12, 16, device=device)
    with pytest.raises(ValueError, match="max_seq_len=8 positions in q .* got 12"):
        rope(q, q.clone(), layout=layout)
    rope(q, q.clone(), positions=torch.arange(12, device=device)[None], layout=layout)
    rope(q[:, :8] if layout == "bshd" else q[:, :, :8], q.clone()[:, :8] if layout == "bshd" else q.clone()[:, :, :8],
         layout=layout)


def test_rotary_module_table_survives_casts_and_meta_init(device):
    """The table stays fp32 under module.to(bfloat16) (a bf16 table loses ~3 digits of every angle's
    cos/sin), and a module built on the meta device gets real values from to_empty(), which leaves
    non-persistent buffers uninitialized otherwise."""
    want = RotaryEmbedding(16, max_seq_len=32).cos.to(device)
    assert torch.equal(RotaryEmbedding(16, max_seq_len=32).to(device, torch.bfloat16).cos, want)
    with torch.device("meta"):
        rope = RotaryEmbedding(16, max_seq_len=32)
    assert rope.cos.is_meta
    assert torch.equal(rope.to_empty(device=device).cos, want)


def test_attention_built_on_meta_then_loaded_with_assign(device):
    # load_state_dict(assign=True) brings the weights but not the non-persistent RoPE tables: .to()
    # failed ("Cannot copy out of meta tensor") and the forward on "cos on meta".
    from fmcore.nn import Attention

    torch.manual_seed(0)
    real = Attention(32, 2, max_seq_len=16).to(device)
    with torch.device("meta"):
        lazy = Attention(32, 2, max_seq_len=16)
    lazy.load_state_dict(real.state_dict(), assign=True)
    lazy.to(device)
    x = torch.randn(2, 16, 32, device=device)
    torch.testing.assert_close(lazy(x), real(x))


def test_meta_built_tables_first_made_under_inference_mode_train(device):
    # The tables left on meta (load_state_dict(assign=True)) are built by the first forward: under
    # torch.inference_mode they were inference tensors, and training afterwards raised "Inference
    # tensors cannot be saved for backward".
    with torch.device("meta"):
        rope = RotaryEmbedding(16, max_seq_len=32)
    q, k = torch.randn(2, 8, 2, 16, device=device), torch.randn(2, 8, 1, 16, device=device)
    with torch.inference_mode():
        rope(q, k)
    assert not rope.cos.is_inference() and not rope.sin.is_inference()
    qg = q.clone().requires_grad_()
    rope(qg, k)[0].sum().backward()
    assert qg.grad is not None
    torch.testing.assert_close(rope.cos, RotaryEmbedding(16, max_seq_len=32).cos.to(device), rtol=0, atol=0)


def test_tables_remade_under_inference_mode_train(device):
    # .to() remakes the tables, even when nothing moves: under torch.inference_mode (an evaluation helper
    # that moves the model) they became inference tensors, and the next training forward raised "Inference
    # tensors cannot be saved for backward".
    from fmcore.nn import Attention

    attn = Attention(32, 2, max_seq_len=16).to(device)
    with torch.inference_mode():
        attn.to(device)
    assert not attn.rope.cos.is_inference() and not attn.rope.sin.is_inference()
    x = torch.randn(2, 16, 32, device=device, requires_grad=True)
    attn(x).sum().backward()
    assert x.grad is not None


BAD = [
    # (what is wrong, kwargs changes, the word the error must name)
    ("k on another dtype", dict(k=lambda t: t["k"].half()), "k"),
    ("sin shape differs from cos", dict(sin=lambda t: t["sin"][:, :3].contiguous()), "sin"),
    ("cos 4-d", dict(cos=lambda t: t["cos"][None, None], sin=lambda t: t["sin"][None, None]), "cos"),
    ("cos batch mismatch", dict(cos=lambda t: t["cos"].expand(3, 8, 32), sin=lambda t: t["sin"].expand(3, 8, 32)), "cos"),
    ("cos too short", dict(cos=lambda t: t["cos"][:2], sin=lambda t: t["sin"][:2]), "cos"),
    ("rotary dim > head dim", dict(cos=lambda t: torch.rand(8, 40), sin=lambda t: torch.rand(8, 40)), "cos"),
    ("Hk not dividing Hq", dict(k=lambda t: torch.randn(2, 8, 3, 64)), "heads of k"),
    ("non-contiguous last dim", dict(q=lambda t: torch.randn(2, 8, 4, 128)[..., ::2]), "q"),
    ("integer q", dict(q=lambda t: torch.randint(0, 5, (2, 8, 4, 64))), "q"),
    ("3-d q", dict(q=lambda t: torch.randn(8, 4, 64)), "q"),
    ("sin dtype", dict(sin=lambda t: t["sin"].double()), "sin"),
]


@pytest.mark.parametrize("what,changes,name", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise_naming_the_argument(what, changes, name):
    t = dict(q=torch.randn(2, 8, 4, 64), k=torch.randn(2, 8, 2, 64))
    t["cos"], t["sin"] = tables(8, 64, "cpu")
    for key, make in changes.items():
        t[key] = make(t)
    with pytest.raises((ValueError, RuntimeError, TypeError)) as err:
        apply_rotary(t["q"], t["k"], t["cos"], t["sin"])
    assert name in str(err.value), str(err.value)


def test_bad_layout_and_inplace_autograd():
    q = torch.randn(1, 2, 1, 8, requires_grad=True)
    cos, sin = tables(2, 8, "cpu")
    with pytest.raises(ValueError, match="layout"):
        apply_rotary(q, q, cos, sin, layout="sbhd")
    with pytest.raises(ValueError, match="inplace"):
        apply_rotary(q, q.detach(), cos, sin, inplace=True)


@pytest.mark.cuda
def test_mismatched_devices_raise():
    q = torch.randn(1, 4, 2, 16, device="cuda")
    k = torch.randn(1, 4, 2, 16)
    cos, sin = tables(4, 16, "cuda")
    with pytest.raises(RuntimeError, match="k"):
        apply_rotary(q, k, cos, sin)
    with pytest.raises(RuntimeError, match="cos"):
        apply_rotary(q, q.clone(), cos.cpu(), sin.cpu())


@pytest.mark.cuda
def test_unaligned_and_odd_strides_cuda():
    # A storage offset of one element breaks 16-byte alignment: the scalar path must take over.
    base = torch.randn(2 * 11 * 3 * 64 + 1, device="cuda", dtype=torch.bfloat16)
    q = base[1:].view(2, 11, 3, 64)
    k = q.clone()
    cos, sin = tables(11, 64, "cuda")
    oq, ok = apply_rotary(q, k, cos, sin)
    assert_close_to_ref(oq, reference(q, cos, sin, False), _torch_rope(q, cos, sin, False), "q")


def test_build_info_lists_rope():
    info = fmcore.build_info()
    assert "rope" in info["ops"]
    assert info["torch_running"].startswith(torch.__version__.split("+")[0])


@pytest.mark.cuda
@pytest.mark.parametrize("q_heads,k_heads", [(2**24, 1), (2**23, 2**23)])
def test_cuda_heads_times_dim_past_int32_raises(q_heads, k_heads):
    # The kernel counts a row's items of q and k together in an int: 2^24 heads of dim 128 (2^31
    # items at the scalar path's one element an item) wrapped that count, and heads went unrotated;
    # so do 2^23 + 2^23, although each tensor alone fits. Expanded q/k (stride 0 over heads) reach
    # the check without allocating 4 GB; nothing is launched.
    q = torch.zeros(1, 1, 1, 128, device="cuda", dtype=torch.bfloat16).expand(1, 1, q_heads, 128)
    k = torch.zeros(1, 1, 1, 128, device="cuda", dtype=torch.bfloat16).expand(1, 1, k_heads, 128)
    cos, sin = torch.ones(1, 64, device="cuda"), torch.zeros(1, 64, device="cuda")
    with pytest.raises(ValueError, match=r"\(q heads \+ k heads\) \* head_dim < 2\^31"):
        torch.ops.fmcore.rope_(q, k, cos, sin, False, False, 1)


@pytest.mark.cuda
@pytest.mark.parametrize("rdim", [12288, 24578])
def test_cuda_long_rotary_dim(rdim):
    # cos/sin are read from global memory, so the rotary dim has no shared-memory limit (the kernel
    # used to stage them in 48 KiB and refused R > 12288). 12288: 16-byte items, 1536 of them a row;
    # 24578: R/2 odd, one element an item, 24578 a row: both more than a block's 512 threads.
    q = torch.randn(1, 2, 1, rdim, device="cuda", dtype=torch.bfloat16)
    cos, sin = tables(2, rdim, "cuda")
    oq, ok = apply_rotary(q, q.clone(), cos, sin)
    want, torch_out = reference(q, cos, sin, False), _torch_rope(q, cos, sin, False)
    assert_close_to_ref(oq, want, torch_out, "q")
    assert_close_to_ref(ok, want, torch_out, "k")


@pytest.mark.parametrize("shape", [(0, 5, 2, 8), (2, 0, 2, 8)], ids=["no_batch", "no_tokens"])
def test_empty_batch_forward_and_backward(device, shape):
    # autograd hands the backward a zero-element gradient whose strides are all 0 (contiguous() is
    # itself): the last-dim check refused it. An expanded empty input was refused the same way.
    cos, sin = tables(5, 8, device)
    q = torch.randn(shape, device=device, requires_grad=True)
    k = torch.randn(shape, device=device, requires_grad=True)
    qr, kr = apply_rotary(q, k, cos, sin)
    (qr.sum() + kr.sum()).backward()
    assert q.grad.shape == shape and k.grad.shape == shape
    empty = torch.zeros((), device=device).expand(shape)
    assert apply_rotary(empty, empty.clone(), cos, sin)[0].shape == shape
