"""fmcore.ops.flash_attention / flash_attention_varlen / scaled_dot_product_attention and
fmcore.nn.Attention against a float64 reference, on CPU always and CUDA when present.

Tolerances follow FlashAttention's convention: fmcore's error against the float64 reference is at
most about twice the error of torch's own same-dtype SDPA (tests/util.py).
"""

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from torch.utils._python_dispatch import TorchDispatchMode

from fmcore._C import attention_tile_configs
from fmcore.ops import (
    attention_tiles,
    flash_attention,
    flash_attention_qkvpacked,
    flash_attention_varlen,
    scaled_dot_product_attention,
)
from fmcore.ops import attention as attn_mod
from tests.util import assert_close_to_ref, assert_compiles_like_eager

DTYPES = [torch.bfloat16, torch.float16]


def visible(Sq, Sk, causal, device, window=(-1, -1)):
    """(Sq, Sk) bool: key j visible to query i (causal aligned to the bottom-right corner; window_size
    (left, right) around query i's key position i + Sk - Sq, -1 for no bound, causal = right 0)."""
    i = torch.arange(Sq, device=device)[:, None]
    j = torch.arange(Sk, device=device)[None, :]
    pos = i + Sk - Sq
    left, right = window
    right = 0 if causal else right
    seen = torch.ones(Sq, Sk, dtype=torch.bool, device=device)
    if right >= 0:
        seen &= j <= pos + right
    if left >= 0:
        seen &= j >= pos - left
    return seen


