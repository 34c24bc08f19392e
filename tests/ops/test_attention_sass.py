"""The wgmma attention kernels' SASS, as compiled into fmcore._C: properties that ptxas decides
without an error and that no CPU test or correctness test on the GPU can see.

- No serialization: ptxas serializes every wgmma of a kernel (an arrive and a wait around each
  instruction) when another instruction touches an in-flight wgmma's registers, or when it cannot
  tell which group a wait retires (infos C7514/C7515). The results stay right; the tensor cores
  idle. A kernel's wgmmas must come in batches: several HGMMA per WARPGROUP.ARRIVE.
- The overlap of tiles=5: the softmax's exponentials between the wait for the next S (gsb0 <= 1)
  and the wait for the P V (gsb0 == 0). ptxas once hoisted the second wait above them, silently
  (docs/design-notes.md, "tiles=5").

Runs where the extension has sm_90a code and a cuobjdump is found (on PATH or the one triton ships);
skips elsewhere (a CPU-only build). No GPU needed: with the CUDA build scripts/prepare_gpu_call.sh
makes, `PYTHONPATH=python <its venv>/bin/python -m pytest tests/ops/test_attention_sass.py`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

import fmcore
from fmcore import _C


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.access(bundled, os.X_OK) else None


@pytest.fixture(scope="module")
def sass() -> dict[str, list[str]]:
    """Mangled kernel name -> its SASS instructions (opcode and operands), for the wgmma kernels."""
    info = fmcore.build_info()
    if not info["with_cuda"] or "9.0a" not in info["cuda_archs"]:
        pytest.skip("the extension has no sm_90a code")
    exe = _cuobjdump()
    if exe is None:
        pytest.skip("no cuobjdump (neither on PATH nor triton's)")
    out = subprocess.run([exe, "-sass", _C.__file__], capture_output=True, text=True, timeout=600, check=True).stdout
    kernels, current = {}, None
    for line in out.splitlines():
        if "Function : " in line:
            name = line.split("Function : ", 1)[1].strip()
            current = kernels.setdefault(name, []) if "wgmma_kernel" in name else None
        elif current is not None:
            m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
            if m:
                current.append(m.group(1))
    assert kernels, "the extension has sm_90a code but no wgmma kernels in its SASS"
    return kernels


def _count(instrs: list[str], opcode: str) -> int:
    return sum(1 for i in instrs if re.search(rf"(^|\s){re.escape(opcode)}\b", i))


def test_wgmma_not_serialized(sass):
    for name, instrs in sass.items():
        hgmma, arrive = _count(instrs, "HGMMA"), _count(instrs, "WARPGROUP.ARRIVE")
        assert hgmma >= 3 * arrive > 0, f"{name}: {hgmma} HGMMA for {arrive} WARPGROUP.ARRIVE (serialized?)"


def test_overlapped_forward_softmax_between_its_waits(sass):
    # attn_fwd_wgmma_kernel<T, D, kBlockN, kOverlap = true, kGroups>
    overlapped = {n: int(m.group(1)) for n in sass
                  if (m := re.search(r"attn_fwd_wgmma_kernelI\w+?Li\d+ELi(\d+)ELb1ELi\dE", n))}
    assert len(overlapped) == 8, sorted(sass)  # bf16 and fp16, D = 64 and 128, one and two warpgroups a CTA
    for name, keys in overlapped.items():
        instrs = sass[name]
        first = next(i for i, s in enumerate(instrs) if s.startswith("WARPGROUP.DEPBAR.LE gsb0, 0x1"))
        second = next(i for i, s in enumerate(instrs) if i > first and s.startswith("WARPGROUP.DEPBAR.LE gsb0, 0x0"))
        exps = _count(instrs[first:second], "MUFU.EX2")
        # keys / 2 scores a thread (two rows of the step's keys) and the two rows' alpha
        assert exps >= keys // 2, \
            f"{name}: {exps} MUFU.EX2 between the S's wait and the P V's (the softmax left the overlap)"
