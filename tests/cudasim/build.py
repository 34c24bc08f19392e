"""Builds libfmcore_sim: fmcore's CUDA bindings and kernels (rope, cross_entropy, add_norm, bias_gelu,
swiglu, adamw, attention, and the wgmma probe) compiled as C++ against fmsim (fmsim.h), with no CUDA runtime
or GPU, and loads it into torch.
And fmcore_ncclsim (build_nccl): fmcore's NCCL communicator over ncclsim.cpp's model of NCCL.

Every source is compiled through a generated wrapper in the build directory: the torch bindings
(csrc/ops/*.cpp) as `#include "fmsim_torch.h"` + `#include "<the real file>"`, the kernels
(csrc/kernels/*.cu) as transform.py's C++ rewrite. All with -Dfmcore=fmcore_sim (C++ namespace and
torch library fmcore_sim, no clash with fmcore._C in the same process) and -fvisibility=hidden (the
simulator's cuda* functions never replace torch's libcudart). The ops are then
torch.ops.fmcore_sim.<op> on CPU tensors.

FMCORE_SIM_SANITIZE=address|thread|undefined (or a comma list) adds -fsanitize=...; python must then run with the
runtime preloaded (address and thread):
  LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \\
    FMCORE_SIM_SANITIZE=address python -m pytest tests/cudasim
  (thread: libtsan.so and TSAN_OPTIONS="suppressions=scripts/tsan.supp"; or scripts/sanitize_cpu.sh
  sim-asan / sim-tsan, which do this.)
FMCORE_SIM_BUILD_ROOT overrides where the build directories go (default build/: build/cudasim[-<sanitizer>]
and build/ncclsim[-<sanitizer>]).
Run directly (`python tests/cudasim/build.py`) to build both and print their paths.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CSRC = REPO / "csrc"
OPS = ["rope", "cross_entropy", "norm", "activation", "adamw", "attention"]
# The ops' shared argument checks and CPU-side helpers (CE's registration references
# linear_cross_entropy's op), plus the schemas.
BINDINGS = [f"ops/{o}.cpp" for o in OPS] + [f"ops/{o}_cuda.cpp" for o in OPS]
BINDINGS += ["ops/linear_cross_entropy.cpp", "ops/registration.cpp"]
# ...and the wgmma layout probe (test_simulator.py runs it as on the GPU)
KERNELS = [f"kernels/{o}.cu" for o in OPS] + ["kernels/wgmma_probe.cu"]


class Unavailable(Exception):
    """The simulator cannot be built here (the reason says why)."""


def cuda_include() -> Path:
    """The CUDA toolkit's include dir (cuda_runtime.h, cuda_bf16.h): CUDA_HOME, else nvcc's."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(str(Path(nvcc).resolve().parents[1]))
    roots.append("/usr/local/cuda")
    for root in roots:
        if root and (Path(root) / "include" / "cuda_bf16.h").is_file():
            return Path(root) / "include"
    raise Unavailable("no CUDA toolkit headers (cuda_bf16.h) under CUDA_HOME or nvcc's root")


def _check_environment():
    import torch.utils.cpp_extension as ext

    if not any((Path(p) / "c10" / "cuda" / "CUDAStream.h").is_file() for p in ext.include_paths()):
        raise Unavailable("torch has no c10/cuda headers (a CPU-only torch build)")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise Unavailable("no C++ compiler")
    if shutil.which("ninja") is None and not ext.is_ninja_available():
        raise Unavailable("no ninja (torch.utils.cpp_extension needs it)")


def _write_if_changed(path: Path, text: str):
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _sanitize_flags() -> tuple[str, list[str], list[str]]:
    """FMCORE_SIM_SANITIZE as (build-dir suffix, compile flags, link flags)."""
    sanitize = os.environ.get("FMCORE_SIM_SANITIZE", "")
    if not set(sanitize.split(",")) <= {"", "address", "thread", "undefined"}:
        raise ValueError(f"FMCORE_SIM_SANITIZE must list address, thread or undefined, got {sanitize!r}")
    if not sanitize:
        return "", [], []
    return "-" + sanitize.replace(",", "+"), [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer"], [
        f"-fsanitize={sanitize}"
    ]


def _build_dir(name: str) -> Path:
    return Path(os.environ.get("FMCORE_SIM_BUILD_ROOT", REPO / "build")) / (name + _sanitize_flags()[0])