def reference(q, k, v, causal, scale=None, window=(-1, -1)):
    """float64 out (B, Sq, Hq, D) and lse (B, Hq, Sq); rows that see no key: out 0, lse -inf."""
    q, k, v = q.double(), k.double(), v.double()
    B, Sq, Hq, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(Hq // Hk, dim=2)
    v = v.repeat_interleave(Hq // Hk, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * (D**-0.5 if scale is None else scale)
    s = s.masked_fill(~visible(Sq, Sk, causal, q.device, window), -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse


def torch_sdpa(q, k, v, causal, scale=None, window=(-1, -1)):
    """torch's own SDPA in the inputs' dtype, on (B, S, H, D) tensors with the same mask convention.
    Rows that see no key get a dummy all-visible row whose output is then zeroed (torch gives NaN)."""
    Sq, Sk = q.shape[1], k.shape[1]
    mask = visible(Sq, Sk, causal, q.device, window)
    empty = ~mask.any(-1)
    mask = mask | empty[:, None]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2) * (~empty).to(out.dtype)[None, :, None, None]


def torch_lse(q, k, causal, scale=None, window=(-1, -1)):
    """lse computed by torch in float32 from the same inputs (the lse's "same-dtype" comparison)."""
    Hq, Hk, D = q.shape[2], k.shape[2], q.shape[3]
    kk = k.float().repeat_interleave(Hq // Hk, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), kk) * (D**-0.5 if scale is None else scale)
    seen = visible(q.shape[1], k.shape[1], causal, q.device, window)
    return torch.logsumexp(s.masked_fill(~seen, -math.inf), -1)


def check_lse(lse, ref_lse, torch_l, name="lse"):
    """-inf exactly where the reference is -inf (rows that see no key), close elsewhere."""
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), f"{name}: -inf rows differ"
    fin = torch.isfinite(ref_lse)
    assert_close_to_ref(lse[fin], ref_lse[fin], torch_l[fin], name)


def make_qkv(B, Sq, Sk, Hq, Hk, D, device, dtype, requires_grad=True):
    q = torch.randn(B, Sq, Hq, D, device=device, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(B, Sk, Hk, D, device=device, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(B, Sk, Hk, D, device=device, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


def make_rising_qkv(B, Sq, Sk, Hq, Hk, D, device, dtype):
    """q, k, v whose scores climb along the keys, slowly (about 0.12 log2 units a key: less than the
    forward's lazy-rescale threshold of 8 over a 32- or 64-key step, more over a 128-key one) with a
    jump of ~17 log2 units at key Sk // 2 and a drop of ~29 at 5 Sk // 6: a row's running max then
    stays within the threshold for some steps, then not, and the kernels' both softmax paths (keep
    the offset, or rescale o and follow the max) alternate."""
    q = (0.5 + 0.1 * torch.randn(B, Sq, Hq, D, device=device)).to(dtype)
    j = torch.arange(Sk, device=device, dtype=torch.float32)
    # q . 1 / sqrt(D) is about 0.5 sqrt(D) = 4 at D = 64: c log2 units a unit of c is 5.8 (8.2 at D = 128)
    c = 0.02 * j + 3.0 * (j >= Sk // 2) - 5.0 * (j >= 5 * Sk // 6)
    k = (0.3 * torch.randn(B, Sk, Hk, D, device=device) + c[None, :, None, None] * (64 / D) ** 0.5).to(dtype)
    v = torch.randn(B, Sk, Hk, D, device=device).to(dtype)
    return tuple(t.requires_grad_() for t in (q, k, v))


def check_against_reference(q, k, v, causal, scale=None, grads=True, deterministic=False, tiles=0,
                            window=(-1, -1)):
    out, lse = flash_attention(q, k, v, causal=causal, softmax_scale=scale, deterministic=deterministic,
                               return_lse=True, tiles=tiles, window_size=window)
    ref_out, ref_lse = reference(q, k, v, causal, scale, window)
    t_out = torch_sdpa(q, k, v, causal, scale, window)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == torch.float32
    assert_close_to_ref(out, ref_out, t_out, "out")
    check_lse(lse, ref_lse, torch_lse(q, k, causal, scale, window))
    if not grads:
        return
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref_out, (q, k, v), dout.double())
    theirs = torch.autograd.grad(t_out, (q, k, v), dout)
    for name, g, r, t in zip(("dq", "dk", "dv"), got, want, theirs):
        assert g.dtype == q.dtype
        assert_close_to_ref(g, r, t, name)


# (B, Sq, Sk, Hq, Hk, D), and why each is here. Kept small on the CPU (the reference is exact math).
CPU_SHAPES = [
    (1, 1, 1, 1, 1, 64),  # one token: a single-key softmax
    (3, 17, 17, 8, 8, 64),  # B=3, S=17 (not a multiple of any block), MHA
    (1, 128, 128, 32, 8, 128),  # GQA 32/8, an exact block multiple, D=128
    (2, 423, 423, 12, 1, 96),  # MQA 12/1, awkward S spanning several blocks, D=96
    (1, 17, 423, 8, 8, 128),  # Sq < Sk: causal rows see a prefix plus their own diagonal offset
    (3, 423, 17, 4, 2, 64),  # Sq > Sk: with causal, the first 406 rows see no key (out 0, lse -inf)
    (1, 1, 1000, 4, 1, 64),  # decoding-like: one query against 1000 keys (crosses kBlockN tiles)
]

# The sizes that are too slow for the exact CPU reference: CUDA only.
CUDA_SHAPES = [
    (1, 1000, 1000, 8, 8, 64),
    (3, 4097, 4097, 8, 8, 128),  # one past a power of two: a 1-row tail block
    (1, 4097, 1000, 32, 8, 96),
    (1, 1000, 4097, 12, 1, 128),
    (3, 423, 4097, 32, 8, 64),
    (1, 4097, 17, 12, 1, 64),
]


# float32 on the CPU only: there it takes torch's fused kernel where that computes this op (batched,
# Sq == Sk when causal), the reference otherwise; bf16 always takes the reference there.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(device, shape, causal, dtype):
    if device.type == "cuda" and dtype == torch.float32:
        pytest.skip("fmcore's CUDA kernels take bf16/fp16 (fp32 raises; see test_cuda_rejects_fp32)")
    torch.manual_seed(0)
    check_against_reference(*make_qkv(*shape, device, dtype), causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(2, 33, 70, 6, 2, 64), (1, 70, 33, 4, 4, 96)], ids=lambda s: "x".join(map(str, s)))
def test_other_dtypes(device, shape, dtype):
    if device.type == "cuda" and dtype == torch.float32:
        pytest.skip("fmcore's CUDA kernels take bf16/fp16 (fp32 raises; see test_cuda_rejects_fp32)")
    torch.manual_seed(1)
    check_against_reference(*make_qkv(*shape, device, dtype), causal=True, scale=0.3)


@pytest.mark.parametrize("scale", [-0.3, 0.0], ids=["negative", "zero"])
def test_softmax_scale_sign(device, scale):
    # The CUDA forward takes its running max over raw scores (the scale is folded into the exponent):
    # a negative scale must rank them reversed, a zero one keep masked keys at p = 0 (0 * -inf is NaN).
    torch.manual_seed(3)
    check_against_reference(*make_qkv(2, 300, 423, 4, 2, 128, device, torch.bfloat16), causal=True, scale=scale)


@pytest.mark.parametrize("scale", [-0.3, 0.0], ids=["negative", "zero"])
def test_softmax_scale_sign_fp32_cpu(scale):
    # Causal with Sq == Sk in fp32 (fp64 too) is the case torch's own CPU flash kernel covers, and it
    # gave NaN in every row but the last for these scales: they take fmcore's reference.
    torch.manual_seed(3)
    check_against_reference(*make_qkv(2, 37, 37, 4, 2, 64, "cpu", torch.float32), causal=True, scale=scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("varlen", [False, True], ids=["batched", "varlen"])
def test_nonfinite_hidden_key_stays_out_of_rows_that_cannot_see_it(device, dtype, varlen):
    # The CPU reference once masked by adding -inf: NaN + -inf is NaN, so a NaN (or inf) in the last
    # key reached every causal row's max and made the whole output NaN, where torch (and the kernels)
    # give NaN only to the row that sees it.
    if device.type == "cuda" and dtype == torch.float32:
        pytest.skip("fmcore's CUDA kernels take bf16/fp16")
    torch.manual_seed(4)
    q, k, v = make_qkv(1, 6, 6, 2, 2, 64, device, dtype, requires_grad=False)
    for bad in (math.nan, math.inf):
        k2 = k.clone()
        k2[:, -1] = bad
        if varlen:
            cu = torch.tensor([0, 6], dtype=torch.int32, device=device)
            out = flash_attention_varlen(q[0], k2[0], v[0], cu, cu, 6, 6, causal=True)[None]
        else:
            out = flash_attention(q, k2, v, causal=True)
        assert torch.isfinite(out[:, :5]).all(), bad
        torch.testing.assert_close(out[:, :5].double(), reference(q, k, v, True)[0][:, :5], atol=2e-2, rtol=0)


def test_row_whose_keys_all_score_minus_inf_gives_zero_cpu():
    # Query 0 (causal) sees only key 0, and q0 . k0 = -inf: no probability mass, as a row that sees no
    # key (out 0, lse -inf, no gradient to v; the CUDA kernels' convention); not NaN, not v0. (fp32
    # causal Sq == Sk takes torch's CPU kernel, which gives out 0 too, but lse 0.)
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v = make_qkv(1, 4, 4, 1, 1, 64, "cpu", dtype)
        with torch.no_grad():
            q.abs_().add_(0.1)  # every q . k0 is then -inf, not NaN
            k[0, 0] = -math.inf
        out, lse = flash_attention(q, k, v, causal=True, return_lse=True)
        assert torch.all(out[0, 0] == 0) and torch.isneginf(lse[0, 0, 0]), dtype
        assert torch.isfinite(out[0, 1:]).all(), dtype  # later rows also see finite scores
        out[0, 0].float().sum().backward()
        assert torch.all(v.grad == 0) and torch.all(k.grad[0, 1:] == 0), dtype  # (dq: 0 x -inf)


def test_tensor_scale_is_refused():
    # float() detached a learned temperature: its gradient was dropped with only torch's generic warning.
    q = torch.randn(1, 4, 2, 8)
    scale = torch.tensor(0.3, requires_grad=True)
    with pytest.raises(TypeError, match="expected softmax_scale to be a float, got a Tensor"):
        flash_attention(q, q, q, softmax_scale=scale)
    # A constant 0-d tensor is a float to torch's SDPA (a scale kept in a buffer): the drop-in refused it.
    constant = torch.tensor(0.3, dtype=torch.float64)
    torch.testing.assert_close(scaled_dot_product_attention(q, q, q, scale=constant),
                               F.scaled_dot_product_attention(q, q, q, scale=constant))
    with pytest.raises(TypeError, match=r"expected scale to be a float .* requires_grad=True"):
        scaled_dot_product_attention(q, q, q, scale=scale)


# The CUDA backward's two dq paths: atomic adds from the dk/dv kernel (the default) and the separate
# deterministic dq kernel.
DQ_PATHS = pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])


@pytest.mark.cuda
@DQ_PATHS
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_large_cuda(shape, causal, dtype, deterministic):
    torch.manual_seed(2)
    check_against_reference(*make_qkv(*shape, "cuda", dtype), causal, deterministic=deterministic)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_rising_scores(device, causal):
    # The forward's lazy rescale (attention_softmax.cuh): steps that keep a row's stale max and steps
    # that must rescale, in one sequence (make_rising_qkv), at both 16-bit dtypes.
    torch.manual_seed(18)
    for dtype in DTYPES:
        check_against_reference(*make_rising_qkv(1, 300, 600, 4, 2, 64, device, dtype), causal)


def test_rows_without_keys_give_zero_and_neg_inf(device):
    q, k, v = make_qkv(2, 9, 4, 2, 1, 64, device, torch.bfloat16)
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True)
    # Sq - Sk = 5: queries 0..4 see no key under the bottom-right mask.
    assert torch.all(out[:, :5] == 0) and torch.all(torch.isneginf(lse[:, :, :5]))
    assert torch.isfinite(lse[:, :, 5:]).all()
    out.float().sum().backward()
    assert torch.all(q.grad[:, :5] == 0)


@pytest.mark.parametrize("Sq,Sk,Hq", [(0, 5, 2), (5, 0, 2), (0, 0, 2), (5, 5, 0)])
def test_empty_sequences(device, Sq, Sk, Hq):
    # No queries: empty out, zero dk/dv. No keys: out 0 and lse -inf everywhere, zero dq. No query
    # heads (Hq = 0 with Hk = 1 passes the divisibility check): dk/dv are non-empty and must be zeros
    # (the CUDA dispatcher once returned before any launch, leaving them unwritten).
    q, k, v = make_qkv(2, Sq, Sk, Hq, 1, 64, device, torch.bfloat16)
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True)
    assert out.shape == q.shape and lse.shape == (2, Hq, Sq)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    for g in torch.autograd.grad(out.float().sum(), (q, k, v)):
        assert torch.all(g == 0)


@pytest.mark.parametrize("case", ["full", "causal_sq_lt_sk", "causal_gqa", "causal_gqa_out_only"])
def test_gradcheck_fp64_cpu(case):
    # Gradients of out and lse together (lse's gradient enters the backward as delta -= dlse), and of
    # out alone: a backward without dlse on a batched causal Sq == Sk call runs torch's fused kernel.
    torch.manual_seed(3)
    shape, causal = {"full": ((2, 5, 7, 2, 2, 8), False), "causal_sq_lt_sk": ((1, 4, 9, 2, 1, 16), True),
                     "causal_gqa": ((2, 6, 6, 4, 2, 8), True), "causal_gqa_out_only": ((2, 6, 6, 4, 2, 8), True)}[case]
    q, k, v = make_qkv(*shape, "cpu", torch.float64)

    def fn(q, k, v):
        out, lse = flash_attention(q, k, v, causal=causal, softmax_scale=0.7, return_lse=True)
        return out if case.endswith("out_only") else (out, lse)

    assert flash_attention(q, k, v, causal=causal, return_lse=True)[1].dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_gradcheck_fp64_cpu_empty_rows():
    q, k, v = make_qkv(1, 7, 3, 2, 1, 8, "cpu", torch.float64)
    assert torch.autograd.gradcheck(lambda q, k, v: flash_attention(q, k, v, causal=True), (q, k, v))


def test_strided_qkv_from_fused_projection(device):
    # q, k, v sliced out of one (B, S, Hq + 2 Hk, D) tensor: strided views, used without a copy.
    B, S, Hq, Hk, D = 2, 45, 6, 2, 64
    qkv = torch.randn(B, S, Hq + 2 * Hk, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    q, k, v = qkv.split([Hq, Hk, Hk], dim=2)
    assert not q.is_contiguous()
    check_against_reference(q, k, v, causal=True)
    out = flash_attention(q, k, v, causal=True)
    dense = flash_attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    assert torch.equal(out, dense)


@pytest.mark.parametrize("pad", [8, 3, 4], ids=["rows_pad8_in_place", "rows_pad3_copied", "heads_pad4_copied"])
def test_strides_the_kernels_cannot_read_in_place(device, pad):
    # q, k, v and dout as views of padded buffers. pad 8: every stride a multiple of 8 elements (the
    # 16-byte cp.async chunks stay aligned; used in place). pad 3 on the row stride, or 4 on the head
    # stride: a 16-byte chunk would straddle an alignment boundary, so the CUDA binding must copy.
    # Either way the results equal those of dense inputs bitwise.
    B, S, Hq, Hk, D = 2, 37, 4, 2, 64

    def padded(H):
        if pad == 4:  # (B, S, H, D + 4)[..., :D]: head stride D + 4
            return torch.randn(B, S, H, D + pad, device=device, dtype=torch.bfloat16)[..., :D]
        return torch.randn(B, S, H * D + pad, device=device, dtype=torch.bfloat16)[..., :H * D].view(B, S, H, D)

    q, k, v, dout = padded(Hq), padded(Hk), padded(Hk), padded(Hq)
    assert not q.is_contiguous() and q.stride(-1) == 1
    dense = [t.contiguous() for t in (q, k, v, dout)]
    outs = []
    for qq, kk, vv, do in ((q, k, v, dout), dense):
        qq, kk, vv = (t.detach().requires_grad_() for t in (qq, kk, vv))
        out = flash_attention(qq, kk, vv, causal=True)
        outs.append((out, *torch.autograd.grad(out, (qq, kk, vv), do)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *outs):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("shape,causal", [((2, 37, 50, 4, 2, 64), True), ((1, 70, 70, 2, 1, 128), False)],
                         ids=["causal_gqa", "full_mqa"])
def test_lse_gradient_matches_reference(device, shape, causal):
    # Gradients through lse as well as out: the backward subtracts dlse from delta (the delta kernel on
    # CUDA); the fp64 gradcheck covers only the CPU. Sq <= Sk so every row sees a key (a -inf lse has
    # no finite gradient in the reference's logsumexp).
    torch.manual_seed(8)
    q, k, v = make_qkv(*shape, device, torch.bfloat16)
    out, lse = flash_attention(q, k, v, causal=causal, return_lse=True)
    ref_out, ref_lse = reference(q, k, v, causal)
    t_out, t_lse = torch_sdpa(q, k, v, causal), torch_lse(q, k, causal)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))
    want = torch.autograd.grad((ref_out, ref_lse), (q, k, v), (dout.double(), dlse.double()))
    theirs = torch.autograd.grad((t_out, t_lse), (q, k, v), (dout, dlse))
    for name, g, r, t in zip(("dq", "dk", "dv"), got, want, theirs):
        assert_close_to_ref(g, r, t, name)


@pytest.mark.cuda
@pytest.mark.bigmem
def test_offsets_past_2_31_elements_cuda():
    # B*S*H*D > 2^31 elements (4.3 GB per bf16 tensor, ~35 GB in all): every global offset of the
    # last sequences passes 2^31 elements and 2^32 bytes. Each sequence holds different values, so
    # a 32-bit offset anywhere (a wrapped read, or a write landing in another sequence's rows) makes
    # the last sequences differ from the same sequences computed alone.
    B, S, H, D = 16400, 256, 4, 128
    assert (B - 8) * S * H * D > 2**31
    if torch.cuda.get_device_properties(0).total_memory < 60 * 2**30:
        pytest.skip("needs ~40 GB of GPU memory")
    torch.manual_seed(9)
    q, k, v, dout = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    scale = D**-0.5
    out, lse = torch.ops.fmcore.flash_attn_fwd(q, k, v, None, None, 0, 0, True, scale)
    tail = slice(B - 8, B)  # sequences wholly past element 2^31
    small = [t[tail].clone() for t in (q, k, v, dout)]
    out_s, lse_s = torch.ops.fmcore.flash_attn_fwd(*small[:3], None, None, 0, 0, True, scale)
    assert torch.equal(out[tail], out_s) and torch.equal(lse[tail], lse_s)
    for deterministic in (True, False):
        args = (None, None, 0, 0, True, scale, deterministic)
        grads = torch.ops.fmcore.flash_attn_bwd(dout, q, k, v, out, lse, None, *args)
        grads_s = torch.ops.fmcore.flash_attn_bwd(small[3], *small[:3], out_s, lse_s, None, *args)
        for name, g, gs in zip(("dq", "dk", "dv"), grads, grads_s):
            if name == "dq" and not deterministic:  # atomic adds: the order of the additions varies
                torch.testing.assert_close(g[tail], gs, rtol=2e-2, atol=2e-3, msg=f"atomic {name}")
            else:
                assert torch.equal(g[tail], gs), name
        del grads, grads_s


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("tiles", [0, 3, 4])  # 3 and 4: dk/dv on wgmma (Hopper), then the dq kernel
def test_deterministic_bitwise(device, causal, tiles):
    q, k, v = make_qkv(2, 300, 300, 8, 2, 64, device, torch.bfloat16)
    dout = torch.randn(q.shape, device=device, dtype=q.dtype)
    runs = []
    for _ in range(2):
        out = flash_attention(q, k, v, causal=causal, deterministic=True, tiles=tiles)
        runs.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.cuda
@DQ_PATHS
@pytest.mark.parametrize("tiles", range(attention_tile_configs))
@pytest.mark.parametrize("D", [64, 128])  # D=96 tiles like D=128
def test_causal_every_diagonal_offset_cuda(D, tiles, deterministic):
    # The kernels mask only the tiles that straddle the diagonal; whether a tile does depends on
    # Sk - Sq modulo the block sizes (up to 128 keys or queries per CTA or step). Every offset in
    # [-129, 129] covers all residues mod 128 at Sq = 258 (a third, partial query block of 128):
    # an off-by-one in any kernel's "needs the mask" test attends to a key one past the diagonal.
    torch.manual_seed(10)
    check_causal_offsets("cuda", 258, range(-129, 130), 2, D, deterministic, tiles)


def check_causal_offsets(device, Sq, offsets, Hq, D, deterministic, tiles=0):
    """check_against_reference, causal, for each Sk - Sq in offsets (Hk = 1), naming a failing offset."""
    for d in offsets:
        q, k, v = make_qkv(1, Sq, Sq + d, Hq, 1, D, device, torch.bfloat16)
        try:
            check_against_reference(q, k, v, causal=True, deterministic=deterministic, tiles=tiles)
        except AssertionError as e:
            raise AssertionError(f"Sk - Sq = {d}: {e}") from e


@pytest.mark.cuda
@DQ_PATHS
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 96, 128])
@pytest.mark.parametrize("tiles", range(1, attention_tile_configs))
def test_tile_configs_match_reference_cuda(tiles, D, causal, deterministic):
    # The alternatives the benchmark times beside the default (every other test runs tiles=0): GQA
    # with Sq > Sk and Sq < Sk, partial blocks of every tile size, scores that rise and jump (the
    # forward's lazy rescale), gradients written into a packed qkv's strided views, and varlen
    # documents.
    torch.manual_seed(14)
    for shape in [(2, 301, 333, 8, 2, D), (1, 150, 90, 3, 1, D)]:
        check_against_reference(*make_qkv(*shape, "cuda", torch.bfloat16), causal, deterministic=deterministic,
                                tiles=tiles)
    check_against_reference(*make_rising_qkv(1, 300, 600, 4, 2, D, "cuda", torch.bfloat16), causal,
                            deterministic=deterministic, tiles=tiles)
    if not deterministic:  # check_qkvpacked runs both backward paths
        check_qkvpacked("cuda", True, causal, tiles=tiles, D=D)
    check_varlen("cuda", causal, False, 4, 2, D, torch.bfloat16, deterministic, tiles=tiles)


