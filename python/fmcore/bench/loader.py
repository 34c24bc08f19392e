"""Loader benchmark: tokens/s of host batches (x, y) int64 (B, T), over the same shards, for
- fmcore: the C++ loader (random windows, and sequential streaming), worker threads 1, 2, 4, ...;
- nanogpt-get-batch: nanoGPT's train.py get_batch (np.memmap re-opened per call, random windows,
  astype(int64), torch.stack, pin_memory when CUDA is present): single-threaded by design;
- torch-dataloader: an IterableDataset of random windows from np.memmap under torch.utils.data.DataLoader
  (default collate, pin_memory when CUDA is present), num_workers = the thread count.
Every system stops at pinned host tensors (the .to(device) that follows is the same for all).
Thread counts go up to min(16, 2 x the usable cores). The shards are random GPT-2-sized tokens written
once to a temporary directory (uint16, 4 shards) and read through the page cache by everyone.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from fmcore.bench import BenchContext, Row
from fmcore.data import Loader, write_dataset
from fmcore.data.shards import HEADER_BYTES

VOCAB = 50257


def make_shards(root: Path, tokens_per_shard: int, n_shards: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    shards = [rng.integers(0, VOCAB, size=tokens_per_shard, dtype=np.uint16) for _ in range(n_shards)]
    return write_dataset(root, {"train": shards}, vocab_size=VOCAB, eos_id=VOCAB - 1)


def shard_paths(root: Path) -> list[Path]:
    return sorted(root.glob("train_*.bin"))


def nanogpt_get_batch(paths, B: int, T: int, pin: bool):
    """nanoGPT's get_batch, over several shards (one picked at random per batch)."""
    path = paths[np.random.randint(len(paths))]
    data = np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES)  # re-opened per call, as nanoGPT does
    ix = torch.randint(len(data) - T, (B,))
    x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
    if pin:
        x, y = x.pin_memory(), y.pin_memory()
    return x, y


class RandomWindows(torch.utils.data.IterableDataset):
    """Endless random (x, y) windows; each DataLoader worker draws from its own seeded stream."""

    def __init__(self, paths, T: int):
        self.paths, self.T = [str(p) for p in paths], T

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng(0 if info is None else info.id + 1)
        data = [np.memmap(p, dtype=np.uint16, mode="r", offset=HEADER_BYTES) for p in self.paths]
        T = self.T
        while True:
            d = data[rng.integers(len(data))]
            i = int(rng.integers(len(d) - T))
            yield torch.from_numpy(d[i:i + T].astype(np.int64)), torch.from_numpy(d[i + 1:i + 1 + T].astype(np.int64))


def tokens_per_second(next_batch, tokens_per_batch: int, seconds: float, warmup: int = 3, repeats: int = 3) -> float:
    """Median over `repeats` timed spans of seconds/repeats each (the build machines are shared and noisy)."""
    for _ in range(warmup):
        next_batch()
    rates = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds / repeats or n < 3:
            next_batch()
            n += 1
        rates.append(n * tokens_per_batch / elapsed)
    return statistics.median(rates)


def thread_counts(cores: int | None = None) -> list[int]:
    cores = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return [t for t in (1, 2, 4, 8, 16) if t <= min(16, 2 * cores)]


def run(ctx: BenchContext, root: Path | None = None) -> Iterator[Row]:
    B, T = 64, 1024  # the shape of the bar, on the CPU too (the point here is host throughput)
    seconds = 1.5 if ctx.quick else 2.0
    pin = torch.cuda.is_available()
    unit = f"tokens/s, (x, y) int64 ({B}, {T}), host{' pinned' if pin else ''}"
    with tempfile.TemporaryDirectory(prefix="fmcore_bench_loader_") as tmp:
        root = make_shards(Path(root or tmp), 8_000_000 if ctx.quick else 64_000_000)
        paths = shard_paths(root)
        for p in paths:  # into the page cache for every system alike
            p.read_bytes()

        def row(case, system, value):
            return Row("loader", case, system, "tok/s", value, unit)

        yield row(f"random B={B} T={T} threads=1", "nanogpt-get-batch",
                  tokens_per_second(lambda: nanogpt_get_batch(paths, B, T, pin), B * T, seconds))
        # Most threads first: the bar's count, should a GPU session's time limit cut the sweep.
        for threads in reversed(thread_counts()):
            case = f"random B={B} T={T} threads={threads}"
            with Loader(root, batch_size=B, seq_len=T, mode="random", threads=threads, pin_memory=pin) as loader:
                yield row(case, "fmcore", tokens_per_second(lambda: next(loader), B * T, seconds))
            with Loader(root, batch_size=B, seq_len=T, mode="sequential", threads=threads, pin_memory=pin) as loader:
                yield row(f"sequential B={B} T={T} threads={threads}", "fmcore",
                          tokens_per_second(lambda: next(loader), B * T, seconds))
            with warnings.catch_warnings():  # more workers than cores is the point of the sweep
                warnings.simplefilter("ignore", UserWarning)
                dl = torch.utils.data.DataLoader(RandomWindows(paths, T), batch_size=B, num_workers=threads,
                                                 pin_memory=pin, persistent_workers=True, prefetch_factor=4)
                it = iter(dl)  # where torch checks the worker count against the cores
            yield row(case, "torch-dataloader",
                      tokens_per_second(lambda: next(it), B * T, seconds, warmup=2 * threads + 2))
            del it, dl
