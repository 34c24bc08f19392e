"""fmcore's benchmark harness: ``python -m fmcore.bench [NAME ...] [--json FILE] [--plot DIR]``.

Each benchmark module defines ``run(ctx) -> list[Row]`` and compares fmcore with every peer that is
importable, in the same process, on fresh random data.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from fmcore.bench.report import Row
from fmcore.bench.roofline import Roofline

# name -> module; one module per op or component, in the order they run.
BENCHMARKS = {
    "rope": "fmcore.bench.rope",
    "cross_entropy": "fmcore.bench.cross_entropy",
    "linear_cross_entropy": "fmcore.bench.linear_cross_entropy",
    "adamw": "fmcore.bench.adamw",
    "attention": "fmcore.bench.attention",
    "loader": "fmcore.bench.loader",
    "train": "fmcore.bench.train",
}


@dataclass
class BenchContext:
    device: torch.device
    roofline: Roofline
    quick: bool  # small shapes (CPU, smoke tests): the numbers prove the path, not the speed


def load(name: str):
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return importlib.import_module(BENCHMARKS[name])


def try_import(module: str):
    """A peer's module, or None when the peer is not installed (its rows are then absent)."""
    try:
        return importlib.import_module(module)
    except Exception:  # a broken peer install must not stop fmcore's own numbers
        return None


__all__ = ["BENCHMARKS", "BenchContext", "Row", "load", "try_import"]