def test_tiles_out_of_range_raises(device):
    q = torch.randn(1, 8, 2, 64, device=device, dtype=torch.bfloat16)
    for tiles in (-1, attention_tile_configs):
        with pytest.raises(ValueError, match=f"expected tiles in \\[0, {attention_tile_configs - 1}\\], got {tiles}"):
            flash_attention(q, q, q, tiles=tiles)


class _TilesSeen(TorchDispatchMode):
    """Records the tiles argument of every flash_attn_fwd call (trailing defaults arrive omitted)."""

    def __init__(self):
        super().__init__()
        self.tiles = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.fmcore.flash_attn_fwd.default:
            i = [a.name for a in func._schema.arguments].index("tiles")
            self.tiles.append(args[i] if len(args) > i else (kwargs or {}).get("tiles", 0))
        return func(*args, **(kwargs or {}))


def test_attention_tiles_context(device):
    # attention_tiles sets what tiles=0 runs, for calls inside the block (a model's layers), batched and
    # varlen; an explicit tiles wins; the previous value comes back on exit, also after an exception.
    q = torch.randn(1, 8, 2, 64, device=device, dtype=torch.bfloat16)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
    with _TilesSeen() as seen:
        with attention_tiles(3):
            out3 = flash_attention(q, q, q, causal=True)
            flash_attention_varlen(q[0], q[0], q[0], cu, cu, 5, 5)
            flash_attention(q, q, q, tiles=1)
            with pytest.raises(RuntimeError, match="inner"), attention_tiles(4):
                raise RuntimeError("inner")
            flash_attention(q, q, q)
        flash_attention(q, q, q)
    assert seen.tiles == [3, 3, 1, 3, 0]
    torch.testing.assert_close(out3, flash_attention(q, q, q, causal=True, tiles=3), rtol=0, atol=0)
    for bad in (attention_tile_configs, -1, True, 1.0):
        with pytest.raises(ValueError, match=f"expected tiles in \\[0, {attention_tile_configs - 1}\\], got {bad!r}"):
            with attention_tiles(bad):
                pass


def test_tiles_argument_is_an_int(device):
    # int(tiles) read 2.5 as tiles 2, True as 1 and "3" as 3, silently (attention_tiles refuses them).
    q = torch.randn(1, 8, 2, 64, device=device, dtype=torch.bfloat16)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
    calls = [lambda t: flash_attention(q, q, q, tiles=t),
             lambda t: flash_attention_varlen(q[0], q[0], q[0], cu, cu, 5, 5, tiles=t),
             lambda t: flash_attention_qkvpacked(torch.stack([q, q, q], 2), tiles=t)]
    for bad in (2.5, True, "3"):
        message = f"expected tiles in \\[0, {attention_tile_configs - 1}\\], got {bad!r}"
        for call in calls:
            with pytest.raises(ValueError, match=message):
                call(bad)


def test_attention_tiles_context_per_thread():
    # Each block restored the value it found on entry: with two threads' blocks overlapping (A enters,
    # B enters, A exits, B exits), B restored the value A had set, and tiles 1 stayed the default for
    # every later call. (The setting is process-wide, as sdpa_kernel's: B's call before its own block
    # runs A's tiles.)
    import threading

    q = torch.randn(1, 4, 1, 64)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    b_seen = []

    def a():
        with attention_tiles(1):
            a_in.set()
            b_in.wait(60)  # (timeouts: a failing thread must not hang the test)
        a_out.set()

    def b():
        a_in.wait(60)
        with _TilesSeen() as seen:
            flash_attention(q, q, q)  # in A's block
            with attention_tiles(2):
                flash_attention(q, q, q)
                b_in.set()
                a_out.wait(60)
        b_seen.extend(seen.tiles)

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with _TilesSeen() as seen:
        flash_attention(q, q, q)
    assert b_seen == [1, 2] and seen.tiles == [0]


def test_attention_tiles_context_under_compile():
    # Read when traced, and guarded: entering a block recompiles rather than running the traced value.
    traced = []
    at = [a.name for a in torch.ops.fmcore.flash_attn_fwd.default._schema.arguments].index("tiles")

    def backend(gm, example_inputs):
        traced.extend(n.args[at] for n in gm.graph.nodes if n.target in (torch.ops.fmcore.flash_attn_fwd,
                                                                     torch.ops.fmcore.flash_attn_fwd.default))
        return gm

    q = torch.randn(1, 4, 1, 64)
    f = torch.compile(lambda q: flash_attention(q, q, q), backend=backend, fullgraph=True)
    f(q)
    with attention_tiles(2):
        f(q)
    f(q)
    assert traced == [0, 2]


@pytest.mark.cuda
@DQ_PATHS
def test_cuda_graph_capture_cuda(deterministic):
    # Forward and backward captured into a CUDA graph and replayed on new inputs equal eager runs
    # bitwise (dq of the atomic path: closely; its zeroed fp32 buffer is allocated inside the
    # capture). The launchers opt the kernels in to > 48 KiB of dynamic shared memory once per
    # device (a function attribute, not a stream operation): capture must neither break on it nor
    # need it.
    q, k, v = make_qkv(2, 200, 200, 4, 2, 128, "cuda", torch.bfloat16)
    dout = torch.randn_like(q)

    def step():
        out = flash_attention(q, k, v, causal=True, deterministic=deterministic)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up on a side stream, as torch.cuda.graph asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for seed in (1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            for t in (q, k, v, dout):
                t.copy_(torch.randn_like(t))
        graph.replay()
        for name, a, b in zip(("out", "dq", "dk", "dv"), captured, step()):
            if name == "dq" and not deterministic:
                torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3, msg=name)
            else:
                assert torch.equal(a, b), name


def check_dq_paths_agree(q, k, v, causal):
    """dk and dv come from the same kernel code on both dq paths (the atomic path only adds work
    after them), so they are bitwise equal; dq differs only in the order of its fp32 additions."""
    dout = torch.randn_like(q)
    grads = {}
    for det in (False, True):
        out = flash_attention(q, k, v, causal=causal, deterministic=det)
        grads[det] = torch.autograd.grad(out, (q, k, v), dout)
    torch.testing.assert_close(grads[False][0], grads[True][0], rtol=2e-2, atol=2e-3)
    assert torch.equal(grads[False][1], grads[True][1]) and torch.equal(grads[False][2], grads[True][2])


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_atomic_dq_path_agrees_with_deterministic_cuda(causal):
    torch.manual_seed(12)
    check_dq_paths_agree(*make_qkv(2, 333, 301, 8, 2, 128, "cuda", torch.bfloat16), causal)


def _backward_kernels(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if "attn_bwd" in e.name}


