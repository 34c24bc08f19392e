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
    assert (err <= bound).all(), f"{form} n={n} {dtype}: worst error {err.max().item():.3g} at {divmod(err.argmax().item(), n)}"


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
