"""The CUDA attention kernels' index math, fragment layouts, masks, online softmax and cp.async /
barrier discipline, checked on the CPU through the lane-level model in attention_kernel_model.py
(the kernels cannot run on the CPU CI machines). The model computes in float64, so it must match the
float64 reference to rounding; a race or an unwritten output fails loudly. Every case runs both
backward dq paths (the deterministic dq kernel and the atomic dq share of the dk/dv kernel), and
test_model_catches_atomic_dq_slips shows that one-statement slips in the atomic path fail the model.

The model is a transcription of csrc/kernels/attention.cu: a change to the kernels' tiling, masking
or pipelining must be mirrored there (the CUDA tests in test_attention.py check the real kernels).
"""

import inspect
import math

import numpy as np
import pytest
import torch

from tests.ops import attention_kernel_model as M


def _tensor(t: torch.Tensor, varlen: bool) -> M.Tensor:
    """t, a float64 view of a contiguous base tensor, as the model's (buffer, offset, strides)."""
    base = t if t._base is None else t._base
    assert base.is_contiguous()
    off = t.storage_offset() - base.storage_offset()
    buf = M.Buffer(base.detach().reshape(-1).numpy())
    if varlen:
        return M.Tensor(buf, off, 0, t.stride(0), t.stride(1))
    return M.Tensor(buf, off, t.stride(0), t.stride(1), t.stride(2))


def _empty(shape, varlen):
    return _tensor(torch.full(shape, math.nan, dtype=torch.float64), varlen)


