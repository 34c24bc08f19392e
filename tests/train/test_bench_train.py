"""The `train` benchmark's quick (CPU) path: every eager system measures a real step."""

import torch

from fmcore.bench import BenchContext
from fmcore.bench import train as bench_train
from fmcore.bench.roofline import Roofline


def test_quick_train_bench_measures_fmcore_and_torch():
    ctx = BenchContext(torch.device("cpu"), Roofline(copy_gbps=1.0, matmul_tflops=0.05), quick=True)
    rows = bench_train.run(ctx)
    got = {(r.system, r.metric): r.value for r in rows}
    for system in ("fmcore", "torch-eager"):
        assert got[(system, "tok/s")] > 0 and got[(system, "ms")] > 0 and got[(system, "MFU%")] > 0
    assert not any(r.system.endswith("compile") for r in rows)  # compile is for the GPU run
