"""fmcore's flash-attention CUDA binding and kernels (csrc/kernels/attention.cu and its parts, their
inline PTX through fmsim_ptx.h) executed on the CPU by fmsim, through the public API.

The `kernels_on_sim` fixture points the CPU kernels of fmcore::flash_attn_fwd/bwd at
torch.ops.fmcore_sim's (the CUDA binding on CPU tensors), so that flash_attention,
flash_attention_varlen and their autograd run the CUDA code, and tests/ops/test_attention.py's checks
apply unchanged: a float64 reference, at most twice the error of torch's own same-dtype attention,
outputs poisoned with NaN before the kernels run (tests/conftest.py). Both dq paths (atomic, the
default, and deterministic) run everywhere.

Shapes are smaller than the CUDA tests' (every CUDA thread is an OS thread here) but chosen to reach
each kernel's paths: partial and several query/key blocks per head dim's tiles, the diagonal offsets,
GQA/MQA, rows that see no key, empty sequences, varlen documents. What fmsim cannot say: speed, and
the hardware's MMA accumulation order (it sums in double).
"""

import math
import warnings

import pytest
import torch

from fmcore._C import attention_tile_configs
from fmcore.ops import flash_attention
from tests.ops import test_attention as ta

pytestmark = pytest.mark.filterwarnings("ignore:fmcore..flash_attn_bwd with deterministic=False")

DQ_PATHS = pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])


@pytest.fixture
def kernels_on_sim(sim):
    lib = torch.library.Library("fmcore", "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel")
        lib.impl("flash_attn_fwd", sim.flash_attn_fwd, "CPU")
        lib.impl("flash_attn_bwd", sim.flash_attn_bwd, "CPU")
        lib.impl("flash_attn_qkvpacked_bwd", sim.flash_attn_qkvpacked_bwd, "CPU")
    yield
    lib._destroy()  # the CPU reference kernels are back


def test_the_fixture_runs_the_cuda_binding(kernels_on_sim):
    # The CUDA binding's own check (fp32 is not a kernel dtype), which the CPU reference lacks.
    q = torch.randn(1, 4, 2, 64)
    with pytest.raises(ValueError, match="expected q to be bfloat16 or float16 on CUDA"):
        flash_attention(q, q, q)


# (B, Sq, Sk, Hq, Hk, D) and why. Forward tiles: 128 queries x 64 keys (D 64) or 32 keys (D 96,
# 128); dk/dv: 64 keys x 64 (32) queries; dq: 128 (64) queries x 32 keys.
SHAPES = [
    (1, 1, 1, 1, 1, 64),  # one token
    (2, 17, 17, 2, 2, 64),  # B = 2, less than one block of anything
    (1, 130, 130, 2, 1, 128),  # a 2-row second query block, GQA, D = 128
    (1, 70, 70, 3, 1, 96),  # MQA, D = 96, several key blocks with a partial last one
    (1, 17, 150, 2, 2, 128),  # Sq < Sk: causal rows see a prefix of 134 keys and more
    (1, 150, 17, 2, 1, 64),  # Sq > Sk: causal rows 0..132 see no key (out 0, lse -inf)
    (1, 1, 300, 1, 1, 64),  # decoding-like: one query, five key blocks
]


@DQ_PATHS
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(kernels_on_sim, shape, causal, deterministic):
    torch.manual_seed(0)
    ta.check_against_reference(*ta.make_qkv(*shape, "cpu", torch.bfloat16), causal,
                               deterministic=deterministic)