@pytest.mark.cuda
def test_deterministic_flag_and_strict_mode_select_the_dq_kernel_cuda():
    # deterministic=True, or torch.use_deterministic_algorithms(True) in strict mode, runs the
    # separate dq kernel; the default (and warn_only mode, which the test suite runs under) runs the
    # atomic path's convert kernel instead.
    q, k, v = make_qkv(1, 100, 100, 2, 1, 64, "cuda", torch.bfloat16)

    def backward(**kw):
        return lambda: flash_attention(q, k, v, causal=True, **kw).sum().backward()

    def uses_dq_kernel(names):
        assert any("attn_bwd_dkdv_kernel" in n for n in names), names
        dq = any("attn_bwd_dq_kernel" in n for n in names)
        assert dq != any("attn_bwd_dq_convert_kernel" in n for n in names), names
        return dq

    assert not uses_dq_kernel(_backward_kernels(backward()))
    assert uses_dq_kernel(_backward_kernels(backward(deterministic=True)))
    old = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        torch.use_deterministic_algorithms(True)
        assert uses_dq_kernel(_backward_kernels(backward()))
        # The op itself, asked for atomics in strict mode, raises as torch's nondeterministic ops do...
        out, lse = torch.ops.fmcore.flash_attn_fwd(q, k, v, None, None, 0, 0, True, 0.125)
        args = (torch.ones_like(out), q, k, v, out, lse, None, None, None, 0, 0, True, 0.125)
        with pytest.raises(RuntimeError, match="flash_attn_bwd with deterministic=False"):
            torch.ops.fmcore.flash_attn_bwd(*args, False)
        # ...and warns in warn_only mode.
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="flash_attn_bwd with deterministic=False"):
            torch.ops.fmcore.flash_attn_bwd(*args, False)
    finally:
        torch.use_deterministic_algorithms(old[0], warn_only=old[1])


@pytest.mark.cuda
def test_second_device_cuda():
    # The shared-memory opt-in is a per-device attribute of each kernel: after the kernels ran on
    # cuda:0, the same kernels on cuda:1 must still be opted in there (a launch would fail otherwise).
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    for dev in ("cuda:0", "cuda:1"):
        torch.manual_seed(11)
        check_against_reference(*make_qkv(1, 150, 150, 2, 1, 128, dev, torch.bfloat16), causal=True)


@pytest.mark.cuda
def test_cuda_rejects_more_than_65535_kv_heads():
    # Hq = 0 passes the divisibility check with any Hk, and the dk/dv kernel's grid has Hk in its y
    # dim (at most 65535). Before the binding checked Hk the forward passed and the backward failed
    # its launch with an opaque "invalid configuration argument".
    q = torch.empty(1, 4, 0, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.zeros(1, 4, 65536, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="65535 heads"):
        flash_attention(q, k, k)


# ---- varlen


def varlen_reference(q, k, v, cu_q, cu_k, causal, window=(-1, -1)):
    """Per-document float64 reference on packed (T, H, D) tensors; lse (H, Tq)."""
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        o, lse = reference(q[None, qs], k[None, ks], v[None, ks], causal, window=window)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def varlen_torch(q, k, v, cu_q, cu_k, causal, window=(-1, -1)):
    outs = []
    for b in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if cu_q[b + 1] == cu_q[b]:
            continue
        if cu_k[b + 1] == cu_k[b]:
            outs.append(torch.zeros_like(q[qs]))
            continue
        outs.append(torch_sdpa(q[None, qs], k[None, ks], v[None, ks], causal, window=window)[0])
    return torch.cat(outs)


def cu(lengths, device):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)


def check_varlen(device, causal, same_lengths, Hq=6, Hk=2, D=64, dtype=torch.bfloat16, deterministic=False,
                 tiles=0, window=(-1, -1)):
    g = torch.Generator().manual_seed(4)
    # Random document lengths with length-1 documents, one longer than a block, and (cross) a
    # document with no keys and one with no queries.
    lq = [1, 1] + torch.randint(2, 90, (5,), generator=g).tolist() + [150]
    lk = lq if same_lengths else [3, 0] + torch.randint(1, 90, (5,), generator=g).tolist() + [97]
    if not same_lengths:
        lq[3] = 0
    cq, ck = cu(lq, device), cu(lk, device)
    q = torch.randn(sum(lq), Hq, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(sum(lk), Hk, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lk), Hk, D, device=device, dtype=dtype, requires_grad=True)
    out, lse = flash_attention_varlen(q, k, v, cq, ck, max(lq), max(lk), causal=causal, return_lse=True,
                                      deterministic=deterministic, tiles=tiles, window_size=window)
    assert lse.shape == (Hq, sum(lq))
    cql, ckl = cq.tolist(), ck.tolist()
    ref_out, ref_lse = varlen_reference(q, k, v, cql, ckl, causal, window)
    t_out = varlen_torch(q, k, v, cql, ckl, causal, window)
    assert_close_to_ref(out, ref_out, t_out, "out")
    t_l = torch.cat([torch_lse(q[None, cql[b]:cql[b + 1]], k[None, ckl[b]:ckl[b + 1]], causal, window=window)[0]
                     for b in range(len(lq))], dim=1)
    check_lse(lse, ref_lse, t_l)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref_out, (q, k, v), dout.double())
    theirs = torch.autograd.grad(t_out, (q, k, v), dout)
    for name, a, r, t in zip(("dq", "dk", "dv"), got, want, theirs):
        assert_close_to_ref(a, r, t, name)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("same_lengths", [True, False], ids=["self", "cross"])
def test_varlen_matches_reference(device, causal, same_lengths):
    check_varlen(device, causal, same_lengths)


