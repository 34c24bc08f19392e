"""Run every CUDA op once, forward and backward, on small awkward shapes: the workload that
scripts/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck). Keep it small: the
sanitizer slows kernels down 10-100x."""

import torch

import fmcore.ops as ops

dev = "cuda"


def rope():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for interleaved in (False, True):
            # S=37 and the 1-element storage offset exercise the tail and the unaligned (scalar) path
            base = torch.randn(2 * 37 * 6 * 96 + 1, device=dev, dtype=dtype)
            q = base[1:].view(2, 37, 6, 96).detach().requires_grad_()
            k = torch.randn(2, 37, 2, 96, device=dev, dtype=dtype, requires_grad=True)
            theta = torch.rand(40, 32, device=dev)
            oq, ok = ops.apply_rotary(q, k, theta.cos(), theta.sin(), interleaved=interleaved)
            (oq.float().sum() + ok.float().sum()).backward()
            ops.apply_rotary(q.detach(), k.detach(), theta.cos(), theta.sin(), interleaved=interleaved, inplace=True)


CHECKS = [rope]

if __name__ == "__main__":
    for check in CHECKS:
        check()
    torch.cuda.synchronize()
    print(f"ran {len(CHECKS)} op checks: {', '.join(c.__name__ for c in CHECKS)}")