def _reference(q, k, v, dout, dlse, causal, scale):
    """float64 out (Sq, Hq, D), lse (Hq, Sq) and the gradients of sum(out * dout) + sum(lse * dlse)
    for one sequence; rows that see no key: out 0, lse -inf, no gradient through lse."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    Sq, Hq, _ = q.shape
    Sk, Hk = k.shape[0], k.shape[1]
    kk, vv = k.repeat_interleave(Hq // Hk, 1), v.repeat_interleave(Hq // Hk, 1)
    s = torch.einsum("qhd,khd->hqk", q, kk) * scale
    i, j = torch.arange(Sq)[:, None], torch.arange(Sk)[None]
    visible = (j <= i + Sk - Sq) if causal else torch.ones(Sq, Sk, dtype=torch.bool)
    s = s.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("hqk,khd->qhd", p, vv)
    loss = (out * dout).sum() + (lse.masked_fill(torch.isinf(lse), 0.0) * dlse).sum()
    grads = torch.autograd.grad(loss, (q, k, v), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (q, k, v))]
    return out.detach(), lse.detach(), grads


def run_and_check(q, k, v, causal, cu_q=None, cu_k=None, max_q=0, max_k=0, deterministic=True):
    """Runs the modelled forward and backward (delta, dk/dv, then the dq kernel, or with
    deterministic=False the dk/dv kernel's atomic dq and the convert kernel) and compares with the
    float64 reference. q/k/v: float64 (B, S, H, D), or (T, H, D) with cu_q/cu_k lists."""
    torch.manual_seed(0)
    varlen = cu_q is not None
    Hq, Hk, D = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 0.7 / math.sqrt(D)
    dout = torch.randn(q.shape, dtype=torch.float64)
    lse_shape = (Hq, q.shape[0]) if varlen else (q.shape[0], Hq, q.shape[1])
    dlse = torch.randn(lse_shape, dtype=torch.float64)
    out, dq = _empty(q.shape, varlen), _empty(q.shape, varlen)
    dk, dv = _empty(k.shape, varlen), _empty(k.shape, varlen)
    lse = M.Buffer(np.full(math.prod(lse_shape), math.nan))
    p = M.Params(
        q=_tensor(q, varlen), k=_tensor(k, varlen), v=_tensor(v, varlen), out=out, lse=lse,
        lse_stride_b=0 if varlen else Hq * q.shape[1], lse_stride_h=q.shape[0] if varlen else q.shape[1],
        batch=len(cu_q) - 1 if varlen else q.shape[0], heads_q=Hq, heads_k=Hk, head_dim=D,
        # the binding clamps max_seqlen to the packed total
        seqlen_q=min(max_q, q.shape[0]) if varlen else q.shape[1],
        seqlen_k=min(max_k, k.shape[0]) if varlen else k.shape[1],
        scale=scale, causal=causal, cu_q=cu_q, cu_k=cu_k, total_q=q.shape[0], total_k=k.shape[0],
        dout=_tensor(dout, varlen), dq=dq, dk=dk, dv=dv, dlse=M.Buffer(dlse.reshape(-1).numpy()),
        delta=M.Buffer(np.full(math.prod(lse_shape), math.nan)))
    M.run_fwd(p)
    M.run_bwd(p, deterministic)

    got = {name: torch.from_numpy(t.buf.v).view(shape)
           for name, t, shape in (("out", out, q.shape), ("dq", dq, q.shape), ("dk", dk, k.shape),
                                  ("dv", dv, k.shape))}
    got["lse"] = torch.from_numpy(lse.v).view(lse_shape)
    if varlen:  # per document, as (1, S, H, D) / (1, H, S) slices of the packed tensors
        seqs = [(slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])) for b in range(len(cu_q) - 1)]
        pick = {"out": lambda t, qs, ks: t[qs], "dq": lambda t, qs, ks: t[qs], "dk": lambda t, qs, ks: t[ks],
                "dv": lambda t, qs, ks: t[ks], "lse": lambda t, qs, ks: t[:, qs]}
        inputs = [(q[qs], k[ks], v[ks], dout[qs], dlse[:, qs]) for qs, ks in seqs]
    else:
        seqs = [(b, b) for b in range(q.shape[0])]
        pick = {name: (lambda t, qs, ks: t[qs]) for name in ("out", "dq", "dk", "dv", "lse")}
        inputs = [(q[b], k[b], v[b], dout[b], dlse[b]) for b in range(q.shape[0])]
    for (qs, ks), args in zip(seqs, inputs):
        ref_out, ref_lse, (ref_dq, ref_dk, ref_dv) = _reference(*args, causal, scale)
        want = {"out": ref_out, "lse": ref_lse, "dq": ref_dq, "dk": ref_dk, "dv": ref_dv}
        for name, ref in want.items():
            g = pick[name](got[name], qs, ks)
            assert not torch.isnan(g).any(), f"{name}: unwritten elements"
            assert torch.equal(torch.isneginf(g), torch.isneginf(ref)), f"{name}: -inf rows differ"
            fin = torch.isfinite(ref)
            err = (g[fin] - ref[fin]).abs().max().item() if fin.any() else 0.0
            assert err < 1e-9, f"{name}: max error {err:.3g} against the float64 reference"


def qkv(B, Sq, Sk, Hq, Hk, D):
    return (torch.randn(B, Sq, Hq, D, dtype=torch.float64), torch.randn(B, Sk, Hk, D, dtype=torch.float64),
            torch.randn(B, Sk, Hk, D, dtype=torch.float64))


# Each case is cheap (a second or two) and exercises a different part of the kernels.
@pytest.mark.parametrize("case", [
    # Sk - Sq = 62 = -2 mod 64 (D=64's key block): a key block whose last key is one past what the
    # CTA's first row sees must still be masked; two key blocks (the K/V double buffer turns over);
    # GQA 2/1 makes the dk/dv kernel alternate its Q/dO stages across the group's heads.
    "gqa_causal_diagonal_62_d64",
    # Sq > Sk under the bottom-right mask: 23 rows with no key (out 0, lse -inf, no gradient), two
    # sequences, D=128 with its 32-key blocks and one 16-row tile per dq warp.
    "causal_rows_without_keys_d128",
    # q, k, v sliced out of one fused qkv projection (row stride (Hq + 2 Hk) D), D=96, full mask.
    "fused_qkv_strides_d96",
    # packed documents with empty, single-token and no-key documents, max_seqlen above the longest.
    "varlen_causal_d64",
])
@pytest.mark.parametrize("deterministic", [True, False], ids=["dq_kernel", "atomic_dq"])
def test_kernel_model_matches_reference(case, deterministic):
    torch.manual_seed(1)
    if case == "gqa_causal_diagonal_62_d64":
        run_and_check(*qkv(1, 10, 72, 2, 1, 64), causal=True, deterministic=deterministic)
    elif case == "causal_rows_without_keys_d128":
        run_and_check(*qkv(2, 40, 17, 1, 1, 128), causal=True, deterministic=deterministic)
    elif case == "fused_qkv_strides_d96":
        Hq, Hk = 2, 1
        fused = torch.randn(1, 70, Hq + 2 * Hk, 96, dtype=torch.float64)
        run_and_check(*fused.split([Hq, Hk, Hk], dim=2), causal=False, deterministic=deterministic)
    else:
        lq, lk = [1, 0, 5, 70, 3], [3, 2, 0, 40, 1]
        cu_q, cu_k = [0, *np.cumsum(lq).tolist()], [0, *np.cumsum(lk).tolist()]
        q = torch.randn(sum(lq), 2, 64, dtype=torch.float64)
        k, v = (torch.randn(sum(lk), 1, 64, dtype=torch.float64) for _ in range(2))
        run_and_check(q, k, v, True, cu_q, cu_k, max_q=100, max_k=100, deterministic=deterministic)


def test_model_detects_races():
    # The model's shared-memory checks themselves: a read of an in-flight cp.async, a read without a
    # barrier since the write, and a write-after-read in the same barrier interval all fail.
    sm = M.SharedMemory(16)
    sm.cp_async(np.arange(8), np.ones(8))
    sm.commit()
    with pytest.raises(AssertionError, match="in flight"):
        sm.read(np.arange(8))
    sm.wait(0)
    with pytest.raises(AssertionError, match="without a barrier"):
        sm.read(np.arange(8))
    sm.sync()
    sm.read(np.arange(8))
    with pytest.raises(AssertionError, match="WAR"):
        sm.cp_async(np.arange(8), np.zeros(8))
    sm.sync()
    sm.cp_async(np.arange(8), np.zeros(8))
    sm.commit()
    with pytest.raises(AssertionError, match="not waited"):
        sm.exit()


def _mutant(func: str, edits):
    """M.<func> recompiled from its source with each (old, new) text edit applied (old must occur
    exactly once), its globals still the model's: a one-statement slip in the transcription."""
    src = inspect.getsource(getattr(M, func))
    for old, new in edits:
        assert src.count(old) == 1, f"{old!r} is not a unique statement of {func}"
        src = src.replace(old, new)
    ns = {}
    exec(compile(src, f"<{func} with a slip>", "exec"), vars(M), ns)
    return ns[func]


# Slips in the atomic dq path (and the model's checks they exercise). Each edit mirrors a plausible
# mistake in the CUDA code; the model must fail on it.
SLIPS = {
    # dq's gemm before the barrier that publishes sdS: warps read other warps' dS^T in the phase it
    # is written (racecheck).
    "dq_gemm_before_barrier": ("attn_bwd_dkdv_kernel", [
        ("        sm.sync()\n        if kAtomicDq:\n", "        if kAtomicDq:\n"),
        ("    sm.wait(0)\n    sm.exit()\n", "        sm.sync()\n    sm.wait(0)\n    sm.exit()\n"),
    ], "without a barrier"),
    # gemm_tb's A operand (dS from the transposed sdS) at a_off's lane addresses: the two off-diagonal
    # 8x8 blocks of every A fragment trade places.
    "gemm_tb_a_at_a_off": ("gemm_tb", [("b_off(pitch_a)", "a_off(pitch_a)")], "dq: max error"),
    # ... and K (the B operand) at b_off's.
    "gemm_tb_b_at_b_off": ("gemm_tb", [("a_off(pitch_b)", "b_off(pitch_b)")], "dq: max error"),
    # A warp's head-dim slab one MMA tile over instead of kDW (D = 96: slabs of 48 columns).
    "dq_slab_column_offset": ("attn_bwd_dkdv_kernel", [
        ("(warp // kRowTiles) * kDW", "(warp // kRowTiles) * 16")], "dq: max error"),
    # dS K of every query head of the GQA group added into the kv head's rows.
    "dq_head_is_kv_head": ("attn_bwd_dkdv_kernel", [
        ("                h = hk * group + it // per_head\n", "                h = hk\n")], "dq: max error"),
    # Rows past the sequence end (zeros, but at addresses past the buffer's end) still added.
    "dq_rows_past_the_end": ("attn_bwd_dkdv_kernel", [("ok = row < q_len", "ok = row >= 0")],
                             "global atomic out of bounds"),
    # The launcher forgets sdS's share of the dynamic shared memory.
    "launcher_smem_without_sds": ("run_bwd", [
        ("ds_smem = kBlockN * (kBlockMq + 8) * 2", "ds_smem = 0")], "outside the launch's dynamic"),
    # The convert grid counts rows x heads threads, not rows x heads x D/8: most of dq is unwritten.
    "convert_grid_one_thread_per_row": ("run_bwd", [
        ("blocks(rows * p.heads_q * (D // 8), 256)", "blocks(rows * p.heads_q, 256)")], "dq: unwritten"),
}


@pytest.mark.parametrize("slip", [None, *SLIPS])
def test_model_catches_atomic_dq_slips(slip, monkeypatch):
    # One small case reaches every slip: D = 96 (two column slabs per query tile), GQA 2/1 (two
    # iterations, both Q/dO stages), Sq = 20 (a partial query block in the last sequence).
    # slip None: the unedited model passes on it.
    if slip is not None:
        func, edits, error = SLIPS[slip]
        monkeypatch.setattr(M, func, _mutant(func, edits))
    torch.manual_seed(2)
    args = qkv(1, 20, 24, 2, 1, 96)
    if slip is None:
        run_and_check(*args, causal=False, deterministic=False)
    else:
        with pytest.raises(AssertionError, match=error):
            run_and_check(*args, causal=False, deterministic=False)


def _random_case(seed):
    """A shape from the space the kernels must cover: D 64/96/128, causal or full, batched or varlen
    cycle with the seed; drawn at random: MHA/GQA/MQA, Sq above or below Sk and partial blocks
    (batched), empty documents and documents without keys or without queries (varlen), rows padded
    past D (a strided view, as a fused projection gives) or not."""
    rng = np.random.default_rng(seed)
    case = dict(D=(64, 96, 128)[seed % 3], causal=seed % 2 == 0, Hk=int(rng.integers(1, 3)),
                group=int(rng.integers(1, 4)), pad=int(rng.choice([0, 8, 24])))
    if seed // 2 % 2:
        n = int(rng.integers(2, 5))
        case.update(lq=rng.integers(0, 40, n).tolist(), lk=rng.integers(0, 40, n).tolist())
    else:
        case.update(B=int(rng.integers(1, 3)), Sq=int(rng.integers(1, 70)), Sk=int(rng.integers(1, 70)))
    return case


RANDOM_CASES = [_random_case(seed) for seed in range(4)]


def _case_id(case):
    return "-".join(f"{k}{'_'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in case.items())


@pytest.mark.parametrize("case", RANDOM_CASES, ids=_case_id)
@pytest.mark.parametrize("deterministic", [True, False], ids=["dq_kernel", "atomic_dq"])
def test_kernel_model_random_shapes(case, deterministic):
    torch.manual_seed(3)
    D, Hk, pad = case["D"], case["Hk"], case["pad"]
    Hq = Hk * case["group"]
    lead = (sum(case["lq"]),) if "lq" in case else (case["B"], case["Sq"])
    lead_k = (sum(case["lk"]),) if "lk" in case else (case["B"], case["Sk"])
    q = torch.randn(*lead, Hq, D + pad, dtype=torch.float64)[..., :D]
    k, v = (torch.randn(*lead_k, Hk, D + pad, dtype=torch.float64)[..., :D] for _ in range(2))
    if "lq" in case:
        cu_q, cu_k = [0, *np.cumsum(case["lq"]).tolist()], [0, *np.cumsum(case["lk"]).tolist()]
        run_and_check(q, k, v, case["causal"], cu_q, cu_k, max_q=max(case["lq"]), max_k=max(case["lk"]),
                      deterministic=deterministic)
    else:
        run_and_check(q, k, v, case["causal"], deterministic=deterministic)