@pytest.mark.cuda
def test_varlen_graph_capture_without_warmup_cuda():
    # The eager cu_seqlens value check copies to the host, which capture forbids: a cu_seqlens never
    # seen before (no warm-up call with it) is captured unchecked, and replays match eager runs.
    torch.manual_seed(13)
    c = cu([5, 60, 1, 34], "cuda")
    q, k, v = (torch.randn(100, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warms up the kernels (not this cu_seqlens) on a side stream
        flash_attention(q[None], k[None], v[None], causal=True)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        captured = flash_attention_varlen(q, k, v, c, c.clone(), 60, 60, causal=True)
    graph.replay()
    assert torch.equal(captured, flash_attention_varlen(q, k, v, c, c, 60, 60, causal=True))


@pytest.mark.cuda
@DQ_PATHS
@pytest.mark.parametrize("Hq,Hk,D,dtype", [(12, 1, 96, torch.bfloat16), (8, 8, 128, torch.float16),
                                           (4, 2, 64, torch.float16)], ids=str)
def test_varlen_head_dims_dtypes_cuda(Hq, Hk, D, dtype, deterministic):
    # The varlen row offsets and lse layout at every head dim's tile shape, MQA, and fp16 (the CPU
    # variant above covers bf16 D=64 GQA only), on both dq paths.
    check_varlen("cuda", True, False, Hq, Hk, D, dtype, deterministic)


def test_varlen_generous_max_seqlen(device):
    # max_seqlen only bounds the longest document; one far above the packed total (2^40) must give
    # the same result. Before the binding clamped it to the total, the CUDA grid dim overflowed its
    # unsigned int (a 0-block grid: nothing written) and the CPU reference looped over 2^34 blocks.
    lens = [1, 40, 7]
    c = cu(lens, device)
    q, k, v = (torch.randn(sum(lens), 2, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    runs = []
    for max_seqlen in (max(lens), 2**40):
        out, lse = flash_attention_varlen(q, k, v, c, c, max_seqlen, max_seqlen, causal=True, return_lse=True)
        runs.append((out, lse, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *runs):
        assert torch.equal(a, b), name


def test_varlen_equals_batched_on_equal_lengths(device):
    B, S, H, D = 3, 40, 4, 64
    q, k, v = make_qkv(B, S, S, H, H, D, device, torch.bfloat16, requires_grad=False)
    c = cu([S] * B, device)
    packed = flash_attention_varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), c, c, S, S, causal=True)
    assert torch.equal(packed.view(B, S, H, D), flash_attention(q, k, v, causal=True))


def test_varlen_gradcheck_fp64_cpu():
    lq, lk = [1, 3, 4], [2, 3, 5]
    q = torch.randn(sum(lq), 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sum(lk), 1, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(lk), 1, 8, dtype=torch.float64, requires_grad=True)
    cq, ck = cu(lq, "cpu"), cu(lk, "cpu")
    fn = lambda q, k, v: flash_attention_varlen(q, k, v, cq, ck, 4, 5, causal=True, return_lse=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


# ---- sliding window (window_size)

# (window, causal, why). Windows are (left, right) around each query's bottom-right-aligned key position.
WINDOWS = [
    ((0, 0), False, "each query sees only its own key position"),
    ((3, -1), False, "a left bound alone"),
    ((-1, 5), False, "a right bound alone, past the diagonal"),
    ((17, 0), True, "causal with a left bound"),
    ((5, 2), False, "both bounds"),
    ((1000, 1000), False, "wider than the keys: the full result"),
]
# (B, Sq, Sk, Hq, Hk, D): Sq == Sk with GQA; Sq < Sk; Sq > Sk (rows before Sq - Sk see no key position
# in range: with a small window, no key at all) with MQA; 70 and 37 are not block multiples.
WINDOW_SHAPES = [(2, 70, 70, 4, 2, 64), (1, 37, 100, 2, 1, 32), (1, 100, 37, 3, 1, 16)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", WINDOW_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("window,causal,why", WINDOWS, ids=[f"{w}{'-causal' if c else ''}" for w, c, _ in WINDOWS])
def test_window_matches_masked_reference(device, window, causal, why, shape, dtype):
    if device.type == "cuda" and dtype == torch.float32:
        pytest.skip("fmcore's CUDA kernels take bf16/fp16")
    if device.type == "cuda":
        shape = shape[:5] + (64,)  # a head dim the kernels take
    torch.manual_seed(30)
    check_against_reference(*make_qkv(*shape, device, dtype), causal, window=window)


def test_window_float16_and_float64_gradcheck(device):
    torch.manual_seed(31)
    check_against_reference(*make_qkv(1, 45, 45, 2, 1, 64, device, torch.float16), False, scale=0.3,
                            window=(7, 3))
    if device.type == "cpu":
        q, k, v = (t.double() for t in make_qkv(1, 9, 11, 2, 1, 8, "cpu", torch.float64))
        for window, causal in (((2, 1), False), ((3, -1), True), ((0, 0), False)):
            fn = lambda q, k, v: flash_attention(q, k, v, causal=causal, window_size=window, return_lse=True)  # noqa: E731
            assert torch.autograd.gradcheck(fn, (q, k, v)), window


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
def test_window_skipping_key_blocks_of_a_long_sequence(device, deterministic):
    # A window of 64 keys in 700: most key blocks of every query block are outside it (the kernels
    # and the CPU reference skip them), and the blocks at the window's start are cut by it.
    torch.manual_seed(32)
    check_against_reference(*make_qkv(1, 700, 700, 2, 1, 64, device, torch.bfloat16), True, window=(64, 0),
                            deterministic=deterministic)


@pytest.mark.parametrize("window,causal", [((0, 0), False), ((3, -1), True), ((-1, 5), False), ((17, 0), True)])
def test_window_varlen(device, window, causal):
    # Documents of lengths 1, 150 and in between (cross: one without keys, one without queries),
    # each windowed from its own bottom-right corner.
    check_varlen(device, causal, False, Hq=2, Hk=1, window=window)
    if window == (3, -1):
        check_varlen(device, causal, True, Hq=2, Hk=1, window=window)


def test_window_without_bounds_is_the_unwindowed_call(device):
    # (-1, -1) is no window, and (-1, 0) is causal=True: the same path, bitwise.
    dtype = torch.bfloat16
    q, k, v = make_qkv(2, 37, 37, 2, 1, 64, device, dtype)
    for causal in (False, True):
        a, la = flash_attention(q, k, v, causal=causal, window_size=(-1, -1), return_lse=True)
        b, lb = flash_attention(q, k, v, causal=causal, return_lse=True)
        assert torch.equal(a, b) and torch.equal(la, lb)
    a, la = flash_attention(q, k, v, window_size=(-1, 0), return_lse=True)
    b, lb = flash_attention(q, k, v, causal=True, return_lse=True)
    assert torch.equal(a, b) and torch.equal(la, lb)
    g_a = torch.autograd.grad(a.float().sum(), (q, k, v))
    g_b = torch.autograd.grad(b.float().sum(), (q, k, v))
    assert all(torch.equal(x, y) for x, y in zip(g_a, g_b))


def test_window_rows_without_keys_give_zero_and_neg_inf(device):
    # Sq > Sk with window (0, 0): query i sees key i - 3 only, so queries 0..2 see none: out 0, lse -inf,
    # and no gradient reaches them or from them.
    dtype = torch.bfloat16
    q, k, v = make_qkv(1, 8, 5, 2, 1, 64, device, dtype)
    out, lse = flash_attention(q, k, v, window_size=(0, 0), return_lse=True)
    assert torch.all(out[0, :3] == 0) and torch.isneginf(lse[0, :, :3]).all()
    torch.testing.assert_close(out[0, 3:].float(), v[0].float().expand(-1, 2, -1), rtol=0, atol=0)
    dq, dk, dv = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert torch.all(dq == 0)  # one key a row: P = 1 whatever the score, so no gradient to q and k
    assert torch.all(dk == 0) and torch.all(dv == 2)


@pytest.mark.cuda
@DQ_PATHS
@pytest.mark.parametrize("tiles", [0, 3])  # 3: a windowed call runs configuration 0's windowed kernels
@pytest.mark.parametrize("window,causal", [((256, 0), True), ((100, 37), False), ((0, 0), False)], ids=str)
@pytest.mark.parametrize("shape", [(2, 2049, 2049, 8, 2, 128), (1, 1000, 3001, 4, 4, 64), (1, 3001, 1000, 12, 1, 96)],
                         ids=lambda s: "x".join(map(str, s)))
def test_window_large_cuda(shape, window, causal, tiles, deterministic):
    # Long sequences under short windows: most key blocks of every CTA skipped, forward and backward.
    torch.manual_seed(34)
    check_against_reference(*make_qkv(*shape, "cuda", torch.bfloat16), causal, deterministic=deterministic,
                            tiles=tiles, window=window)


BAD_WINDOWS = [
    (dict(window_size=(-2, 0)), "window_size"),
    (dict(window_size=(0, -5)), "window_size"),
    (dict(window_size=(3,)), "window_size"),
    (dict(window_size=3), "window_size"),
    (dict(window_size=(1.0, 2)), "window_size"),
    (dict(window_size=(4, 1), causal=True), "window_size"),
]


@pytest.mark.parametrize("kwargs,words", BAD_WINDOWS, ids=[str(b[0]) for b in BAD_WINDOWS])
def test_bad_window_size_raises(kwargs, words):
    q, k, v = (t.detach() for t in make_qkv(1, 5, 5, 2, 1, 64, "cpu", torch.float32))
    c = cu([2, 3], "cpu")
    calls = (lambda: flash_attention(q, k, v, **kwargs),
             lambda: flash_attention_varlen(q[0], k[0], v[0], c, c, 3, 3, **kwargs),
             lambda: flash_attention_qkvpacked(torch.stack((q, q, q), 2), **kwargs))
    for call in calls:
        with pytest.raises(ValueError, match=words):
            call()
    # The op itself checks the values too (its arguments are window_left and window_right).
    causal = kwargs.get("causal", False)
    w = kwargs["window_size"]
    if isinstance(w, tuple) and len(w) == 2 and all(isinstance(x, int) for x in w):
        with pytest.raises((ValueError, RuntimeError), match="window_size"):
            torch.ops.fmcore.flash_attn_fwd(q, k, v, None, None, 0, 0, causal, 0.125, False, 0, *w)


def test_minus_inf_key_gets_exactly_zero_weight_cpu():
    # A key holding -inf scores -inf against a positive query: torch's float64 math gives it P = 0
    # exactly, and so its dk, dv are exactly 0. The CPU reference clamped exponents at -80 and gave it
    # e^-80 = 1.8e-35 (dv = 1.8e-35 * dout). bf16 and windowed fp32 take the reference.
    torch.manual_seed(33)
    for dtype, window in ((torch.bfloat16, (-1, -1)), (torch.float32, (4, 4))):
        q = (torch.rand(1, 9, 2, 16) + 0.1).to(dtype).requires_grad_()
        k, v = (torch.randn(1, 9, 1, 16, dtype=dtype, requires_grad=True) for _ in range(2))
        with torch.no_grad():
            k[0, 2] = -math.inf
        out = flash_attention(q, k, v, window_size=window)
        dk, dv = torch.autograd.grad(out.float().sum(), (k, v))
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref, _ = reference(q64, k64, v64, False, window=window)
        rdk, rdv = torch.autograd.grad(ref.sum(), (k64, v64))
        assert rdv[0, 2].eq(0).all() and rdk[0, 2].nan_to_num(0).eq(0).all()  # (dk: 0 * -inf is NaN in q.k's grad)
        assert dv[0, 2].eq(0).all(), (dtype, dv[0, 2])
        assert dk[0, 2].nan_to_num(0).eq(0).all(), (dtype, dk[0, 2])
        assert torch.isfinite(dv).all()


# ---- bad inputs


def _good():
    q = torch.randn(2, 8, 4, 64)
    return dict(q=q, k=torch.randn(2, 8, 2, 64), v=torch.randn(2, 8, 2, 64))


BAD = [
    # (what is wrong, changes, the words the error must contain)
    ("k dtype", dict(k=lambda t: t["k"].half()), "k"),
    ("v dtype", dict(v=lambda t: t["v"].double()), "v"),
    ("batch mismatch", dict(k=lambda t: torch.randn(3, 8, 2, 64), v=lambda t: torch.randn(3, 8, 2, 64)), "k"),
    ("Hk not dividing Hq", dict(k=lambda t: torch.randn(2, 8, 3, 64), v=lambda t: torch.randn(2, 8, 3, 64)), "heads of k"),
    ("head dim mismatch", dict(k=lambda t: torch.randn(2, 8, 2, 32), v=lambda t: torch.randn(2, 8, 2, 32)), "head dim"),
    ("v shape differs from k", dict(v=lambda t: torch.randn(2, 9, 2, 64)), "v"),
    ("3-d q", dict(q=lambda t: torch.randn(8, 4, 64)), "q"),
    ("integer q", dict(q=lambda t: torch.randint(0, 3, (2, 8, 4, 64))), "q"),
    ("non-contiguous head dim", dict(q=lambda t: torch.randn(2, 8, 4, 128)[..., ::2]), "q"),
    ("zero head dim", dict(q=lambda t: torch.randn(2, 8, 4, 0), k=lambda t: torch.randn(2, 8, 2, 0),
                           v=lambda t: torch.randn(2, 8, 2, 0)), "head dim > 0"),
]


@pytest.mark.parametrize("what,changes,words", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise_naming_the_argument(what, changes, words):
    t = _good()
    for key, make in changes.items():
        t[key] = make(t)
    with pytest.raises((ValueError, RuntimeError)) as err:
        flash_attention(t["q"], t["k"], t["v"])
    assert words in str(err.value), str(err.value)


def _varlen_call(device, **changes):
    lens = [3, 5]
    args = dict(q=torch.randn(8, 2, 64, device=device), k=torch.randn(8, 2, 64, device=device),
                v=torch.randn(8, 2, 64, device=device), cu_seqlens_q=cu(lens, device), cu_seqlens_k=cu(lens, device),
                max_seqlen_q=5, max_seqlen_k=5)
    if device.type == "cuda":
        for name in ("q", "k", "v"):
            args[name] = args[name].bfloat16()
    args.update({k: (v(args) if callable(v) else v) for k, v in changes.items()})
    return flash_attention_varlen(**args)


BAD_VARLEN = [
    ("int64 cu_seqlens", dict(cu_seqlens_q=lambda a: a["cu_seqlens_q"].long()), "cu_seqlens_q"),
    ("2-d cu_seqlens", dict(cu_seqlens_k=lambda a: a["cu_seqlens_k"][None]), "cu_seqlens_k"),
    ("not monotone", dict(cu_seqlens_q=lambda a: torch.tensor([0, 5, 3, 8], dtype=torch.int32, device=a["q"].device),
                          cu_seqlens_k=lambda a: torch.tensor([0, 3, 5, 8], dtype=torch.int32, device=a["q"].device)),
     "non-decreasing"),
    ("last != total", dict(cu_seqlens_k=lambda a: torch.tensor([0, 3, 7], dtype=torch.int32, device=a["q"].device)),
     "cu_seqlens_k"),
    ("not starting at 0", dict(cu_seqlens_q=lambda a: torch.tensor([1, 3, 8], dtype=torch.int32, device=a["q"].device)),
     "cu_seqlens_q"),
    ("max_seqlen too small", dict(max_seqlen_k=4), "max_seqlen_k"),
    ("lengths differ", dict(cu_seqlens_k=lambda a: torch.tensor([0, 8], dtype=torch.int32, device=a["q"].device)),
     "cu_seqlens_k"),
    ("4-d q", dict(q=lambda a: a["q"][None]), "q"),
]


@pytest.mark.parametrize("what,changes,words", BAD_VARLEN, ids=[b[0] for b in BAD_VARLEN])
def test_bad_varlen_inputs_raise(device, what, changes, words):
    attn_mod._cu_checked.clear()
    with pytest.raises((ValueError, RuntimeError)) as err:
        _varlen_call(device, **changes)
    assert words in str(err.value), str(err.value)


def test_cu_seqlens_check_takes_inference_tensors():
    # The CUDA value check (called directly: the CPU binding checks in C++) cached a checked cu_seqlens
    # by its _version, which an inference tensor does not have: every varlen call under
    # torch.inference_mode with a cu_seqlens made there raised "Inference tensors do not track version
    # counter". Such a tensor is checked every call instead, so an in-place edit is still caught.
    attn_mod._cu_checked.clear()
    x = torch.empty(8, 2, 64)
    with torch.inference_mode():
        c = cu([3, 5], "cpu")
        for _ in range(2):
            attn_mod._check_cu_values(c, x, 5, "cu_seqlens_q", "max_seqlen_q", "q")
        c[1] = 4  # lengths 4 and 4: still valid, then a decrease
        attn_mod._check_cu_values(c, x, 5, "cu_seqlens_q", "max_seqlen_q", "q")
        c[1] = 9
        with pytest.raises(ValueError, match="non-decreasing"):
            attn_mod._check_cu_values(c, x, 9, "cu_seqlens_q", "max_seqlen_q", "q")


@pytest.mark.cuda
def test_varlen_under_inference_mode_cuda():
    with torch.inference_mode():
        out = _varlen_call(torch.device("cuda"))
        assert torch.equal(out, _varlen_call(torch.device("cuda")))


def test_only_one_cu_seqlens_raises():
    q = torch.randn(8, 2, 64)
    with pytest.raises(ValueError, match="cu_seqlens_q and cu_seqlens_k"):
        torch.ops.fmcore.flash_attn_fwd(q, q, q, cu([8], "cpu"), None, 8, 8, False, 0.1)


@pytest.mark.cuda
def test_cuda_rejects_unsupported_head_dim_dtype_and_devices():
    q = torch.randn(1, 8, 2, 80, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head dim of 64, 96 or 128"):
        flash_attention(q, q, q)
    q = torch.randn(1, 8, 2, 64, device="cuda")
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        flash_attention(q, q, q)
    q = q.bfloat16()
    with pytest.raises(RuntimeError, match="k"):
        flash_attention(q, q.cpu(), q)


@pytest.mark.cuda
def test_cuda_unaligned_inputs_are_copied():
    # A one-element storage offset breaks the 16-byte alignment the kernels need: the binding copies.
    base = torch.randn(1 * 37 * 4 * 64 + 1, device="cuda", dtype=torch.bfloat16)
    q = base[1:].view(1, 37, 4, 64).requires_grad_()
    k, v = q.detach().clone().requires_grad_(), q.detach().clone().requires_grad_()
    check_against_reference(q, k, v, causal=True)


# ---- qkv packed


def check_qkvpacked(device, varlen, causal, dtype=torch.bfloat16, tiles=0, D=64, atomics=None):
    """flash_attention_qkvpacked against unpacking qkv and calling flash_attention(_varlen): the same
    out and lse bitwise, and a gradient of qkv equal to the three stacked (bitwise on the
    deterministic backward; atomics: whether the other one adds dq with atomics, in varying order:
    the CUDA kernels, default on CUDA)."""
    device = torch.device(device)
    atomics = device.type == "cuda" if atomics is None else atomics
    torch.manual_seed(19)
    lengths = [1, 37, 70, 5]
    shape = (sum(lengths), 3, 4, D) if varlen else (2, 75, 3, 4, D)
    base = torch.randn(*shape[:-1], D + 8, device=device, dtype=dtype)
    qkv = base[..., :D].requires_grad_()  # strided: qkv need not be contiguous either
    c = cu(lengths, device) if varlen else None
    args = (c, max(lengths)) if varlen else ()
    for deterministic in (True, False):
        out, lse = flash_attention_qkvpacked(qkv, *args, causal=causal, return_lse=True, deterministic=deterministic,
                                             tiles=tiles)
        dout, dlse = torch.randn_like(out), torch.randn_like(lse)
        (dqkv,) = torch.autograd.grad((out, lse), (qkv,), (dout, dlse))
        q, k, v = (t.detach().requires_grad_() for t in qkv.detach().unbind(-3))
        call = flash_attention_varlen if varlen else flash_attention
        want_out, want_lse = call(q, k, v, *(args[:1] * 2 + args[1:] * 2), causal=causal, return_lse=True,
                                  deterministic=deterministic, tiles=tiles)
        want = torch.stack(torch.autograd.grad((want_out, want_lse), (q, k, v), (dout, dlse)), dim=-3)
        assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
        assert dqkv.shape == qkv.shape and dqkv.dtype == dtype
        if deterministic or not atomics:
            assert torch.equal(dqkv, want)
        else:
            torch.testing.assert_close(dqkv, want)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("varlen", [False, True], ids=["batched", "varlen"])
def test_qkvpacked_matches_unpacked(device, varlen, causal):
    check_qkvpacked(device, varlen, causal)


def test_qkvpacked_bad_inputs(device):
    qkv = torch.randn(2, 8, 3, 2, 64, device=device, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"expected qkv of shape \(B, S, 3, H, D\), got \(2, 8, 2, 2, 64\)"):
        flash_attention_qkvpacked(qkv[:, :, :2])
    with pytest.raises(ValueError, match=r"expected qkv of shape \(total, 3, H, D\) \(with cu_seqlens\)"):
        flash_attention_qkvpacked(qkv, cu([8, 8], device), 8)
    with pytest.raises(ValueError, match="expected max_seqlen"):
        flash_attention_qkvpacked(qkv[0], cu([8], device))
    with pytest.raises(ValueError, match=r"expected qkv of shape \(B, S, 3, H, D\)"):
        torch.ops.fmcore.flash_attn_qkvpacked_bwd(qkv[0], qkv[0], qkv[0], qkv[0], None, None, 0, False, 0.125)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # functorch's per-sample loop
def test_qkvpacked_under_torch_func():
    """vmap and torch.func.grad batch flash_attention's op; the qkvpacked Function raised under both
    (no vmap rule; a backward Function without setup_context)."""
    qkv = torch.randn(3, 1, 6, 3, 2, 16, dtype=torch.float64)

    def per_sample(x):
        return reference(*x.unbind(-3), causal=True)[0]

    torch.testing.assert_close(torch.func.vmap(lambda x: flash_attention_qkvpacked(x, causal=True))(qkv),
                               torch.stack([per_sample(x) for x in qkv]))
    got = torch.func.vmap(torch.func.grad(lambda x: flash_attention_qkvpacked(x, causal=True).square().sum()))(qkv)
    want = torch.stack([torch.func.grad(lambda x: per_sample(x).square().sum())(x) for x in qkv])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("layout", ["batched", "varlen", "qkvpacked"])
def test_double_backward_raises(device, layout):
    """First-order gradients only: one taken with create_graph=True equals the plain one, and
    differentiating it again raises (autograd would otherwise drop the second-order terms)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if layout == "qkvpacked":
        inputs = (torch.randn(2, 19, 3, 4, 64, device=device, dtype=dtype, requires_grad=True),)
        f = lambda qkv: flash_attention_qkvpacked(qkv, causal=True)  # noqa: E731
    elif layout == "varlen":
        inputs = tuple(t[0] for t in make_qkv(1, 19, 19, 4, 2, 64, device, dtype, requires_grad=False))
        inputs = tuple(t.requires_grad_() for t in inputs)
        c = cu([7, 12], device)
        f = lambda q, k, v: flash_attention_varlen(q, k, v, c, c, 12, 12, causal=True)  # noqa: E731
    else:
        inputs = make_qkv(2, 19, 23, 4, 2, 64, device, dtype)
        f = lambda q, k, v: flash_attention(q, k, v, causal=True)  # noqa: E731
    cot = torch.randn_like(f(*inputs))
    want = torch.autograd.grad(f(*inputs), inputs, cot)
    got = torch.autograd.grad(f(*inputs), inputs, cot, create_graph=True)
    for g, w in zip(got, want):
        assert torch.equal(g.detach(), w)
    with pytest.raises(NotImplementedError, match="flash_attention supports first-order gradients only"):
        torch.autograd.grad(sum(g.float().square().sum() for g in got), inputs)


def test_backward_op_on_inputs_that_require_grad(device):
    """Called directly, the backward op runs below autograd (the CPU reference's copies into views of
    its outputs once raised there) and its outputs cannot be differentiated."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (t[0] for t in make_qkv(1, 19, 19, 4, 2, 64, device, dtype))
    c = cu([7, 12], device)
    args = (c, c, 12, 12, True, 0.125)
    out, lse = torch.ops.fmcore.flash_attn_fwd(q.detach(), k.detach(), v.detach(), *args)
    dout = torch.randn_like(out)
    want = torch.ops.fmcore.flash_attn_bwd(dout, q.detach(), k.detach(), v.detach(), out, lse, None, *args)
    got = torch.ops.fmcore.flash_attn_bwd(dout.requires_grad_(), q, k, v, out, lse, None, *args)
    for g, w in zip(got, want):
        assert torch.equal(g.detach(), w)
    with pytest.raises(RuntimeError, match="derivative for fmcore::flash_attn_bwd is not implemented"):
        got[0].float().sum().backward()


# ---- torch.library and torch.compile


def test_opcheck(device):
    # opcheck's aot_dispatch test compares the op's gradients with a compiled run's, bitwise on CUDA's
    # atomic dq path only by chance: it runs on the deterministic path, the rest on both.
    nondet_utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = make_qkv(2, 19, 23, 4, 2, 64, device, dtype)
    for det in (True, False):
        utils = {} if det else {"test_utils": nondet_utils}
        torch.library.opcheck(torch.ops.fmcore.flash_attn_fwd.default, (q, k, v, None, None, 0, 0, True, 0.125, det),
                              **utils)
    c = cu([7, 12], device)
    qv, kv, vv = (t.detach()[0, :19].clone().requires_grad_() for t in (q, k, v))
    # tiles=1: the tile configuration reaches the backward too (on CUDA, another set of kernels)
    torch.library.opcheck(torch.ops.fmcore.flash_attn_fwd.default, (qv, kv, vv, c, c, 12, 12, False, 0.125, True, 1))
    # The backward op has no derivative (test_backward_op_on_inputs_that_require_grad): detached inputs.
    q, k, v = q.detach(), k.detach(), v.detach()
    out, lse = torch.ops.fmcore.flash_attn_fwd(q, k, v, None, None, 0, 0, True, 0.125)
    dlse = torch.randn_like(lse)
    for det in (True, False):
        utils = {} if det else {"test_utils": nondet_utils}
        torch.library.opcheck(torch.ops.fmcore.flash_attn_bwd.default,
                              (torch.randn_like(out), q, k, v, out, lse, dlse, None, None, 0, 0, True, 0.125, det),
                              **utils)
    qkv = torch.randn(2, 19, 3, 4, 64, device=device, dtype=dtype)
    out, lse = torch.ops.fmcore.flash_attn_fwd(*qkv.unbind(2), None, None, 0, 0, True, 0.125)
    for det in (True, False):
        utils = {} if det else {"test_utils": nondet_utils}
        torch.library.opcheck(torch.ops.fmcore.flash_attn_qkvpacked_bwd.default,
                              (torch.randn_like(out), qkv, out, lse, torch.randn_like(lse), None, 0, True, 0.125, det),
                              **utils)


def test_torch_compile_fullgraph(device):
    q, k, v = make_qkv(2, 33, 33, 4, 2, 64, device, torch.bfloat16)
    c = cu([10, 23], device)

    def fn(q, k, v):
        a = flash_attention(q, k, v, causal=True)
        b = flash_attention_varlen(q[0], k[0], v[0], c, c, 23, 23, causal=True)
        qkv = torch.stack((q, 2 * q, q.flip(1)), dim=2)  # MHA: q for k and v too
        d = flash_attention_qkvpacked(qkv, causal=True) + flash_attention_qkvpacked(qkv[0], c, 23)[None]
        return a.float().square().sum() + b.float().sum() + d.float().sum()

    assert_compiles_like_eager(fn, (q, k, v), device)


# ---- scaled_dot_product_attention drop-in


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_dropin_matches_torch(device, causal, gqa):
    B, Hq, S, D = 2, 8, 50, 64
    Hk = 2 if gqa else Hq
    q = torch.randn(B, Hq, S, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, Hk, S, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, Hk, S, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fmcore path must not warn
        out = scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    ref, _ = reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    assert out.shape == theirs.shape
    assert_close_to_ref(out, ref.transpose(1, 2), theirs, "out")
    # The gradient reaches the op as a (B, S, H, D) view of a (B, H, S, D) tensor: dout is strided.
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref.transpose(1, 2), (q, k, v), dout.double())
    their_g = torch.autograd.grad(theirs, (q, k, v), dout)
    for name, g, r, t in zip(("dq", "dk", "dv"), got, want, their_g):
        assert_close_to_ref(g, r, t, name)


def test_sdpa_falls_back_with_one_warning_per_reason(device):
    q = torch.randn(1, 2, 6, 64, device=device, dtype=torch.bfloat16)
    mask = torch.rand(6, 6, device=device) > 0.3
    mask[:, 0] = True
    attn_mod._warned.clear()
    with pytest.warns(UserWarning, match="attn_mask"):
        out = scaled_dot_product_attention(q, q, q, attn_mask=mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q, attn_mask=mask))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled_dot_product_attention(q, q, q, attn_mask=mask)  # second time: silent
    k = torch.randn(1, 2, 9, 64, device=device, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="top-left"):  # torch's causal mask for Sq != Sk differs from FA's
        out = scaled_dot_product_attention(q, k, k, is_causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, k, is_causal=True))


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
def test_sdpa_dropin_exports_causal_with_separate_lengths(strict):
    # torch.export with separate Dims for the query and key lengths (a model fed past keys): the
    # fallback test Sq != Sk guarded Sq == Sk when the example lengths were equal, and export refused
    # the model ("The values of Sk ... and Sq ... must always be equal"), which torch's SDPA exports.
    # Lengths not known equal take torch's SDPA, right at every length.
    from torch.export import Dim, export

    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return scaled_dot_product_attention(q, k, v, is_causal=True)

    Sq, Sk = Dim("Sq", min=1, max=64), Dim("Sk", min=1, max=64)
    q, k, v = (torch.randn(1, 2, 6, 16) for _ in range(3))
    ep = export(Attend(), (q, k, v), dynamic_shapes=({2: Sq}, {2: Sk}, {2: Sk}), strict=strict)
    for lq, lk in ((6, 6), (3, 9), (9, 3)):
        q, k, v = torch.randn(1, 2, lq, 16), torch.randn(1, 2, lk, 16), torch.randn(1, 2, lk, 16)
        torch.testing.assert_close(ep.module()(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_sdpa_dropin_installed_over_torchs_falls_back_to_torch(monkeypatch):
    # Models one does not edit (Hugging Face's, nanoGPT's) call torch.nn.functional's SDPA: adopting the
    # drop-in there means assigning it over torch's. Its fallback looked F's attribute up at call time,
    # found itself, and recursed until RecursionError on every attn_mask / dropout call.
    torch_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", scaled_dot_product_attention)
    q = torch.randn(1, 2, 6, 16)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    attn_mod._warned.clear()
    with pytest.warns(UserWarning, match="attn_mask"):
        out = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    torch.testing.assert_close(out, torch_sdpa(q, q, q, attn_mask=mask))


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # functorch's per-sample loop
@pytest.mark.parametrize("transform", ["vmap_grad", "grad", "jacrev"])
def test_per_sample_gradients_with_torch_func(transform):
    # flash_attention, varlen and the SDPA drop-in under torch.func's gradient transforms raised "it must
    # override the setup_context staticmethod" (torch's Function for a registered op has the old form).
    q = torch.randn(3, 1, 5, 2, 8, dtype=torch.float64)  # 3 samples of (B, S, H, D)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)

    def losses(x):
        bhsd = x.transpose(1, 2)
        return (flash_attention(x, x, x, causal=True).square().sum(),
                flash_attention_varlen(x[0], x[0], x[0], cu, cu, 3, 3).square().sum(),
                scaled_dot_product_attention(bhsd, bhsd, bhsd, is_causal=True).square().sum())

    def references(x):
        bhsd = x.transpose(1, 2)
        docs = [x[0, a:b].transpose(0, 1) for a, b in ((0, 2), (2, 5))]
        return (F.scaled_dot_product_attention(bhsd, bhsd, bhsd, is_causal=True).square().sum(),
                sum(F.scaled_dot_product_attention(d, d, d).square().sum() for d in docs),
                F.scaled_dot_product_attention(bhsd, bhsd, bhsd, is_causal=True).square().sum())

    for i in range(3):
        def pick(f, i=i):
            return lambda x: f(x)[i]
        if transform == "vmap_grad":
            got, want = (torch.func.vmap(torch.func.grad(pick(f)))(q) for f in (losses, references))
        elif transform == "grad":
            got, want = (torch.func.grad(pick(f))(q[0]) for f in (losses, references))
        else:
            got, want = (torch.func.jacrev(pick(f))(q[0]) for f in (losses, references))
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("shapes", [((2, 0, 5, 8), (2, 0, 7, 8)), ((1, 4, 5, 0), (1, 2, 7, 0))],
                         ids=["no_heads", "head_dim_0_gqa"])
def test_sdpa_dropin_empty_heads_like_torch(device, shapes):
    # torch (2.14) returns an empty result; fmcore's kernel raised ValueError. (torch 2.11's CPU kernel
    # dies of SIGFPE on zero heads, so the expected shape is written out, not asked of torch.)
    q = torch.randn(shapes[0], device=device, requires_grad=True)
    k = torch.randn(shapes[1], device=device, requires_grad=True)
    out = scaled_dot_product_attention(q, k, k, enable_gqa=True)
    assert out.shape == (*shapes[0][:3], shapes[1][3])  # (B, Hq, Sq, Dv)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


@pytest.mark.cuda
def test_sdpa_falls_back_past_the_grid_limit_cuda():
    # 65536 sequences exceed the kernel's grid (gridDim.z <= 65535): fmcore.ops.flash_attention
    # raises, but the SDPA drop-in must give torch's result like any other unsupported case.
    q = torch.randn(65536, 1, 2, 64, device="cuda", dtype=torch.bfloat16)
    attn_mod._warned.clear()
    with pytest.warns(UserWarning, match="65535"):
        out = scaled_dot_product_attention(q, q, q)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q))


# ---- fmcore.nn.Attention


def module_dtype(device):
    """fp32 on the CPU; bf16 on CUDA, where fmcore's kernels take bf16/fp16 (training runs under
    bf16 autocast or with bf16 weights). Returns (dtype, tolerance for module-level comparisons)."""
    return (torch.float32, 1e-4) if device.type == "cpu" else (torch.bfloat16, 3e-2)



def test_attention_module_argument_errors():
    from fmcore.nn import Attention

    with pytest.raises(ValueError, match=r"dim \(64\) to be a multiple of n_heads \(5\)"):
        Attention(64, 5)
    assert Attention(64, 5, head_dim=16).proj.in_features == 80  # an explicit head_dim is the way
    with pytest.raises(ValueError, match=r"expected x of shape \(B, S, 64\), got \(5, 64\)"):
        Attention(64, 4)(torch.randn(5, 64))
    with pytest.raises(ValueError, match="n_heads > 0"):  # not a ZeroDivisionError computing dim // n_heads
        Attention(64, 0)
    with pytest.raises(ValueError, match=r"expected head_dim > 0, got 0 \(dim=64, n_heads=4\)"):
        Attention(64, 4, head_dim=0)


def test_attention_module_without_rope_or_causal_mask(device):
    # rope_base=None (positions from elsewhere, a learned table) and causal=False (an encoder), with biases
    from fmcore.nn import Attention

    torch.manual_seed(7)
    dtype, tol = module_dtype(device)
    m = Attention(128, 2, rope_base=None, causal=False, bias=True).to(device, dtype)
    assert m.rope is None
    x = torch.randn(2, 9, 128, device=device, dtype=dtype)
    q, k, v = m.qkv(x).view(2, 9, 6, 64).split([2, 2, 2], dim=2)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(m(x), m.proj(ref.reshape(2, 9, 128)), rtol=tol, atol=tol)


def test_attention_module_document_boundaries_compile_without_max_seqlen():
    # max_seqlen=None is computed from cu_seqlens in eager mode, a value the trace cannot read: under
    # torch.compile the module takes B * S, an upper bound, rather than failing on an unbacked SymInt.
    from fmcore.nn import Attention

    torch.manual_seed(7)
    m = Attention(64, 2, max_seq_len=32)
    x, lens = torch.randn(1, 12, 64), [5, 7]
    positions = torch.cat([torch.arange(n) for n in lens])[None]
    eager = m(x, positions=positions, cu_seqlens=cu(lens, "cpu"))
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)(x, positions=positions,
                                                                     cu_seqlens=cu(lens, "cpu"))
    torch.testing.assert_close(compiled, eager)


@pytest.mark.filterwarnings("ignore:.*torch.jit.script")  # torch.autograd.forward_ad's own import
@pytest.mark.parametrize("varlen", [False, True])
def test_forward_mode_ad_raises(varlen):
    # A tangent must raise, never be silently dropped: torch.library's autograd skips its Function
    # (and so the missing jvp's error) when no input requires grad.
    q = torch.randn(1, 4, 2, 8, dtype=torch.float64)
    if varlen:
        lens = cu([4], "cpu")
        f = lambda q: flash_attention_varlen(q[0], q[0], q[0], lens, lens, 4, 4, causal=True)  # noqa: E731
    else:
        f = lambda q: flash_attention(q, q, q, causal=True)  # noqa: E731
    with pytest.raises(NotImplementedError, match="no forward-mode derivative"):
        torch.func.jvp(f, (q,), (torch.randn_like(q),))


def test_varlen_max_seqlen_must_be_an_int():
    q, lens = torch.randn(4, 2, 8), cu([4], "cpu")
    for bad in (None, 3.5):  # int(None) was a bare TypeError; 3.5 would have become 3 (too small a grid)
        with pytest.raises(TypeError, match="expected max_seqlen_q to be an int"):
            flash_attention_varlen(q, q, q, lens, lens, bad, 4)


def test_sdpa_dropin_follows_autocast():
    # torch's SDPA runs in the autocast dtype; a drop-in must return what it returns.
    q, k, v = (torch.randn(1, 2, 6, 16) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = scaled_dot_product_attention(q, k, v, is_causal=True)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)

def test_attention_module_matches_manual(device):
    from fmcore.nn import Attention

    torch.manual_seed(5)
    dim, Hq, Hk, S, B = 256, 4, 2, 24, 2
    dtype, tol = module_dtype(device)
    m = Attention(dim, Hq, n_kv_heads=Hk, max_seq_len=64).to(device, dtype)
    x = torch.randn(B, S, dim, device=device, dtype=dtype)
    out = m(x)
    hd = dim // Hq
    q, k, v = m.qkv(x).view(B, S, Hq + 2 * Hk, hd).split([Hq, Hk, Hk], dim=2)
    q, k = m.rope(q, k)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, m.proj(ref.reshape(B, S, Hq * hd)), rtol=tol, atol=tol)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_attention_module_document_boundaries(device):
    # Packed documents with positions restarting at each document equal separate per-document runs.
    from fmcore.nn import Attention

    torch.manual_seed(6)
    dtype, tol = module_dtype(device)
    m = Attention(128, 2, max_seq_len=32).to(device, dtype)
    lens = [5, 1, 10]
    x = torch.randn(1, sum(lens), 128, device=device, dtype=dtype)
    positions = torch.cat([torch.arange(n) for n in lens])[None].to(device)
    packed = m(x, positions=positions, cu_seqlens=cu(lens, device), max_seqlen=max(lens))
    parts, start = [], 0
    for n in lens:
        parts.append(m(x[:, start:start + n]))
        start += n
    torch.testing.assert_close(packed, torch.cat(parts, dim=1), rtol=tol, atol=tol)


def test_attention_module_window(device):
    # window=(W - 1, 0) with causal: each token sees itself and the W - 1 before it, in batched and
    # packed-document calls alike (the window restarts with each document).
    from fmcore.nn import Attention

    torch.manual_seed(7)
    dim, Hq, Hk, S, B, W = 256, 4, 2, 24, 2, 5
    dtype, tol = module_dtype(device)
    m = Attention(dim, Hq, n_kv_heads=Hk, max_seq_len=64, window=(W - 1, 0)).to(device, dtype)
    x = torch.randn(B, S, dim, device=device, dtype=dtype)
    hd = dim // Hq
    q, k, v = m.qkv(x).view(B, S, Hq + 2 * Hk, hd).split([Hq, Hk, Hk], dim=2)
    q, k = m.rope(q, k)
    mask = visible(S, S, True, device, (W - 1, 0))
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(m(x), m.proj(ref.reshape(B, S, Hq * hd)), rtol=tol, atol=tol)
    lens = [7, 17]
    positions = torch.cat([torch.arange(n) for n in lens])[None].to(device)
    packed = m(x[:1], positions=positions, cu_seqlens=cu(lens, device), max_seqlen=max(lens))
    torch.testing.assert_close(packed, torch.cat([m(x[:1, :7]), m(x[:1, 7:])], dim=1), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="window_size"):
        Attention(dim, Hq, window=(4, 2))  # causal with a right bound


def test_window_opcheck_and_compile(device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = make_qkv(2, 19, 23, 4, 2, 64, device, dtype)
    for args in ((True, 0.125, True, 0, 5, -1), (False, 0.125, False, 0, 2, 3)):
        utils = {} if args[2] else {"test_utils": ("test_schema", "test_autograd_registration", "test_faketensor")}
        torch.library.opcheck(torch.ops.fmcore.flash_attn_fwd.default, (q, k, v, None, None, 0, 0, *args), **utils)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    out, lse = torch.ops.fmcore.flash_attn_fwd(qd, kd, vd, None, None, 0, 0, False, 0.125, True, 0, 2, 3)
    torch.library.opcheck(torch.ops.fmcore.flash_attn_bwd.default,
                          (torch.randn_like(out), qd, kd, vd, out, lse, torch.randn_like(lse), None, None, 0, 0, False,
                           0.125, True, 0, 2, 3))
    c = cu([10, 9], device)

    def fn(q, k, v):
        a = flash_attention(q, k, v, window_size=(3, 2))
        b = flash_attention_varlen(q[0], k[0, :19], v[0, :19], c, c, 10, 10, causal=True, window_size=(4, -1))
        qkv = torch.stack((q, 2 * q, q.flip(1)), dim=2)
        d = flash_attention_qkvpacked(qkv, causal=True, window_size=(6, 0))
        return a.float().square().sum() + b.float().sum() + d.float().sum()

    assert_compiles_like_eager(fn, (q, k, v), device)


def test_cpu_reference_under_bf16_autocast():
    # Inside a model under autocast: the CPU reference's own fp32 matmuls must not be recast to bf16.
    q, k, v = (torch.randn(1, 9, 2, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = flash_attention(q, k, v, causal=True)
        out.float().sum().backward()
    ref = flash_attention(q.detach(), k.detach(), v.detach(), causal=True)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("packed", [False, True], ids=["varlen", "qkvpacked"])
def test_compiled_varlen_stays_one_graph_as_max_seqlen_changes(packed):
    # max_seqlen was an `int` in the schemas: dynamo specialized on it and compiled a graph per value
    # (a packed loader's longest document changes every batch) until its recompile limit, then ran
    # eagerly (fullgraph=True: an error). SymInt: one dynamic graph after the first.
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    torch._dynamo.reset()

    @torch.compile(backend=counter, fullgraph=True)
    def step(qkv, cu_seqlens, max_seqlen):
        if packed:
            return flash_attention_qkvpacked(qkv, cu_seqlens, max_seqlen, causal=True).sum()
        q, k, v = qkv.unbind(1)
        return flash_attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True).sum()

    qkv = torch.randn(24, 3, 2, 16)
    for longest in range(12, 21):
        lens = [longest, 24 - longest]
        want = step.__wrapped__(qkv, cu(lens, "cpu"), longest)
        torch.testing.assert_close(step(qkv, cu(lens, "cpu"), longest), want)
    assert counter.frame_count <= 2


def _sdpa_fallback_case(case: str):
    """(args, kwargs) of a call fmcore's kernel does not take, and the reason its warning gives."""
    q = torch.randn(1, 2, 6, 8)
    kv = torch.randn(1, 1, 6, 8)
    return {
        "dropout": ((q, q, q), {"dropout_p": 0.5}, "dropout_p > 0"),
        "3-D": ((q[0], q[0], q[0]), {}, "not 4-D"),
        "dtypes": ((q, q.double(), q.double()), {}, "differ in device or dtype"),  # (torch refuses it)
        "int": ((q.int(), q.int(), q.int()), {}, "dtype torch.int32"),  # (torch refuses it)
        "v head dim": ((q, q, torch.randn(1, 2, 6, 4)), {}, "shapes differ beyond the sequence and head dims"),
        "heads": ((q, kv, kv), {}, "head counts differ without enable_gqa"),  # (torch refuses it)
        "strided head dim": ((q, torch.randn(1, 2, 8, 6).transpose(-1, -2), q), {}, "head dim is not contiguous"),
    }[case]


@pytest.mark.parametrize("case", ["dropout", "3-D", "dtypes", "int", "v head dim", "heads", "strided head dim"])
def test_sdpa_falls_back_to_torchs_result_or_error(case):
    args, kwargs, reason = _sdpa_fallback_case(case)
    attn_mod._warned.clear()

    def call(sdpa):
        torch.manual_seed(0)  # (dropout's mask)
        try:
            return sdpa(*args, **kwargs)
        except RuntimeError as e:
            return str(e)

    want = call(F.scaled_dot_product_attention)
    with pytest.warns(UserWarning, match=re.escape(reason)):
        got = call(scaled_dot_product_attention)
    if isinstance(want, str):
        assert got == want
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=0)
