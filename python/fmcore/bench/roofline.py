"""The two ceilings every result is reported against, measured in the same run.

- copy bandwidth: a device-to-device copy of a large buffer, bytes read + written per second
- matmul rate: bf16 (GPU) or fp32 (CPU) square matmul, FLOP per second
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fmcore.bench.timing import time_ms


@dataclass
class Roofline:
    copy_gbps: float  # GB/s, read + write
    matmul_tflops: float

    def pct_bandwidth(self, gbps: float) -> float:
        return 100.0 * gbps / self.copy_gbps

    def pct_matmul(self, tflops: float) -> float:
        return 100.0 * tflops / self.matmul_tflops


def measure(device: torch.device) -> Roofline:
    cuda = device.type == "cuda"
    n = (1 << 30) if cuda else (1 << 26)  # bytes per buffer: 1 GiB on GPU, 64 MiB on CPU
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, rep=20)
    copy_gbps = 2 * n / (ms * 1e-3) / 1e9
    del src, dst
    size, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, warmup=3, rep=20)
    return Roofline(copy_gbps=copy_gbps, matmul_tflops=2 * size**3 / (ms * 1e-3) / 1e12)
