"""pytest-benchmark view of the loader benchmark (`pytest benchmarks --benchmark-only`): one batch of
(x, y) int64 (64, 1024) from fmcore's loader and from nanoGPT's get_batch, over the same shards.
The full sweep (threads, torch DataLoader, tok/s rows) is `python -m fmcore.bench loader`."""

import pytest
import torch

from fmcore.bench.loader import make_shards, nanogpt_get_batch, shard_paths, thread_counts
from fmcore.data import Loader

B, T = 64, 1024


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = make_shards(tmp_path_factory.mktemp("loader_bench"), 4_000_000)
    for p in shard_paths(root):
        p.read_bytes()  # page cache
    return root


@pytest.mark.parametrize("threads", thread_counts())
@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_fmcore_loader(benchmark, shards, threads, mode):
    with Loader(shards, batch_size=B, seq_len=T, mode=mode, threads=threads) as loader:
        batch = benchmark(lambda: next(loader))
    benchmark.extra_info["tokens_per_batch"] = B * T
    assert batch.x.shape == (B, T) and torch.equal(batch.x[:, 1:], batch.y[:, :-1])


def test_nanogpt_get_batch(benchmark, shards):
    x, y = benchmark(nanogpt_get_batch, shard_paths(shards), B, T, torch.cuda.is_available())
    benchmark.extra_info["tokens_per_batch"] = B * T
    assert x.shape == (B, T) and torch.equal(x[:, 1:], y[:, :-1])
