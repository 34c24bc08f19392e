"""The wgmma building blocks of attention's Hopper kernels, on the GPU (csrc/kernels/wgmma_probe.cu).

Those kernels were proven on fmsim, whose wgmma model is read off the PTX ISA. Here the same pieces
(load_tile_sw's swizzled tiles, the descriptors at the offsets the kernels step by, acc_to_a's
register A) multiply known matrices on the device, against a @ b: the hardware's word on the
layouts, form by form. tests/cudasim/test_simulator.py runs the same check on fmsim.
"""

from __future__ import annotations

import pytest
import torch

from fmcore import _C

FORMS = ["ss", "ss_mn", "rs"]
K = 128


def probe_operands(form: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a (64 x 128) and b (128 x N) as the probe's x and y for `form` (csrc/kernels/wgmma_probe.h)."""
    x = a.t().contiguous() if form == "ss_mn" else a.contiguous()
    y = b.t().contiguous() if form == "ss" else b.contiguous()
    return x, y


def check_probe(run, form: str, n: int, dtype: torch.dtype, device: str, ulps: float):
    """run(form, x, y) -> out; out must be a @ b (+ 0.5 for rs) to within `ulps` fp32 roundings of
    sum |a b| (a layout error is off by O(1))."""
    gen = torch.Generator().manual_seed(n + len(form))
    a = torch.randn(64, K, generator=gen).to(dtype)
    b = torch.randn(K, n, generator=gen).to(dtype)
    out = run(form, *(t.to(device) for t in probe_operands(form, a, b))).cpu()
    init = 0.5 if form == "rs" else 0.0
    ref = a.double() @ b.double() + init
    bound = ulps * 2.0**-24 * (a.double().abs() @ b.double().abs() + init)
    assert out.shape == (64, n)
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs()
    assert (err <= bound).all(), (
        f"{form} n={n} {dtype}: worst error {err.max().item():.3g} at {divmod(err.argmax().item(), n)}; "
        + which_terms(run, form, n, dtype, device))


def which_terms(run, form: str, n: int, dtype: torch.dtype, device: str, examples: int = 6) -> str:
    """What a layout error did, for a failing probe's message. With a = [I 0] (then [0 I]), out[i, j]
    must be b[i, j] (b[64 + i, j]) alone. Three probes whose b holds ones, its own row index and its
    own column index (exact small integers in bf16 and fp16) say how many elements of b each output
    took and, when one, which. One GPU run that fails then shows the permutation."""
    init = 0.5 if form == "rs" else 0.0
    fills = (torch.ones(K, n), torch.arange(K)[:, None].expand(K, n), torch.arange(n)[None, :].expand(K, n))
    found = []  # the wrong outputs: (row, column, a's half, terms, row index, column index)
    for half in (0, 1):
        a = torch.zeros(64, K, dtype=dtype)
        a[torch.arange(64), torch.arange(64) + 64 * half] = 1
        terms, k, c = (run(form, *(t.to(device) for t in probe_operands(form, a, b.to(dtype)))).cpu().double()
                       - init for b in fills)
        bad = (terms != 1) | (k != torch.arange(64)[:, None] + 64 * half) | (c != torch.arange(n))
        found += [(i, j, half, terms[i, j].item(), k[i, j].item(), c[i, j].item()) for i, j in bad.nonzero().tolist()]
    if not found:
        return "the index probes found every output taking its own term (a numeric error, not a layout one)"
    # the first wrong column of each output row first, then the rest
    firsts = [f for f, prev in zip(found, [None] + found) if prev is None or prev[:3:2] != f[:3:2]]
    lines = []
    for i, j, half, terms, k, c in (firsts + [f for f in found if f not in firsts])[:examples]:
        if terms == 0:
            got = "no term"
        elif terms == 1:
            got = f"b[{k:g}, {c:g}]"
        else:
            got = f"{terms:g} terms (row indices summing to {k:g}, column indices to {c:g})"
        lines.append(f"out[{i}, {j}] took {got}, not b[{i + 64 * half}, {j}]")
    return f"index probes: {len(found)} of {2 * 64 * n} outputs took the wrong terms, e.g. " + "; ".join(lines)


def _reference_run(reads: torch.Tensor | None = None):
    """A probe run in plain torch: a @ b from the operands as `form` lays them out, with b's row k
    read as reads[k] @ b (a layout error) when reads (K x K) is given."""
    def run(form, x, y):
        a = x.t() if form == "ss_mn" else x
        b = (y.t() if form == "ss" else y).double()
        if reads is not None:
            b = reads.double() @ b
        return (a.double() @ b + (0.5 if form == "rs" else 0.0)).float()
    return run


@pytest.mark.parametrize("form", FORMS)
def test_a_failing_probe_says_which_terms_each_output_took(form):
    check_probe(_reference_run(), form, 64, torch.bfloat16, "cpu", ulps=8)
    swapped = torch.eye(K)[torch.arange(K) ^ 1]  # rows 2m and 2m + 1 of b read in each other's place
    with pytest.raises(AssertionError, match=r"8192 of 8192 outputs took the wrong terms, e\.g\. "
                       r"out\[0, 0\] took b\[1, 0\], not b\[0, 0\]; out\[1, 0\] took b\[0, 0\]"):
        check_probe(_reference_run(swapped), form, 64, torch.bfloat16, "cpu", ulps=8)
    garbled = torch.eye(K)
    garbled[5, 4] = 1  # row 5 read as rows 4 + 5
    garbled[70, 70] = 0  # row 70 not read at all
    with pytest.raises(AssertionError, match=r"128 of 8192 outputs .* out\[5, 0\] took 2 terms \(row indices summing "
                       r"to 9, column indices to 0\), not b\[5, 0\]; out\[6, 0\] took no term, not b\[70, 0\]"):
        check_probe(_reference_run(garbled), form, 64, torch.float16, "cpu", ulps=8)


def _sm90a() -> bool:
    info = _C.build_info()
    return (info["with_cuda"] and "9.0a" in info["cuda_archs"] and torch.cuda.is_available()
            and torch.cuda.get_device_capability()[0] == 9)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [64, 128])
@pytest.mark.parametrize("form", FORMS)
def test_wgmma_layouts_on_the_gpu(form, n, dtype):
    if not _sm90a():
        pytest.skip("needs an sm_90 GPU and an extension with sm_90a code")
    # Hardware accumulates each k16 step in fp32 with its own rounding order: a few ulps per step.
    check_probe(_C._wgmma_probe, form, n, dtype, "cuda", ulps=64)


@pytest.mark.cuda
def test_wgmma_probe_bad_input():
    if not _sm90a():
        pytest.skip("needs an sm_90 GPU and an extension with sm_90a code")
    a = torch.zeros(64, K, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="expected form 'ss', 'ss_mn' or 'rs', got 'sr'"):
        _C._wgmma_probe("sr", a, a.t().contiguous())
    with pytest.raises(ValueError, match="unexpected shapes"):
        _C._wgmma_probe("rs", a, a)
    with pytest.raises(ValueError, match="both bfloat16 or both float16"):
        _C._wgmma_probe("rs", a, a.t().contiguous().float())
