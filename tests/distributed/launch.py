"""Runs a test body on N CPU processes joined in a gloo process group (forked from pytest, so torch
and fmcore are not imported again: each group starts in well under a second; spawned instead when
this process has initialised CUDA).

    results = run_ranks(body, world_size=2, tmp=tmp_path, args=(...))   # body(rank, world, *args)

run_inline(body, tmp, backend="gloo") runs body(0, 1) in this process in a 1-rank group (for CUDA
tests, backend "nccl": a forked child cannot use CUDA once the parent has). Each rank's return value
(anything picklable) comes back in rank order; an exception on any rank fails the caller with that
rank's traceback, and a rank that hangs is killed after `timeout` s.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import traceback
from datetime import timedelta
from pathlib import Path


def _entry(body, rank: int, world: int, store: str, out: str, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    # One intra-op thread: the ranks share 2 cores, and no OpenMP pool from the parent is reused after fork.
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        result = ("ok", body(rank, world, *args))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001  (reported to the parent)
        result = ("error", traceback.format_exc())
    with open(out, "wb") as f:
        pickle.dump(result, f)
    os._exit(0)  # skip pytest's atexit handlers inherited through fork


def run_ranks(body, world_size: int, tmp: Path, args: tuple = (), timeout: float = 120.0, spawn: bool = False) -> list:
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    store = tmp / f"store-{os.getpid()}-{id(body)}-{world_size}"
    if store.exists():
        store.unlink()
    outs = [tmp / f"result-{world_size}-{r}.pkl" for r in range(world_size)]
    for o in outs:
        if o.exists():
            o.unlink()
    import torch

    # fork is fast (torch and fmcore stay imported) but a forked child cannot use CUDA once the parent
    # has initialised it, not even to pin loader memory: then spawn (the bodies are module-level).
    # spawn=True for bodies that compile: a fork after this process ran torch.compile (its worker threads,
    # a lock held at the fork) hung the children's compile.
    ctx = mp.get_context("spawn" if spawn or torch.cuda.is_initialized() else "fork")
    procs = [ctx.Process(target=_entry, args=(body, r, world_size, str(store), str(outs[r]), args))
             for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    results, errors = [], []
    for r, o in enumerate(outs):
        if not o.exists():
            errors.append(f"rank {r}: {'hung (killed)' if r in hung else 'died'} without a result")
            continue
        status, value = pickle.loads(o.read_bytes())
        if status == "error":
            errors.append(f"rank {r} raised:\n{value}")
        results.append(value)
    if errors:
        raise AssertionError("\n".join(errors))
    return results


def run_inline(body, tmp: Path, args: tuple = (), backend: str = "gloo"):
    import torch.distributed as dist

    store = Path(tmp) / f"store-inline-{os.getpid()}"
    if store.exists():  # (a file store left by an earlier group would join this one to it)
        store.unlink()
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    try:
        return body(0, 1, *args)
    finally:
        dist.destroy_process_group()