def _load(name: str, build_dir: Path, sources, flags, include, verbose: bool, python_module: bool):
    import torch.utils.cpp_extension as ext

    _, san_flags, san_ldflags = _sanitize_flags()
    os.environ.setdefault("MAX_JOBS", "2")
    start = time.monotonic()
    module = ext.load(
        name=name,
        sources=[str(s) for s in sources],
        extra_cflags=["-std=c++20", "-O1", "-g0", "-fvisibility=hidden", *flags, *san_flags],
        extra_ldflags=san_ldflags,
        extra_include_paths=[str(p) for p in include],
        build_directory=str(build_dir),
        with_cuda=False,
        is_python_module=python_module,
        verbose=verbose,
    )
    lib = build_dir / f"{name}.so"
    if verbose:
        print(f"{name} built/loaded in {time.monotonic() - start:.1f} s: {lib}", file=sys.stderr)
    _check_no_undefined(lib, ("cuda", "nccl"))
    return module


def build(verbose: bool = False) -> Path:
    """Builds (incrementally) and loads libfmcore_sim into torch; returns the library path."""
    _check_environment()
    import torch

    sys.path.insert(0, str(HERE))
    from transform import transform

    build_dir = _build_dir("cudasim")
    src_dir = build_dir / "src"
    src_dir.mkdir(parents=True, exist_ok=True)

    sources = []
    for rel in BINDINGS:
        out = src_dir / (rel.replace("/", "_"))
        _write_if_changed(out, f'#include "fmsim_torch.h"\n#include "{CSRC / rel}"\n')
        sources.append(out)
    for rel in KERNELS:
        out = src_dir / (rel.replace("/", "_") + ".cpp")
        _write_if_changed(out, transform((CSRC / rel).read_text(), str(CSRC / rel)))
        sources.append(out)
    # fmsim's own checks (test_simulator.py): kernels with known bugs, and their op
    out = src_dir / "selftest.cu.cpp"
    _write_if_changed(out, transform((HERE / "selftest.cu").read_text(), str(HERE / "selftest.cu")))
    sources += [out, HERE / "selftest_op.cpp", HERE / "fmsim.cpp"]

    flags = [
        "-Dfmcore=fmcore_sim",
        "-DFMCORE_WITH_CUDA=1",
        "-DFMCORE_SM90A=1",  # the simulated device is an sm_90 one (attention's wgmma forward)
        "-Wno-unknown-pragmas",  # #pragma unroll
        "-Wno-unused-function",  # the CPU impls no TORCH_LIBRARY_IMPL registers here
    ]
    include = [HERE / "shim", HERE, CSRC, CSRC / "kernels", cuda_include()]
    _load("fmcore_sim", build_dir, sources, flags, include, verbose, python_module=False)
    assert hasattr(torch.ops.fmcore_sim, "rope")
    return build_dir / "fmcore_sim.so"


def nccl_include() -> Path:
    """nccl.h: that of torch's nvidia-nccl wheel, else NCCL_HOME's (as CMakeLists.txt looks)."""
    try:
        import nvidia

        roots = [Path(p) / "nccl" for p in nvidia.__path__]
    except ImportError:
        roots = []
    if os.environ.get("NCCL_HOME"):
        roots.append(Path(os.environ["NCCL_HOME"]))
    for root in roots:
        if (root / "include" / "nccl.h").is_file():
            return root / "include"
    raise Unavailable("no nccl.h (neither NCCL_HOME nor torch's nvidia-nccl wheel has one)")


def build_nccl(verbose: bool = False):
    """Builds (incrementally) and imports fmcore_ncclsim: csrc/dist/communicator.cpp, unchanged, over
    ncclsim.cpp's NCCL and CUDA streams; returns the module (fmcore._C's communicator names plus the
    model's sim_* controls)."""
    _check_environment()
    include = [HERE / "nccl_shim", HERE / "shim", HERE, CSRC, cuda_include(), nccl_include()]
    build_dir = _build_dir("ncclsim")
    build_dir.mkdir(parents=True, exist_ok=True)
    wrapper = build_dir / "dist_communicator.cpp"
    _write_if_changed(wrapper, f'#include "ncclsim_torch.h"\n#include "{CSRC / "dist" / "communicator.cpp"}"\n')
    flags = ["-DFMCORE_WITH_NCCL=1"]
    return _load("fmcore_ncclsim", build_dir, [wrapper, HERE / "ncclsim.cpp"], flags, include, verbose, True)


def _check_no_undefined(lib: Path, prefixes: tuple[str, ...]):
    """Every cuda* (nccl*) function the sources call must be the simulator's: an undefined one would
    bind to the real libcudart (libnccl) torch loaded and touch (or fail on) a GPU."""
    try:
        out = subprocess.run(
            ["nm", "-D", "--undefined-only", str(lib)], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return  # no binutils: nothing to check with
    missing = sorted({ln.split()[-1] for ln in out.splitlines() if ln.split()[-1].startswith(prefixes)})
    if missing:
        raise RuntimeError(f"{lib.name} calls functions the simulator lacks: {missing}")


if __name__ == "__main__":
    print(build(verbose=True))
    print(build_nccl(verbose=True).__file__)