@DQ_PATHS
@pytest.mark.parametrize("shape", [(2, 33, 70, 4, 2, 64), (1, 70, 33, 2, 2, 96), (1, 40, 40, 1, 1, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_float16(kernels_on_sim, shape, deterministic):
    torch.manual_seed(1)
    ta.check_against_reference(*ta.make_qkv(*shape, "cpu", torch.float16), causal=True, scale=0.3,
                               deterministic=deterministic)


@DQ_PATHS
@pytest.mark.parametrize("scale", [-0.3, 0.0], ids=["negative", "zero"])
def test_softmax_scale_sign(kernels_on_sim, scale, deterministic):
    # The forward's running max is taken over raw scores (the scale is folded into the exponent):
    # a negative scale must rank them reversed, a zero one keep masked keys at p = 0 (0 * -inf is
    # NaN). Two key blocks, the second partial, both straddling the diagonal.
    torch.manual_seed(3)
    ta.check_against_reference(*ta.make_qkv(1, 70, 100, 2, 1, 64, "cpu", torch.bfloat16), causal=True,
                               scale=scale, deterministic=deterministic)


@DQ_PATHS
@pytest.mark.parametrize("D", [64, 128])
def test_causal_diagonal_offsets(kernels_on_sim, D, deterministic):
    # Whether a tile straddles the diagonal depends on Sk - Sq modulo the block sizes: offsets
    # around 0 and +-32, +-64 at Sq = 70 (the GPU test sweeps every offset in [-129, 129]).
    torch.manual_seed(10)
    ta.check_causal_offsets("cpu", 70, (-65, -64, -33, -1, 0, 1, 31, 32, 63, 64, 65), 1, D, deterministic)


@DQ_PATHS
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("tiles", range(1, attention_tile_configs))
@pytest.mark.parametrize("shape", [(1, 150, 140, 2, 1, 64), (1, 70, 130, 3, 1, 96), (1, 130, 70, 2, 2, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_tile_configs(kernels_on_sim, shape, tiles, causal, deterministic):
    # The alternatives the benchmark times beside the default: 8-warp CTAs (tiles=2), steps of up to
    # 128 keys (tiles=1) and the wgmma forward (tiles=3 and 4: 128 queries against 128 or 64 keys a
    # step; 5: 3 with the softmax under the P V; 6: 5 on 64 queries a CTA; D = 96 falls back to
    # tiles=0), each with a partial last block, at every head dim.
    torch.manual_seed(15)
    ta.check_against_reference(*ta.make_qkv(*shape, "cpu", torch.bfloat16), causal, deterministic=deterministic,
                               tiles=tiles)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("tiles,D", [(3, 64), (5, 64), (6, 64), (6, 128)])
def test_wgmma_forward_many_key_blocks(kernels_on_sim, tiles, D, causal):
    # Six blocks of 128 keys (tiles=6 at D = 128: eleven of 64): the forward's two-stage K and V
    # rings wrap around several times (in tiles=5 and 6, K runs a block ahead of V in rings of
    # their own).
    torch.manual_seed(17)
    ta.check_against_reference(*ta.make_qkv(1, 64, 700, 2, 1, D, "cpu", torch.bfloat16), causal, tiles=tiles)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("tiles,D", [(0, 64), (0, 128), (1, 64), (3, 64), (3, 128), (5, 64), (6, 128)])
def test_rising_scores(kernels_on_sim, tiles, D, causal):
    # Scores that climb slowly, jump and drop along the keys (ta.make_rising_qkv): the forward's
    # lazy rescale both keeps rows' stale maxima and rescales, on mma.sync (0, 1: 32- to 128-key
    # steps) and wgmma (3; 5 and 6 rescale after the P V's wait).
    torch.manual_seed(18)
    ta.check_against_reference(*ta.make_rising_qkv(1, 70, 400, 2, 1, D, "cpu", torch.bfloat16), causal, tiles=tiles)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("varlen", [False, True], ids=["batched", "varlen"])
@pytest.mark.parametrize("tiles,D", [(0, 64), (0, 96), (4, 128), (6, 64)])
def test_qkvpacked(kernels_on_sim, tiles, D, varlen, causal):
    # The backward writing dq, dk, dv into strided views of one gradient (the qkv-packed op): the
    # mma.sync kernels and the wgmma dk/dv (tiles 4, 6), with dq by both paths (atomic: the convert
    # kernel writes it). Equal to the unpacked op's gradients, stacked.
    ta.check_qkvpacked("cpu", varlen, causal, tiles=tiles, D=D, atomics=True)


@DQ_PATHS
@pytest.mark.parametrize("tiles", range(1, attention_tile_configs))
def test_tile_configs_diagonal_offsets(kernels_on_sim, tiles, deterministic):
    # Offsets around multiples of the 64- and 128-row blocks these configurations add (D = 64 has
    # tiles=1's 128-key forward steps; the GPU test sweeps every offset in [-129, 129]).
    torch.manual_seed(16)
    ta.check_causal_offsets("cpu", 130, (-129, -128, -65, -64, -1, 0, 1, 63, 64, 127, 128, 129), 1, 64,
                            deterministic, tiles)


@DQ_PATHS
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("same_lengths", [True, False], ids=["self", "cross"])
@pytest.mark.parametrize("tiles", [0, 3, 4, 6])
def test_varlen(kernels_on_sim, causal, same_lengths, deterministic, tiles):
    # Documents of length 1, one longer than a block, one with no keys and one with no queries; with
    # the default kernels and the wgmma ones (whose 128- or 64-key blocks span several short
    # documents; 3's backward CTAs have two warpgroups, 4's and 6's one; 6's forward CTAs one).
    ta.check_varlen("cpu", causal, same_lengths, Hq=2, Hk=1, deterministic=deterministic, tiles=tiles)


@pytest.mark.parametrize("Hq,Hk,D,dtype", [(3, 1, 96, torch.bfloat16), (2, 2, 128, torch.float16)], ids=str)
def test_varlen_head_dims_dtypes(kernels_on_sim, Hq, Hk, D, dtype):
    ta.check_varlen("cpu", True, False, Hq, Hk, D, dtype)


# (window, causal, (B, Sq, Sk, Hq, Hk, D), why): sliding windows through the kernels' masks (mask_block's
# two-sided rows, pt_from_st's query ends) and block ranges (key_blocks' first block, QueryWalk's last).
SIM_WINDOWS = [
    ((0, 0), False, (1, 70, 70, 2, 1, 64), "one key a row: both sides cut every block"),
    ((3, -1), False, (1, 130, 150, 2, 1, 128), "a left bound alone, Sq < Sk, GQA, D = 128"),
    ((-1, 5), False, (1, 150, 17, 2, 1, 64), "a right bound past the diagonal, Sq > Sk: rows without keys"),
    ((17, 0), True, (1, 70, 100, 3, 1, 96), "causal with a left bound, MQA, D = 96"),
    ((40, 33), False, (2, 100, 100, 2, 2, 64), "both bounds across block edges, B = 2"),
]


@DQ_PATHS
@pytest.mark.parametrize("window,causal,shape,why", SIM_WINDOWS, ids=[w[3].split(":")[0] for w in SIM_WINDOWS])
def test_window(kernels_on_sim, window, causal, shape, why, deterministic):
    torch.manual_seed(40)
    ta.check_against_reference(*ta.make_qkv(*shape, "cpu", torch.bfloat16), causal, deterministic=deterministic,
                               window=window)


@DQ_PATHS
def test_window_skips_key_blocks_of_a_long_sequence(kernels_on_sim, deterministic):
    # Sq = Sk = 700 with window (64, 0): each query block sees two or three of the eleven 64-key
    # blocks (the forward and the dq kernel start at the block of their first row's window, the
    # dk/dv CTAs stop at the last query block that sees their keys): whole key blocks in the middle
    # of the sequence are skipped, and the window's first block is cut row by row. A block skipped
    # wrongly shows up here as a wrong result; one visited needlessly only as time (on fmsim:
    # forward 3.2 s against causal's 7.4, backward 11.9 s against 24.4).
    torch.manual_seed(41)
    ta.check_against_reference(*ta.make_qkv(1, 700, 700, 2, 1, 64, "cpu", torch.bfloat16), True,
                               deterministic=deterministic, window=(64, 0))


@pytest.mark.parametrize("tiles", [2, 5])
def test_window_tile_configs(kernels_on_sim, tiles):
    # Windowed calls run tile configuration 0's windowed kernels whatever the tiles (attention.cu):
    # from an mma.sync alternative (2) and a wgmma one (5), against a window cutting blocks on both
    # sides.
    torch.manual_seed(42)
    ta.check_against_reference(*ta.make_qkv(1, 150, 140, 2, 1, 64, "cpu", torch.bfloat16), False,
                               tiles=tiles, window=(20, 9))


def test_window_varlen(kernels_on_sim):
    # Documents of awkward lengths, cross (one without keys, one without queries), each windowed
    # from its own bottom-right corner.
    ta.check_varlen("cpu", True, False, Hq=2, Hk=1, window=(13, -1))


def test_rows_without_keys_give_zero_and_neg_inf(kernels_on_sim):
    ta.test_rows_without_keys_give_zero_and_neg_inf(torch.device("cpu"))


@pytest.mark.parametrize("Sq,Sk,Hq", [(0, 5, 2), (5, 0, 2), (0, 0, 2), (5, 5, 0)])
def test_empty_sequences(kernels_on_sim, Sq, Sk, Hq):
    # Hq = 0 with Hk = 1: the dk/dv kernel alone writes dk/dv's zeros.
    ta.test_empty_sequences(torch.device("cpu"), Sq, Sk, Hq)


def test_strided_qkv_from_fused_projection(kernels_on_sim):
    ta.test_strided_qkv_from_fused_projection(torch.device("cpu"))


@pytest.mark.parametrize("pad", [8, 3, 4], ids=["rows_pad8_in_place", "rows_pad3_copied", "heads_pad4_copied"])
def test_strides_the_kernels_cannot_read_in_place(kernels_on_sim, pad):
    ta.test_strides_the_kernels_cannot_read_in_place(torch.device("cpu"), pad)


@pytest.mark.parametrize("shape,causal", [((2, 37, 50, 4, 2, 64), True), ((1, 70, 70, 2, 1, 128), False)],
                         ids=["causal_gqa", "full_mqa"])
def test_lse_gradient(kernels_on_sim, shape, causal):
    # dlse enters through the delta kernel
    ta.test_lse_gradient_matches_reference(torch.device("cpu"), shape, causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dq_paths_agree(kernels_on_sim, causal):
    # (fmsim runs blocks in order, so here the atomic path is reproducible too)
    torch.manual_seed(12)
    ta.check_dq_paths_agree(*ta.make_qkv(2, 100, 90, 4, 2, 64, "cpu", torch.bfloat16), causal)


def test_binding_rejects_what_the_kernels_cannot_run(kernels_on_sim):
    # More kv heads than a grid dim holds (Hq = 0 passes the divisibility check), and a head dim
    # without a kernel: ValueErrors naming them, before any launch.
    q = torch.empty(1, 4, 0, 64, dtype=torch.bfloat16)
    k = torch.zeros(1, 4, 65536, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="65535 heads"):
        flash_attention(q, k, k)
    q = torch.randn(1, 4, 2, 80, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head dim of 64, 96 or 128"):
        flash_attention(q, q, q)


def _nan_pattern_and_values_agree(got, want, name):
    assert torch.equal(got.isnan(), want.isnan()), f"{name}: NaN where the reference has none, or none where it has"
    torch.testing.assert_close(got.nan_to_num(0).float(), want.nan_to_num(0).float(), atol=2e-2, rtol=2e-2,
                               msg=lambda m: f"{name}: {m}")


@DQ_PATHS
@pytest.mark.parametrize("tiles", [0, 3])
def test_nan_rows_keep_nan_lse_and_gradients(sim, tiles, deterministic):
    # A NaN score (here key 4: rows 4 and 5 see it) makes the row's sum NaN. write_rows turned every
    # sum that is not > 0 into lse -inf, the mark of a row that sees no key: the backward then took
    # P = 0 for rows 4 and 5 and dropped their (NaN) gradient, so dv of keys 0..3 came out finite and
    # dv[5] 0, where the reference and torch give NaN. A NaN scale (fmaxf picked FLT_MIN for it) ran
    # the forward as with scale 0: a finite output and lse, with a NaN backward.
    torch.manual_seed(21)
    S, D = 6, 64
    q, k, v = (torch.randn(1, S, 1, D, dtype=torch.bfloat16) for _ in range(3))
    k[0, 4, 0, 5] = float("nan")
    dout = torch.randn_like(q)
    for kk, scale, what in ((k, D**-0.5, "NaN key"), (k.clone().fill_(0.5), float("nan"), "NaN scale")):
        outs = [op.flash_attn_fwd(q, kk, v, None, None, S, S, True, scale, deterministic, tiles)
                for op in (sim, torch.ops.fmcore)]
        for (o, lse), name in zip(zip(*outs), ("out", "lse")):
            _nan_pattern_and_values_agree(o, lse, f"{what} {name}")
        grads = [op.flash_attn_bwd(dout, q, kk, v, o, lse, None, None, None, S, S, True, scale, deterministic, tiles)
                 for op, (o, lse) in zip((sim, torch.ops.fmcore), outs)]
        for g, r, name in zip(*grads, ("dq", "dk", "dv")):
            _nan_pattern_and_values_agree(g, r, f"{what} {name}")
    assert outs[0][1].isnan().all()  # the NaN scale's lse


# (tiles, (B, Sq, Sk, Hq, Hk, D)): the last query block partial in each: 70 rows in 64-row dk/dv
# steps (config 0 at D = 64, the wgmma 3 and 6), 96 in 64 (4 at D = 128; config 0 takes 32, none
# past the end: finite before too), and Sq > Sk (causal rows 0..59 see no key).
MINUS_INF_KEY = [(0, (1, 70, 70, 2, 1, 64)), (3, (1, 70, 70, 2, 1, 64)), (6, (1, 70, 70, 2, 1, 64)),
                 (0, (1, 96, 96, 2, 1, 128)), (4, (1, 96, 96, 2, 1, 128)), (2, (1, 100, 40, 2, 1, 64))]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("tiles,shape", MINUS_INF_KEY, ids=[f"tiles{t}-" + "x".join(map(str, s)) for t, s in MINUS_INF_KEY])
def test_minus_inf_key_keeps_dk_dv_finite(sim, tiles, shape, causal):
    # A key of -inf against queries > 0 scores -inf: P = 0, as a hidden key, so out, lse, dk and dv
    # are finite (torch's too). The query rows past the sequence end, zero in the dk/dv kernels'
    # tiles, scored 0 * -inf = NaN against it, and their lse of +inf (P = 2^(S - inf) = 0 for any
    # finite S) let the NaN through: that key's dk and dv came out NaN. dq is NaN, as torch's and
    # the reference's (0 * -inf in dS K), in the rows that see the key; the kernels may also give
    # it to rows of the same tiles that do not (where the dense reference is NaN too).
    B, Sq, Sk, Hq, Hk, D = shape
    torch.manual_seed(22)
    q = (torch.rand(B, Sq, Hq, D) + 0.1).bfloat16()
    k, v, dout = torch.randn(B, Sk, Hk, D).bfloat16(), torch.randn(B, Sk, Hk, D).bfloat16(), torch.randn_like(q)
    k[:, 5] = -math.inf
    scale = D**-0.5
    for det in (False, True):
        out, lse = sim.flash_attn_fwd(q, k, v, None, None, Sq, Sk, causal, scale, det, tiles)
        got = sim.flash_attn_bwd(dout, q, k, v, out, lse, None, None, None, Sq, Sk, causal, scale, det, tiles)
        q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
        ref_out, ref_lse = ta.reference(q64, k64, v64, causal, scale)
        want = torch.autograd.grad(ref_out, (q64, k64, v64), dout.double())
        _nan_pattern_and_values_agree(out, ref_out, "out")
        _nan_pattern_and_values_agree(lse, ref_lse.float(), "lse")
        for g, r, name in zip(got[1:], want[1:], ("dk", "dv")):
            bad = g.isnan().nonzero()[:, 1].unique().tolist()
            assert not bad, f"{name} (deterministic={det}): NaN at keys {bad}"
            _nan_pattern_and_values_agree(g, r, name)
        assert not (got[0].isnan() & ~want[0].isnan()).any(), "dq: NaN where the reference has none"
        finite = ~want[0].isnan()
        torch.testing.assert_close(got[0][finite].float(), want[0][finite].float(), atol=2e-2, rtol=2e-2)
