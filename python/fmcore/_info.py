"""What this installation of fmcore was built with and what it can run."""

from __future__ import annotations

import torch

from fmcore import _C


def cuda_ops() -> dict[str, bool]:
    """Each fmcore op, and whether a CUDA implementation is compiled in (asked of the dispatcher)."""
    names = sorted(
        op.split("::", 1)[1]
        for op in torch._C._dispatch_get_all_op_names()
        if op.startswith("fmcore::")
    )
    return {name: torch._C._dispatch_has_kernel_for_dispatch_key(f"fmcore::{name}", "CUDA") for name in names}


def compiled_archs(compiled: dict) -> list[str]:
    """The CUDA architectures in the extension's build info (its comma-separated "cuda_archs")."""
    return [a for a in compiled["cuda_archs"].split(",") if a]


def arch_runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Whether code compiled for arch (torch's notation: "8.0", "9.0a", "8.6+PTX") runs on a GPU of
    this compute capability: a cubin on the same major version and an equal or newer minor one, an
    arch-specific cubin ("9.0a": wgmma) on that exact version only, PTX on any newer GPU (JIT)."""
    version, _, suffix = arch.partition("+")
    specific = version.endswith("a")
    major, minor = (int(n) for n in version.rstrip("a").split("."))
    if suffix.upper() == "PTX" and not specific and capability >= (major, minor):
        return True
    if specific:
        return capability == (major, minor)
    return capability[0] == major and capability[1] >= minor


def kernels_missing_on(device: torch.device | str) -> str | None:
    """Why fmcore's kernels cannot run on device, or None when they can: on every CPU (each op has a
    CPU implementation), and on a GPU whose architecture this build compiled."""
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"fmcore has no kernels for {device.type} devices"
    compiled = dict(_C.build_info())
    if not compiled["with_cuda"]:
        return "this fmcore was built without its CUDA kernels (FMCORE_CUDA=off, or no nvcc at build time)"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    archs = compiled_archs(compiled)
    capability = torch.cuda.get_device_capability(device)
    if not any(arch_runs_on(a, capability) for a in archs):
        return (f"this fmcore's CUDA kernels were compiled for {', '.join(archs)}, not for "
                f"{torch.cuda.get_device_name(device)} ({capability[0]}.{capability[1]}); rebuild with "
                f"FMCORE_CUDA_ARCHS=\"{capability[0]}.{capability[1]}\"")
    return None


def build_info() -> dict:
    """torch and CUDA versions (compiled against and running), compiled archs, and per-op CUDA support."""
    compiled = dict(_C.build_info())
    return {
        "fmcore_torch_compiled": compiled["torch_version"],
        "torch_running": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "with_cuda": compiled["with_cuda"],
        "with_nccl": bool(_C.has_nccl),  # fmcore.dist's own NCCL communicator (csrc/dist)
        "cuda_runtime_compiled": compiled["cuda_runtime"],
        "cuda_archs": compiled_archs(compiled),
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        # whether fmcore's kernels run on that device ("yes"), or why not
        "kernels_run_here": kernels_missing_on("cuda" if torch.cuda.is_available() else "cpu") or "yes",
        "ops": cuda_ops(),
    }


def format_build_info(info: dict | None = None) -> str:
    info = info or build_info()
    lines = [f"{k}: {v}" for k, v in info.items() if k != "ops"]
    lines.append("ops (CUDA implementation compiled in):")
    lines += [f"  {name:<28} {'cuda+cpu' if has_cuda else 'cpu'}" for name, has_cuda in info["ops"].items()]
    return "\n".join(lines)
