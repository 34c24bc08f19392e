"""fmcore's benchmark harness: ``python -m fmcore.bench [NAME ...] [--json FILE] [--plot DIR]``.

Each benchmark module defines ``run(ctx)``, yielding its Rows as each system's are measured (the CLI
rewrites the JSON per row, so a run stopped at a time limit keeps them), and compares fmcore with every
peer that is importable, in the same process, on fresh random data.
"""

from __future__ import annotations

import importlib
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fmcore.bench.report import Row
from fmcore.bench.roofline import Roofline

# name -> module; one module per op or component, in the order they run.
BENCHMARKS = {
    "rope": "fmcore.bench.rope",
    "norm": "fmcore.bench.norm",
    "gelu": "fmcore.bench.gelu",
    "swiglu": "fmcore.bench.swiglu",
    "cross_entropy": "fmcore.bench.cross_entropy",
    "linear_cross_entropy": "fmcore.bench.linear_cross_entropy",
    "adamw": "fmcore.bench.adamw",
    "attention": "fmcore.bench.attention",
    "attention_masked": "fmcore.bench.attention_masked",
    "loader": "fmcore.bench.loader",
    "train": "fmcore.bench.train",
}


@dataclass
class BenchContext:
    device: torch.device
    roofline: Roofline
    quick: bool  # small shapes (CPU, smoke tests): the numbers prove the path, not the speed

    def bandwidth_rows(self, bench: str, case: str, system: str, ms: float, nbytes: float, *,
                       ms_unit: str = "ms", rate_unit: str = "GB/s") -> list[Row]:
        """ms, GB/s and % of the copy bandwidth for a memory-bound op that moves nbytes."""
        gbps = nbytes / (ms * 1e-3) / 1e9
        return [
            Row(bench, case, system, "ms", ms, ms_unit),
            Row(bench, case, system, "GB/s", gbps, rate_unit),
            Row(bench, case, system, "roofline%", self.roofline.pct_bandwidth(gbps),
                f"% of {self.roofline.copy_gbps:.0f} GB/s copy"),
        ]

    def fwd_bwd_rows(self, bench: str, case: str, system: str, ms: tuple[float, float],
                     nbytes: tuple[float, float]) -> list[Row]:
        """bandwidth_rows of a forward and a backward: cases "<case> fwd" and "<case> bwd"."""
        return [row for phase, t, nb in zip(("fwd", "bwd"), ms, nbytes)
                for row in self.bandwidth_rows(bench, f"{case} {phase}", system, t, nb)]

    def floor_rows(self, bench: str, case: str, nbytes: tuple[float, float]) -> list[Row]:
        """System "floor": a fused op's forward and backward bytes at the copy bandwidth."""
        return [Row(bench, f"{case} {phase}", "floor", "ms", nb / (self.roofline.copy_gbps * 1e9) * 1e3,
                    "ms: the fused op's bytes at the copy bandwidth") for phase, nb in zip(("fwd", "bwd"), nbytes)]

    def compute_rows(self, bench: str, case: str, system: str, ms: float, flops: float, *,
                     ms_unit: str = "ms", rate_unit: str = "TFLOP/s") -> list[Row]:
        """ms, TFLOP/s and % of the matmul rate for a compute-bound op doing flops."""
        tflops = flops / (ms * 1e-3) / 1e12
        return [
            Row(bench, case, system, "ms", ms, ms_unit),
            Row(bench, case, system, "TFLOP/s", tflops, rate_unit),
            Row(bench, case, system, "roofline%", self.roofline.pct_matmul(tflops),
                f"% of {self.roofline.matmul_tflops:.3g} TFLOP/s matmul"),
        ]


def load(name: str):
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return importlib.import_module(BENCHMARKS[name])


# The peers measure_system skipped in this process, {bench, case, system, error}: the CLI writes them
# into the JSON header ("skipped") so that a failed peer reads as failed, not as not applicable.
SKIPPED: list[dict[str, Any]] = []


class Disagreement(AssertionError):
    """A system's result differs from the reference on the same inputs: the benchmark would time other
    work than it names (a wrong mask, layout or argument), a bug of the benchmark, not a failed peer."""


def measure_system(bench: str, case: str, system: str, measure: Callable[[], list[Row]]) -> list[Row]:
    """Run one system's measurement. fmcore's failures raise; a peer that fails (an API that moved, a
    case its backend refuses, out of memory) is named on stdout and in SKIPPED and leaves no rows, so
    one broken peer cannot cost a GPU session the other numbers. A Disagreement always raises."""
    if system == "fmcore":
        return measure()
    try:
        return measure()
    except Disagreement:
        raise
    except Exception as err:  # noqa: BLE001 - any peer failure is reported, never hidden as a number
        record_skipped(bench, case, system, err)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return []


def record_skipped(bench: str, case: str, system: str, err: Exception) -> None:
    """Name a system that failed on a case, on stdout and in SKIPPED (so tables show it as failed).
    fmcore's own failures also print their traceback (on stderr): they are ours to debug."""
    print(f"# {bench}: {system} skipped on {case}: {error_line(err)}", flush=True)
    if system.startswith("fmcore"):
        traceback.print_exception(err)
    SKIPPED.append({"bench": bench, "case": case, "system": system, "error": error_line(err)})


def error_line(err: BaseException) -> str:
    """'Type: first line of the message': enough to name a failure in a one-line report."""
    text = str(err)
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def bench_tiles() -> list[int]:
    """The alternative attention tile configurations to time (fmcore-tiles<t> systems): 1 to the last,
    or those FMCORE_BENCH_TILES lists (comma-separated), e.g. the ones scripts/gpu_check.sh's
    test-tiles stage saw pass: a configuration that computes wrong results, or crashes the process,
    is not timed."""
    from fmcore._C import attention_tile_configs

    every = list(range(1, attention_tile_configs))
    listed = os.environ.get("FMCORE_BENCH_TILES")
    if listed is None:
        return every
    tiles = [int(t) for t in listed.split(",") if t.strip()]
    if not set(tiles) <= set(every):
        raise ValueError(f"FMCORE_BENCH_TILES must list configurations among {every}, got {listed!r}")
    return tiles


def try_import(module: str):
    """A peer's module, or None when the peer is not installed (its rows are then absent). A peer that
    is installed but fails to import (a missing dependency, an API mismatch with this torch) is named
    on stdout with the error: its absent rows are then a fault to fix, not "not installed"."""
    try:
        return importlib.import_module(module)
    except Exception as err:  # a broken peer install must not stop fmcore's own numbers
        missing = getattr(err, "name", None) if isinstance(err, ModuleNotFoundError) else None
        if missing is not None and (module == missing or module.startswith(missing + ".")):
            return None  # the peer itself (or its package) is not installed: quietly absent
        print(f"# peer {module} failed to import: {error_line(err)}", flush=True)
        return None


__all__ = ["BENCHMARKS", "BenchContext", "Disagreement", "Row", "SKIPPED", "bench_tiles", "error_line", "load",
           "measure_system", "record_skipped", "try_import"]
