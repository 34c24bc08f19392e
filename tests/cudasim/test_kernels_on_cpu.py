"""fmcore's CUDA kernels and bindings (rope, cross_entropy, add_norm, bias_gelu, swiglu, adamw),
executed on the CPU by fmsim (tests/cudasim/fmsim.h), against fmcore's CPU reference ops on the same inputs.

`sim.X` is torch.ops.fmcore_sim.X: the CUDA binding (csrc/ops/X_cuda.cpp) and its kernels, each
CUDA thread a real OS thread; `ref.X` is torch.ops.fmcore.X, the CPU reference. Shapes are chosen
to reach every kernel path (vector widths, warp/block rows, scalar fallbacks for misaligned
pointers, grid-stride loops on the simulator's 4-SM device); each says which. Tolerances: the
kernels accumulate in fp32 in another order than the reference, and round to bf16/fp16 once.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fmcore  # noqa: F401  (registers torch.ops.fmcore, the CPU reference)

ref = torch.ops.fmcore
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def close(a, b, dtype=None, name="", **tol):
    kw = dict(TOL[dtype or b.dtype])
    kw.update({k: v for k, v in tol.items() if v is not None})
    torch.testing.assert_close(a, b, **kw, equal_nan=True, msg=lambda m: f"{name}: {m}")


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose data pointer is one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


# ---- rope

# (D, R, why)
ROPE_DIMS = [
    (64, 64, "full rotary dim: 16-byte vectors for every dtype"),
    (96, 32, "partial rotary dim: the pass-through copy runs (vectorised)"),
    (80, 20, "R/2 = 10 is no multiple of a bf16/fp16 vector: the scalar path"),
    (6, 2, "tiny head: one pair per head"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D,R,why", ROPE_DIMS)
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope(sim, dtype, D, R, why, interleaved):
    B, S, Hq, Hk = 2, 5, 3, 1  # GQA: k has fewer heads
    q, k = rand(B, S, Hq, D, dtype=dtype), rand(B, S, Hk, D, dtype=dtype, seed=1)
    cos, sin = rand(S + 3, R // 2, seed=2), rand(S + 3, R // 2, seed=3)  # S' > S
    for conj in (False, True):
        got = sim.rope(q, k, cos, sin, interleaved, conj)
        want = ref.rope(q, k, cos, sin, interleaved, conj)
        for g, w, n in zip(got, want, "qk"):
            close(g, w, name=f"{n} conj={conj}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_inplace_layouts(sim, dtype):
    # (B, H, S, D) with seq_dim=2; cos/sin per batch in x's dtype; q/k as strided slices of a fused
    # qkv projection; then the same in place.
    B, S, H, D = 2, 7, 4, 32
    q, k = rand(B, H, S, D, dtype=dtype), rand(B, H, S, D, dtype=dtype, seed=1)
    cos, sin = rand(B, S, D // 2, dtype=dtype, seed=2), rand(B, S, D // 2, dtype=dtype, seed=3)
    for g, w in zip(sim.rope(q, k, cos, sin, False, False, 2), ref.rope(q, k, cos, sin, False, False, 2)):
        close(g, w)
    qkv = rand(B, S, 3 * H, D, dtype=dtype, seed=4)
    q, k = qkv[:, :, :H], qkv[:, :, H : 2 * H]
    want = ref.rope(q, k, cos, sin, True, False)
    a, b = q.clone(), k.clone()
    for g, w in zip(sim.rope(q, k, cos, sin, True, False), want):
        close(g, w)
    qkv2 = qkv.clone()
    sim.rope_(qkv2[:, :, :H], qkv2[:, :, H : 2 * H], cos, sin, True, False)
    close(qkv2[:, :, :H], want[0])
    close(qkv2[:, :, H : 2 * H], want[1])
    assert torch.equal(qkv2[:, :, 2 * H :], qkv[:, :, 2 * H :])  # v untouched
    assert torch.equal(q, a) and torch.equal(k, b)  # out-of-place left its inputs alone


def test_rope_misaligned_takes_scalar_path(sim):
    # A data pointer off a 16-byte boundary must not take the vector path (the simulator faults on a
    # misaligned 16-byte access), and in place the pass-through features stay as they were.
    B, S, H, D, R = 1, 3, 2, 64, 32
    q = misaligned(rand(B, S, H, D, dtype=torch.bfloat16))
    k = misaligned(rand(B, S, H, D, dtype=torch.bfloat16, seed=1))
    cos, sin = rand(S, R // 2, seed=2), rand(S, R // 2, seed=3)
    want = ref.rope(q, k, cos, sin)
    for g, w in zip(sim.rope(q, k, cos, sin), want):
        close(g, w)
    sim.rope_(q, k, cos, sin)
    close(q, want[0])
    close(k, want[1])


def at_byte_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous copy of t whose data pointer is `offset` bytes past a 32-byte boundary."""
    buf = torch.empty(t.numel() + 64 // t.element_size(), dtype=t.dtype)
    start = (offset - buf.data_ptr()) % 64 // t.element_size()
    out = buf[start : start + t.numel()].view(t.shape).copy_(t)
    assert out.data_ptr() % 32 == offset
    return out


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("layout", ["strided", "16 bytes off", "aligned"])
def test_rope_cos_sin_alignment(sim, interleaved, layout):
    # q/k take the 16-byte path whatever cos/sin are. cos/sin, read from global memory, take one
    # access per 8 fp32 values (rotate-half, 32 bytes) or 4 (interleaved, 16 bytes) only where their
    # pointers and row strides allow; else one value at a time (the simulator faults on a misaligned
    # Vec). "strided": rows of a wider table, an odd row stride; "16 bytes off": rotate-half's
    # 32-byte access is refused, interleaved's 16-byte one allowed.
    B, S, H, D = 2, 3, 2, 32
    q, k = rand(B, S, H, D, dtype=torch.bfloat16), rand(B, S, H, D, dtype=torch.bfloat16, seed=1)
    cos, sin = rand(S, D // 2, seed=2), rand(S, D // 2, seed=3)
    if layout == "strided":
        cos, sin = (torch.cat([t, t[:, :1]], 1)[:, : D // 2] for t in (cos, sin))
        assert cos.stride(0) == D // 2 + 1
    elif layout == "16 bytes off":
        cos, sin = at_byte_offset(cos, 16), at_byte_offset(sin, 16)
    else:
        cos, sin = at_byte_offset(cos, 0), at_byte_offset(sin, 0)
    for conj in (False, True):
        want = ref.rope(q, k, cos, sin, interleaved, conj)
        for g, w in zip(sim.rope(q, k, cos, sin, interleaved, conj), want):
            close(g, w, name=layout)


def test_rope_row_past_one_block(sim):
    # 48 q heads + 16 k heads of 10 fp32 items (6 rotated pairs of vectors, 4 copied vectors: out of
    # place, the pass-through features past R count): 640 items a row, more than the 512-thread
    # block, so threads loop, and the loop's second pass holds all of k's items.
    B, S, Hq, Hk, D, R = 1, 2, 48, 16, 64, 48
    q, k = rand(B, S, Hq, D), rand(B, S, Hk, D, seed=1)
    cos, sin = rand(S, R // 2, seed=2), rand(S, R // 2, seed=3)
    for conj in (False, True):
        for g, w in zip(sim.rope(q, k, cos, sin, False, conj), ref.rope(q, k, cos, sin, False, conj)):
            close(g, w)


# ---- cross entropy

# (N, V, why)
CE_SHAPES = [
    (5, 7, "V = 7: fewer elements than one vector, every row misaligned; 32 threads"),
    (6, 1000, "aligned rows, the unrolled vector loop and its remainder"),
    (3, 50257, "GPT-2's vocabulary: every row starts misaligned, 512 threads"),
]


def ce_inputs(N, V, dtype, target_dtype=torch.int64, seed=0):
    logits = rand(N, V, dtype=dtype, seed=seed, scale=3.0)
    g = torch.Generator().manual_seed(seed + 1)
    target = torch.randint(0, V, (N,), generator=g).to(target_dtype)
    target[1] = -100  # an ignored row
    return logits, target


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,V,why", CE_SHAPES)
def test_cross_entropy(sim, dtype, N, V, why):
    tdtype = torch.int32 if dtype == torch.float16 else torch.int64
    logits, target = ce_inputs(N, V, dtype, tdtype)
    grad_loss = rand(N, seed=5)
    grad_loss[0] = 0.0  # a zero factor: the backward writes zeros without reading the row
    for ls, zl in [(0.0, 0.0), (0.1, 1e-3)]:
        opts = (-100, ls, zl)
        loss, stats = sim.cross_entropy_fwd(logits, target, *opts)
        rloss, rstats = ref.cross_entropy_fwd(logits, target, *opts)
        close(loss, rloss, torch.float32, f"loss ls={ls}", rtol=1e-4, atol=1e-4)
        close(stats, rstats, torch.float32, f"stats ls={ls}", rtol=1e-4, atol=1e-4)
        got = sim.cross_entropy_bwd(logits, target, stats, grad_loss, *opts)
        want = ref.cross_entropy_bwd(logits, target, rstats, grad_loss, *opts)
        close(got, want, dtype, f"grad ls={ls}", atol=TOL[dtype]["atol"] / 10)
        inplace = logits.clone()
        sim.cross_entropy_bwd_(inplace, target, stats, grad_loss, *opts)
        close(inplace, want, dtype, f"grad in place ls={ls}", atol=TOL[dtype]["atol"] / 10)
        # the fused path (linear_cross_entropy's), the factor per row
        fused = logits.clone()
        floss, fstats = sim.cross_entropy_fwd_bwd_(fused, target, grad_loss, *opts)
        close(floss, rloss, torch.float32, "fused loss", rtol=1e-4, atol=1e-4)
        close(fused, want, dtype, f"fused grad ls={ls}", atol=TOL[dtype]["atol"] / 10)


def test_cross_entropy_strided_rows_and_scale(sim):
    # logits rows with a padded stride (row starts at odd offsets for bf16); a broadcast factor;
    # cross_entropy_scale_ leaves rows whose factor is exactly 1 untouched.
    V = 333
    big = rand(4, V + 5, dtype=torch.bfloat16, scale=2.0)
    logits = big[:, :V]
    target = torch.tensor([3, 332, 0, -100])
    one = torch.ones(1).expand(4)
    loss, stats = sim.cross_entropy_fwd(logits, target)
    rloss, rstats = ref.cross_entropy_fwd(logits, target)
    close(loss, rloss, torch.float32, rtol=1e-4, atol=1e-4)
    close(sim.cross_entropy_bwd(logits, target, stats, one), ref.cross_entropy_bwd(logits, target, rstats, one))
    factor = torch.tensor([2.0, 1.0, -0.5, 0.0])
    a, b = big.clone(), big.clone()
    sim.cross_entropy_scale_(a[:, :V], factor)
    ref.cross_entropy_scale_(b[:, :V], factor)
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [7, -1, 1 << 40])
def test_cross_entropy_bad_target_raises(sim, bad):
    logits, target = ce_inputs(4, 7, torch.float32)
    target[2] = bad
    with pytest.raises(ValueError, match=r"expected target values in \[0, 7\)"):
        sim.cross_entropy_fwd(logits, target)
    with pytest.raises(ValueError, match=r"expected target values in \[0, 7\)"):
        sim.cross_entropy_fwd_bwd_(logits.clone(), target, torch.ones(4))


def test_cross_entropy_extreme_logits(sim):
    # -inf logits (masked vocabulary) and a large offset: the online max/sum-exp must stay finite.
    logits = rand(3, 100, scale=2.0) + 1e4
    logits[:, 50:] = -math.inf
    target = torch.tensor([1, 49, 10])
    loss, stats = sim.cross_entropy_fwd(logits, target)
    rloss, rstats = ref.cross_entropy_fwd(logits, target)
    close(loss, rloss, rtol=1e-4, atol=1e-3)
    g = sim.cross_entropy_bwd(logits, target, stats, torch.ones(3))
    close(g, ref.cross_entropy_bwd(logits, target, rstats, torch.ones(3)))


def test_cross_entropy_label_smoothing_large_offset(sim):
    # Label smoothing's mean logit: the kernel sums x - x0 (the row's first logit), not x, which lost
    # the rows' spread to a common offset and overflowed at 3e38 (loss -inf where torch's is finite).
    logits = rand(3, 5000, scale=3.0) + 6e4
    target = torch.tensor([1, 4999, 10])
    want = F.cross_entropy(logits.double(), target, label_smoothing=0.1, reduction="none")
    loss, _ = sim.cross_entropy_fwd(logits, target, -100, 0.1, 0.0)
    torch_err = (F.cross_entropy(logits, target, label_smoothing=0.1, reduction="none") - want).abs().max()
    assert (loss.double() - want).abs().max() <= 4 * torch_err + 1e-5
    huge = torch.tensor([[2e38, 2e38, 1.0], [3e38, 3e38, 3e38], [1.0, -math.inf, 2.0]])
    target = torch.tensor([2, 1, 0])
    loss, _ = sim.cross_entropy_fwd(huge, target, -100, 0.1, 0.0)
    close(loss, F.cross_entropy(huge, target, label_smoothing=0.1, reduction="none"), rtol=1e-5, atol=1e-5)


# ---- add_norm

# (rows, D, why): the kernel variant each selects (norm.cu choose_layout)
NORM_SHAPES = [
    (300, 64, "warp rows, 1 chunk a lane; 75 blocks > the 64 resident: the bwd grid-strides"),
    (37, 392, "warp rows, 2 chunks a lane, partial last chunk set"),
    (9, 1024, "warp rows, 4 chunks a lane (the largest warp row)"),
    (5, 2056, "block rows of 2 chunks (129 threads -> 160)"),
    (3, 8200, "block rows of 4 chunks (1025 chunks)"),
    (6, 7, "scalar path, D < one warp"),
    (5, 1001, "scalar path, 4 elements a thread"),
    (3, 5003, "scalar path, 16 elements a thread"),
    (2, 16383, "scalar path, 32 elements a thread, 512 threads (the largest D)"),
]


def norm_case(rows, D, dtype, rms, residual, bias, seed=0):
    x = rand(rows, D, dtype=dtype, seed=seed)
    r = rand(rows, D, dtype=torch.float32, seed=seed + 1, scale=3.0) + 1.0 if residual else None
    w = rand(D, dtype=dtype, seed=seed + 2) * 0.5 + 1.0
    b = rand(D, dtype=dtype, seed=seed + 3) if bias and not rms else None
    return x, r, w, b


def check_norm(sim, x, r, w, b, rms, out_dtype, dtype):
    got = sim.add_norm_fwd(x, r, w, b, 1e-5, rms, out_dtype)
    want = ref.add_norm_fwd(x, r, w, b, 1e-5, rms, out_dtype)
    for g, wnt, n in zip(got, want, ["out", "residual_out", "mean", "rstd"]):
        close(g, wnt, g.dtype, n)
    out, s, mean, rstd = want
    s = s if r is not None else x
    gy = rand(*x.shape, dtype=out_dtype, seed=9)
    gr = rand(*x.shape, dtype=s.dtype, seed=10) if r is not None else None
    rdt = r.dtype if r is not None else None
    # every subset of gradients on the narrower rows; the wide ones (hundreds of 1024-thread dweight
    # blocks each) only take the full backward, to keep the file's run time down
    combos = [(True, True), (True, False), (False, True)] if x.shape[-1] <= 4096 else [(True, True)]
    for gi, gw in combos:
        args = (gy, gr, s, w, mean, rstd, rms, r is not None, b is not None, x.dtype, rdt, gi, gw)
        got = sim.add_norm_bwd(*args)
        want = ref.add_norm_bwd(*args)
        for g, wnt, n in zip(got, want, ["grad_x", "grad_residual", "grad_weight", "grad_bias"]):
            # dweight/dbias sum over rows: fp32 summation order differs
            tol = dict(rtol=1e-4, atol=1e-4 * math.sqrt(x.shape[0])) if g.dtype == torch.float32 else {}
            close(g, wnt, g.dtype, f"{n} (grad_input={gi}, grad_weight={gw})", **tol)


@pytest.mark.parametrize("rows,D,why", NORM_SHAPES)
@pytest.mark.parametrize("rms", [False, True])
def test_add_norm(sim, rows, D, why, rms):
    x, r, w, b = norm_case(rows, D, torch.float32, rms, residual=True, bias=True)
    check_norm(sim, x, r, w, b, rms, torch.float32, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [256, 1000, 3000])
def test_add_norm_mixed_dtypes(sim, dtype, D):
    # bf16/fp16 branch output into an fp32 stream, normed output in the branch dtype; and without a
    # residual or bias (the backward reads s from x).
    x, r, w, b = norm_case(11, D, dtype, False, residual=True, bias=True)
    check_norm(sim, x, r, w, b, False, dtype, dtype)
    x, r, w, b = norm_case(11, D, dtype, True, residual=False, bias=False)
    check_norm(sim, x, r, w, b, True, dtype, dtype)


def test_add_norm_every_dtype_differs(sim):
    # x fp32, residual bf16 (stream fp32, so grad_residual is stored apart from grad_x), weight and
    # bias fp16, out bf16: each tensor read and written in its own dtype.
    x = rand(20, 72)
    r = rand(20, 72, dtype=torch.bfloat16, seed=1)
    w = (rand(72, seed=2) * 0.5 + 1.0).half()
    b = rand(72, seed=3).half()
    check_norm(sim, x, r, w, b, False, torch.bfloat16, torch.float32)


def test_add_norm_misaligned(sim):
    # D % 8 == 0 but x off a 16-byte boundary: the scalar path.
    x, r, w, b = norm_case(4, 512, torch.bfloat16, False, residual=True, bias=True)
    check_norm(sim, misaligned(x), r, w, b, False, torch.bfloat16, torch.bfloat16)


def test_add_norm_large_mean(sim):
    # |mean| >> std: the corrected two-pass mean keeps every output accurate.
    x = rand(8, 768) * 0.1 + 1000.0
    w = torch.ones(768)
    for g, wnt in zip(sim.add_norm_fwd(x, None, w, None, 1e-5, False, torch.float32),
                      ref.add_norm_fwd(x, None, w, None, 1e-5, False, torch.float32)):
        close(g, wnt, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("D", [64, 2056, 7], ids=["warp_row", "block_row", "scalar"])
def test_add_norm_variance_about_the_corrected_mean(sim, D, rms):
    # A constant row of 1e10 (ulp 1024): the variance about the fp32 mean held that mean's rounding
    # error squared, rstd 1e-3 for 1 / sqrt(eps) and a gradient 1e5 too small; now the variance is
    # taken about the corrected mean, as the CPU (fp64 mean) does. Ordinary rows are unchanged.
    g = torch.Generator().manual_seed(7)
    x = torch.stack([torch.full((D,), 1e10), torch.randn(D, generator=g), 1e3 + 0.07 * torch.randn(D, generator=g)])
    w, b = torch.randn(D, generator=g) * 0.1 + 1, None if rms else torch.randn(D, generator=g) * 0.1
    got = sim.add_norm_fwd(x, None, w, b, 1e-5, rms, torch.float32)
    want = ref.add_norm_fwd(x, None, w, b, 1e-5, rms, torch.float32)
    for gt, wt, n in zip(got, want, ["out", "residual_out", "mean", "rstd"]):
        close(gt, wt, name=n, rtol=1e-4, atol=1e-4)
    gy = torch.randn(x.shape, generator=g)
    args = (gy, None, x, w, want[2], want[3], rms, False, b is not None, torch.float32, None)
    close(sim.add_norm_bwd(*args)[0], ref.add_norm_bwd(*args)[0], name="grad_x", rtol=1e-3, atol=1e-3)


def overflow_rows(D, dtype):
    """Finite rows whose fp32 statistics overflow, an ordinary row between them: squares past 3.4e38
    (1e20; 1e18 summed over 2056), a sum past it (D copies of 1e38), +-3e38 (both), a spread of 1e35
    about 1e37 (the mean's own digits), and bf16's largest values; each row's values in `dtype`."""
    g = torch.Generator().manual_seed(5)
    signs = torch.arange(D) % 2 * 2.0 - 1
    rows = [torch.randn(D, generator=g) * 1e20, torch.randn(D, generator=g) * 1e18, torch.full((D,), 1e38),
            torch.randn(D, generator=g), signs * 3e38, 1e37 + torch.randn(D, generator=g) * 1e35,
            signs * torch.finfo(torch.bfloat16).max]
    return torch.stack(rows).to(dtype)


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("D,dtype", [(64, torch.float32), (2056, torch.float32), (1001, torch.float32),
                                     (1024, torch.bfloat16)], ids=["warp_row", "block_row", "scalar", "bf16"])
def test_add_norm_rows_past_fp32_range(sim, D, dtype, rms):
    # Rows whose fp32 sum of squares (or sum) overflows: rstd was NaN on CUDA (before that, 0: the
    # bias as output, as torch's fp32 statistics still give), where the CPU reference (fp64 sums)
    # normalizes them. The kernel now takes such a row's statistics again at 2^-72: the reference's
    # mean, rstd, output and gradients, to fp32 rounding (rstd is subnormal for the 3e38 rows).
    x = overflow_rows(D, dtype)
    g = torch.Generator().manual_seed(6)
    w = (1 + 0.5 * torch.randn(D, generator=g)).to(dtype)
    b = None if rms else torch.randn(D, generator=g).to(dtype)
    got = sim.add_norm_fwd(x, None, w, b, 1e-5, rms, dtype)
    want = ref.add_norm_fwd(x, None, w, b, 1e-5, rms, dtype)
    assert all(t.isfinite().all() for t in want)
    close(got[0], want[0], name="out")
    close(got[3], want[3], name="rstd", rtol=2e-5, atol=0)  # 1e-39 (3e38 rows) to 316 (the constant row)
    if not rms:  # to fp32 rounding of the row's magnitude (a mean of 0 for the +-3e38 rows)
        row_max = x.float().abs().amax(1)
        close(got[2] / row_max, want[2] / row_max, name="mean / max |x|", rtol=0, atol=1e-6)
    dy = torch.randn(x.shape, generator=g).to(dtype)
    args = (dy, None, x, w, want[2], want[3], rms, False, b is not None, dtype, None)
    for gt, wt, n in zip(sim.add_norm_bwd(*args), ref.add_norm_bwd(*args), ["grad_x", "", "grad_weight", "grad_bias"]):
        if n == "grad_x":  # rows 1e-38 (the 3e38 rows) to 316 (the constant row): each row to its own scale
            row_max = wt.float().abs().amax(1, keepdim=True)
            gt, wt = gt.float() / row_max, wt.float() / row_max
        close(gt, wt, dtype, n, atol=1e-4 if dtype == torch.float32 else None)


def test_add_norm_too_wide_raises(sim):
    x = torch.randn(2, 16385)
    with pytest.raises(ValueError, match="at most 16384 on CUDA"):
        sim.add_norm_fwd(x, None, torch.ones(16385), None, 1e-5, True, torch.float32)


# ---- bias_gelu

# (rows, D, why)
GELU_SHAPES = [
    (37, 2056, "16-byte vectors: three column tiles (the last partial), 11 row blocks of 4 rows, the last short"),
    (9, 1001, "D no multiple of 8: the scalar path, eight column tiles"),
    (3, 64, "fewer rows than row blocks would take: one row a block"),
]


@pytest.mark.parametrize("dtype,bias_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.float16, torch.float16), (torch.bfloat16, None)])
@pytest.mark.parametrize("rows,D,why", GELU_SHAPES)
@pytest.mark.parametrize("tanh", [False, True])
def test_bias_gelu(sim, rows, D, why, dtype, bias_dtype, tanh):
    x = rand(rows, D, dtype=dtype, seed=1, scale=2.0)
    b = rand(D, dtype=bias_dtype, seed=2) if bias_dtype is not None else None
    close(sim.bias_gelu(x, b, tanh), ref.bias_gelu(x, b, tanh), dtype, "out")
    g = rand(rows, D, dtype=dtype, seed=3)
    for grad_bias in (True, False):
        got, want = sim.bias_gelu_bwd(g, x, b, tanh, grad_bias), ref.bias_gelu_bwd(g, x, b, tanh, grad_bias)
        close(got[0], want[0], dtype, "grad_x")
        # the bias gradient sums rows in another order (fp32), then rounds once to its dtype
        tol = dict(rtol=1e-4, atol=1e-4 * math.sqrt(rows)) if got[1].dtype == torch.float32 else {}
        close(got[1], want[1], got[1].dtype, "grad_bias", **tol)


def test_bias_gelu_misaligned(sim):
    # a 2-byte offset on x (or the bias, or the output gradient): the scalar path, same numbers
    x, b, g = rand(5, 64, dtype=torch.bfloat16, seed=1), rand(64, seed=2), rand(5, 64, dtype=torch.bfloat16, seed=3)
    want = ref.bias_gelu(x, b, True), ref.bias_gelu_bwd(g, x, b, True, True)
    for args in [(misaligned(x), b, g), (x, misaligned(b), g), (x, b, misaligned(g))]:
        close(sim.bias_gelu(args[0], args[1], True), want[0], torch.bfloat16, "out")
        for got, wnt, n in zip(sim.bias_gelu_bwd(args[2], args[0], args[1], True, True), want[1], ["grad_x", "grad_bias"]):
            close(got, wnt, got.dtype, n, rtol=1e-4 if n == "grad_bias" else None)


def test_bias_gelu_no_rows(sim):
    # no rows: the backward still writes the bias gradient (zeros), from the row kernel's zero partials
    x, b = torch.empty(0, 40), torch.ones(40)
    gx, gb = sim.bias_gelu_bwd(x, x, b, False, True)
    assert gx.shape == (0, 40) and torch.equal(gb, torch.zeros(40))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_gelu_tanh_negative_tail(sim, dtype):
    # GELU's tanh form for z in [-9.5, -3], where tanh(u) ~ -1: the kernel's 0.5 z (1 + tanh(u)) lost
    # the value to cancellation (GELU(-5): -2.98e-7 for -2.29e-7, 30% off; GELU(-7): 0 for -2.3e-15),
    # and its gradient as much. The CPU reference's z sigmoid(2u) has no cancellation. Relative
    # errors against that form in fp64 (torch's fp64 tanh form cancels too, from z = -6), rounded to
    # the dtype: the values are far below the other tests' absolute tolerances. (From z = -9.6 the
    # CPU's exponential saturates at e^-80: 1e-34 where the kernel has the exact 1e-37.)
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # the least subnormal
    tol = dict(rtol=1e-5 if dtype == torch.float32 else TOL[dtype]["rtol"], atol=tiny)
    for shape in ((4, 30), (2, 64)):  # the scalar path (30 columns), the 8-column vector path
        z = torch.linspace(-9.5, -3, shape[0] * shape[1]).to(dtype).reshape(shape)
        zd = z.double().requires_grad_()
        want = zd * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (zd + 0.044715 * zd**3))
        want.sum().backward()
        want, want_grad = want.detach().to(dtype).double(), zd.grad.to(dtype).double()
        g = torch.ones_like(z)
        for op, name in ((sim, "sim"), (ref, "cpu")):
            torch.testing.assert_close(op.bias_gelu(z, None, True).double(), want, **tol,
                                       msg=lambda m: f"{name} out: {m}")
            torch.testing.assert_close(op.bias_gelu_bwd(g, z, None, True, False)[0].double(), want_grad, **tol,
                                       msg=lambda m: f"{name} grad: {m}")


# ---- swiglu

# (rows, F, why)
SWIGLU_SHAPES = [
    (37, 1032, "16-byte vectors: two column tiles (the second 8 columns wide), row blocks of 3, the last short"),
    (9, 1001, "F no multiple of 8: the scalar path"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,F,why", SWIGLU_SHAPES)
@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
def test_swiglu(sim, rows, F, why, dtype, packed):
    gate = rand(rows, 2 * F if packed else F, dtype=dtype, seed=1, scale=2.0)
    up = None if packed else rand(rows, F, dtype=dtype, seed=2)
    close(sim.swiglu(gate, up), ref.swiglu(gate, up), dtype, "out")
    g = rand(rows, F, dtype=dtype, seed=3)
    for got, want, n in zip(sim.swiglu_bwd(g, gate, up), ref.swiglu_bwd(g, gate, up), ["grad_gate", "grad_up"]):
        close(got, want, dtype, n)


def test_swiglu_misaligned(sim):
    # a 2-byte offset on the packed input or the output gradient: the scalar path, same numbers
    gate, g = rand(5, 128, dtype=torch.bfloat16, seed=1), rand(5, 64, dtype=torch.bfloat16, seed=3)
    want = ref.swiglu(gate, None), ref.swiglu_bwd(g, gate, None)
    for gt, gg in [(misaligned(gate), g), (gate, misaligned(g))]:
        close(sim.swiglu(gt, None), want[0], torch.bfloat16, "out")
        close(sim.swiglu_bwd(gg, gt, None)[0], want[1][0], torch.bfloat16, "grad")


# ---- adamw and the gradient norm

# Sizes: one element; one update chunk (8192) minus/plus one; a ragged 3-chunk tensor that also
# crosses a norm chunk (16384); not a multiple of the 4-element vector; empty. 20 update chunks
# in all: more than the 16 blocks resident on the 4-SM device, so blocks take several chunks.
ADAMW_SIZES = [1, 8191, 8193, 20001, 37, 0, 8192 * 12 + 5]


def adamw_state(dtype, master, sizes=ADAMW_SIZES, misalign=False, seed=0):
    params = [rand(n, dtype=dtype, seed=seed + i) for i, n in enumerate(sizes)]
    if misalign:
        params[2] = misaligned(params[2])
    grads = [rand(n, dtype=dtype, seed=100 + i) for i, n in enumerate(sizes)]
    m = [rand(n, seed=200 + i).abs() * 0.1 for i, n in enumerate(sizes)]
    v = [rand(n, seed=300 + i).abs() * 0.01 for i, n in enumerate(sizes)]
    masters = [p.float() + 1e-3 for p in params] if master else []
    steps = [torch.full((), float(i)) for i in range(len(sizes))]
    return [params, grads, m, v, masters, steps]


def clone_state(state):
    return [[t.clone() if t.data_ptr() % 16 == 0 else misaligned(t) for t in ts] for ts in state]


def step_both(sim, a, b, scalars):
    """One adamw_step_ of state a on the simulated kernels and of b on the CPU reference; every
    tensor compared after."""
    sim.adamw_step_(*a, *scalars)
    ref.adamw_step_(*b, *scalars)
    for name, ga, gb in zip(["params", "grads", "exp_avgs", "exp_avg_sqs", "masters", "steps"], a, b):
        for i, (x, y) in enumerate(zip(ga, gb)):
            # one ulp of the stored dtype: the kernel and the reference round the same fp32 math
            close(x, y, x.dtype, f"{name}[{i}]", rtol=2e-6 if x.dtype == torch.float32 else None,
                  atol=1e-7 if x.dtype == torch.float32 else None)


@pytest.mark.parametrize(
    "dtype,master", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, True)]
)
@pytest.mark.parametrize("clip", [None, 0.5])
def test_adamw_step(sim, dtype, master, clip):
    state = adamw_state(dtype, master, misalign=dtype == torch.bfloat16)
    a, b = clone_state(state), clone_state(state)
    norm = torch.tensor(0.0)
    sim.grad_norm_(a[1], norm)
    rnorm = torch.tensor(0.0)
    ref.grad_norm_(b[1], rnorm)
    close(norm, rnorm, torch.float32, "grad norm", rtol=1e-6, atol=0)
    scalars = (None, 1e-2, 0.9, 0.95, 1e-8, 0.1, rnorm, clip, False)
    step_both(sim, a, b, scalars)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adamw_master_takes_up_edited_params(sim, dtype):
    # A param edited since the last step (model.load_state_dict, an EMA copy-back: it no longer holds
    # its master rounded) is what the step updates; the master copy alone undid the edit. Vector and
    # scalar paths (sizes not multiples of 4, a misaligned tensor).
    state = adamw_state(dtype, True, misalign=True)
    for p, m in zip(state[0], state[4]):
        p.copy_(m)  # consistent: each param is its master rounded
        p[::3] = 10.0  # edited
    a, b = clone_state(state), clone_state(state)
    scalars = (None, 1e-2, 0.9, 0.95, 1e-8, 0.0, None, None, False)
    step_both(sim, a, b, scalars)
    for i, m in enumerate(a[4]):
        if m.numel():
            assert (m[::3] - 10.0).abs().max() < 1.0, f"masters[{i}]: the edit was undone"  # (the old ones: ~N(0, 1))


def test_adamw_lr_tensor_and_skip_nonfinite(sim):
    state = adamw_state(torch.float32, False, sizes=[33, 9000])
    lr = torch.tensor([3e-3])
    a, b = clone_state(state), clone_state(state)
    sim.adamw_step_(*a, lr, 0.0, 0.9, 0.999, 1e-8, 0.01, None, None, False)
    ref.adamw_step_(*b, None, 3e-3, 0.9, 0.999, 1e-8, 0.01, None, None, False)
    for ga, gb in zip(a, b):
        for x, y in zip(ga, gb):
            close(x, y, rtol=2e-6, atol=1e-7)
    # a non-finite norm skips everything, the step counters included
    before = clone_state(a)
    a[1][1][5] = math.inf
    norm, count = torch.tensor(0.0), torch.zeros((), dtype=torch.int64)
    sim.grad_norm_(a[1], norm, count)
    assert math.isinf(norm.item()) and count.item() == 1
    sim.adamw_step_(*a, lr, 0.0, 0.9, 0.999, 1e-8, 0.01, norm, 1.0, True)
    for name, ga, gb in zip(["params", "grads", "exp_avgs", "exp_avg_sqs", "masters", "steps"], a, before):
        if name == "grads":
            continue
        for x, y in zip(ga, gb):
            assert torch.equal(x, y), name


def test_grad_norm_mixed_dtypes(sim):
    # fp32, bf16 and fp16 tensors in one list (one launch per dtype), a misaligned one (scalar
    # loop), an empty one, and more chunks than resident blocks.
    ts = [rand(16384 * 3 + 1), rand(5, dtype=torch.bfloat16, seed=1),
          misaligned(rand(1001, dtype=torch.float16, seed=2)), torch.empty(0),
          rand(70001, dtype=torch.bfloat16, seed=3)] + [rand(17, seed=10 + i) for i in range(20)]
    norm, rnorm = torch.tensor(0.0), torch.tensor(0.0)
    sim.grad_norm_(ts, norm)
    ref.grad_norm_(ts, rnorm)
    close(norm, rnorm, rtol=1e-6, atol=0)
    empty = torch.tensor(1.0)
    sim.grad_norm_([torch.empty(0)], empty)
    assert empty.item() == 0.0


def test_adamw_and_grad_norm_many_tensors(sim):
    # More tensors than one launch's table holds (448 for the update, 1024 for the norm): the
    # launchers cut the list into several launches, the norm's partial sums at running offsets.
    sizes = [3] * 460 + [5000] + [1] * 600
    state = adamw_state(torch.bfloat16, True, sizes=sizes)
    a, b = clone_state(state), clone_state(state)
    norm, rnorm = torch.tensor(0.0), torch.tensor(0.0)
    sim.grad_norm_(a[1], norm)
    ref.grad_norm_(b[1], rnorm)
    close(norm, rnorm, rtol=1e-6, atol=0)
    scalars = (None, 1e-2, 0.9, 0.95, 1e-8, 0.1, rnorm, 0.5, True)
    sim.adamw_step_(*a, *scalars)
    ref.adamw_step_(*b, *scalars)
    for name, ga, gb in zip(["params", "grads", "exp_avgs", "exp_avg_sqs", "masters", "steps"], a, b):
        assert len(ga) == len(gb)
        close(torch.cat([x.float().flatten() for x in ga]), torch.cat([y.float().flatten() for y in gb]),
              torch.float32 if name != "params" else torch.bfloat16, name, rtol=2e-6 if name != "params" else None)


def test_empty_inputs(sim):
    # Nothing to launch (rows = 0) must not fail as an invalid zero-size grid; the norm backward with
    # no rows still writes zero weight/bias gradients (regression: add_norm_bwd refused the empty
    # workspace's null pointer and raised "invalid argument", tests/ops/test_norm.py::test_zero_rows
    # on CUDA).
    q = torch.empty(0, 4, 2, 8)
    cos = torch.empty(4, 4)
    for g, w in zip(sim.rope(q, q, cos, cos), ref.rope(q, q, cos, cos)):
        assert g.shape == w.shape
    loss, stats = sim.cross_entropy_fwd(torch.empty(0, 11), torch.empty(0, dtype=torch.int64))
    assert loss.shape == (0,) and stats.shape == (0, 2)
    sim.cross_entropy_scale_(torch.empty(3, 0), torch.ones(3))
    x, w = torch.empty(0, 24), torch.ones(24)
    b = torch.zeros(24)
    _, _, mean, rstd = sim.add_norm_fwd(x, None, w, b, 1e-5, False, torch.float32)
    got = sim.add_norm_bwd(x, None, x, w, mean, rstd, False, False, True, torch.float32, None, True, True)
    assert got[0].shape == (0, 24)
    assert torch.equal(got[2], torch.zeros(24)) and torch.equal(got[3], torch.zeros(24))
    state = adamw_state(torch.float32, False, sizes=[0, 0])
    sim.adamw_step_(*state, None, 1e-3, 0.9, 0.999, 1e-8, 0.0, None, None, False)
    assert [s.item() for s in state[5]] == [1.0, 2.0]  # steps count even for empty tensors
