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
        "cuda_archs": [a for a in compiled["cuda_archs"].split(",") if a],
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "ops": cuda_ops(),
    }


def format_build_info(info: dict | None = None) -> str:
    info = info or build_info()
    lines = [f"{k}: {v}" for k, v in info.items() if k != "ops"]
    lines.append("ops (CUDA implementation compiled in):")
    lines += [f"  {name:<28} {'cuda+cpu' if has_cuda else 'cpu'}" for name, has_cuda in info["ops"].items()]
    return "\n".join(lines)
