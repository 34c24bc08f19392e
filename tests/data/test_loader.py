"""The C++ loader through fmcore.data.Loader: window contents, determinism across thread counts,
disjoint and covering ranks, exact resume, document boundaries, errors and shutdown."""

import errno
import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fmcore.data import Loader, ShardError, write_dataset

# Shard sizes chosen so windows never divide evenly: (n - 1) // T drops a different tail per shard.
SIZES = [1000, 517, 2049, 64, 777]
T = 16


@pytest.fixture(scope="module")
def unique_ds(tmp_path_factory):
    """Tokens are their global position (uint32, vocab 2^20), so a window is identified by x[0]."""
    root = tmp_path_factory.mktemp("unique")
    offsets = np.cumsum([0] + SIZES)
    shards = [np.arange(offsets[k], offsets[k + 1]) for k in range(len(SIZES))]
    return write_dataset(root, {"train": shards}, vocab_size=1 << 20)


def all_windows():
    """First token of every sequential window of one epoch (shard order aside)."""
    offsets = np.cumsum([0] + SIZES)
    return sorted(int(offsets[k] + j * T) for k, n in enumerate(SIZES) for j in range((n - 1) // T))


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b):
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p.x, q.x) and torch.equal(p.y, q.y)
        if p.positions is not None:
            assert torch.equal(p.positions, q.positions) and torch.equal(p.cu_seqlens, q.cu_seqlens)


@pytest.mark.parametrize("mode", ["sequential", "random"])
def test_windows_are_consecutive_tokens(unique_ds, mode):
    with Loader(unique_ds, batch_size=8, seq_len=T, mode=mode, threads=2) as loader:
        for batch in take(loader, 20):
            assert batch.x.shape == (8, T) and batch.x.dtype == torch.int64
            assert torch.equal(batch.y, batch.x + 1)  # y is x shifted by one token
            assert torch.equal(batch.x, batch.x[:, :1] + torch.arange(T))  # never crosses a shard boundary
            assert batch.positions is None and batch.cu_seqlens is None


def test_int32(unique_ds):
    with Loader(unique_ds, batch_size=2, seq_len=T, dtype=torch.int32, doc_boundaries=False) as loader:
        batch = next(loader)
    assert batch.x.dtype == torch.int32 and torch.equal(batch.y, batch.x + 1)
    with pytest.raises(ValueError, match="dtype"):
        Loader(unique_ds, dtype=torch.float32)


def test_int32_refuses_ids_past_int32(tmp_path):
    """uint32 ids >= 2^31 became negative int32 ids, silently."""
    root = write_dataset(tmp_path / "big", {"train": [np.array([2**31 + 5, 2**32 - 1] * 20)]}, vocab_size=0)
    with pytest.raises(ValueError, match=r"torch.int32 holds token ids below 2\^31, .* vocab size unknown"):
        Loader(root, batch_size=1, seq_len=4, dtype=torch.int32)
    with Loader(root, batch_size=1, seq_len=4) as loader:
        assert next(loader).x[0, :2].tolist() == [2**31 + 5, 2**32 - 1]


@pytest.mark.parametrize("mode", ["sequential", "random"])
def test_deterministic_across_thread_counts(unique_ds, mode):
    runs = []
    for threads, prefetch in ((1, 1), (3, 8), (5, 3)):
        with Loader(unique_ds, batch_size=4, seq_len=T, mode=mode, seed=7, threads=threads,
                    prefetch=prefetch) as loader:
            runs.append(take(loader, 60))  # several epochs in sequential mode
    same(runs[0], runs[1])
    same(runs[0], runs[2])
    with Loader(unique_ds, batch_size=4, seq_len=T, mode=mode, seed=8) as other:
        assert not torch.equal(next(other).x, runs[0][0].x)  # the seed matters


def test_sequential_epochs_cover_every_window(unique_ds):
    """Each epoch reads every window once, shards in a seeded order, windows in order within a shard."""
    windows = all_windows()
    per_epoch = len(windows)
    B = 5
    with Loader(unique_ds, batch_size=B, seq_len=T, seed=3, threads=2) as loader:
        firsts = torch.cat([b.x[:, 0] for b in take(loader, 3 * per_epoch // B + 1)]).tolist()
        assert loader.epoch == pytest.approx(len(firsts) / per_epoch)
        assert loader.batches_per_epoch == per_epoch // B
        assert loader.wait_seconds >= 0.0
    assert Loader.manifest(unique_ds)["splits"]["train"]["tokens"] == sum(SIZES)
    epochs = [firsts[e * per_epoch:(e + 1) * per_epoch] for e in range(3)]
    for e in epochs:
        assert sorted(e) == windows
    assert epochs[0] != epochs[1]  # the shard order is reshuffled each epoch
    starts = np.cumsum([0] + SIZES)
    for e in epochs:  # consecutive windows of one shard are read in order
        shard = np.searchsorted(starts, e, side="right") - 1
        for k in range(len(SIZES)):
            mine = [w for w, s in zip(e, shard) if s == k]
            assert mine == sorted(mine)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("mode", ["sequential", "random"])
def test_ranks_disjoint_and_covering(unique_ds, world_size, mode):
    B = 3
    steps = len(all_windows()) // (B * world_size) + 2  # a little more than one epoch
    per_rank = []
    for rank in range(world_size):
        with Loader(unique_ds, batch_size=B, seq_len=T, mode=mode, seed=5, rank=rank, world_size=world_size,
                    threads=2) as loader:
            per_rank.append([b.x[:, 0].tolist() for b in take(loader, steps)])
    # Global order: step, then rank, then row. It must equal one single-rank loader's stream.
    merged = [w for step in range(steps) for rank in range(world_size) for w in per_rank[rank][step]]
    with Loader(unique_ds, batch_size=B * world_size, seq_len=T, mode=mode, seed=5) as single:
        ref = [w for b in take(single, steps) for w in b.x[:, 0].tolist()]
    assert merged == ref
    if mode == "sequential":
        windows = all_windows()
        assert sorted(merged[:len(windows)]) == windows  # one epoch: disjoint and covering


@pytest.mark.parametrize("mode", ["sequential", "random"])
def test_resume_is_exact(unique_ds, mode):
    kw = dict(batch_size=4, seq_len=T, mode=mode, seed=11, doc_boundaries=False)
    with Loader(unique_ds, threads=3, **kw) as loader:
        take(loader, 37)
        state = loader.state_dict()
        expected = take(loader, 25)
    with Loader(unique_ds, threads=1, **kw) as resumed:  # another thread count, a fresh process state
        take(resumed, 3)  # whatever it prefetched is dropped on load
        resumed.load_state_dict(state)
        same(take(resumed, 25), expected)


def test_resume_with_another_world_size(unique_ds):
    """A state saved at 2 ranks continues at the same global sample with 1 rank of twice the batch."""
    with Loader(unique_ds, batch_size=2, seq_len=T, rank=0, world_size=2) as r0, \
            Loader(unique_ds, batch_size=2, seq_len=T, rank=1, world_size=2) as r1:
        take(r0, 10), take(r1, 10)
        state = r0.state_dict()
        assert state == r1.state_dict()
        nxt = torch.cat([next(r0).x, next(r1).x])
    with Loader(unique_ds, batch_size=4, seq_len=T) as single:
        single.load_state_dict(state)
        assert torch.equal(next(single).x, nxt)


def test_state_mismatch(unique_ds):
    with Loader(unique_ds, batch_size=2, seq_len=T, seed=1) as loader:
        state = loader.state_dict()
    with Loader(unique_ds, batch_size=2, seq_len=T + 1, seed=1) as other:
        with pytest.raises(ValueError, match="different seq_len"):
            other.load_state_dict(state)
    with Loader(unique_ds, batch_size=2, seq_len=T, seed=2) as other:
        with pytest.raises(ValueError, match="different seed"):
            other.load_state_dict(state)
        with pytest.raises(ValueError, match="loader state version 4, expected 1, 2 or 3"):  # a later format's
            other.load_state_dict({**state, "version": 4})


@pytest.mark.parametrize("sample", [-1, 2**64, 1.5, "5", None, True])
def test_bad_state_sample(unique_ds, sample):
    """A damaged state raises ValueError naming the sample: int() truncated 1.5 and parsed "5", and -1
    failed inside pybind with an error naming no argument."""
    with Loader(unique_ds, batch_size=2, seq_len=T) as loader:
        state = loader.state_dict()
        with pytest.raises(ValueError, match=r"loader state sample must be an int in \[0, 2\^64\)"):
            loader.load_state_dict({**state, "sample": sample})
        with pytest.raises(ValueError, match=r"loader state lacks \['sample'\]"):
            loader.load_state_dict({k: v for k, v in state.items() if k != "sample"})
        loader.load_state_dict({**state, "sample": np.int64(4)})  # numpy ints (an index) are fine
        assert loader.state_dict()["sample"] == 4


# ---- document boundaries


def reference_segments(tokens_of_row, doc_starts_abs, start, eos=None):
    """Python reference: segment lengths of a row whose window starts at shard token `start`."""
    cuts = [0]
    for t in range(1, T):
        if (doc_starts_abs is not None and start + t in doc_starts_abs) or \
                (doc_starts_abs is None and tokens_of_row[t - 1] == eos):
            cuts.append(t)
    cuts.append(T)
    return np.diff(cuts).tolist()


@pytest.mark.parametrize("source", ["offsets", "eos"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_doc_boundaries(tmp_path, source, dtype):
    rng = np.random.default_rng(0)
    eos, shards, starts_of = 0, [], []
    for n in (300, 211):
        lengths = rng.integers(1, 40, size=n)
        tokens = np.concatenate([np.append(rng.integers(1, 100, size=length - 1), eos) for length in lengths])[:n]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        starts = starts[starts < n]
        shards.append((tokens, starts) if source == "offsets" else tokens)
        starts_of.append(set(starts.tolist()))
    root = write_dataset(tmp_path / "docs", {"train": shards}, vocab_size=100, eos_id=eos)
    B = 6
    with Loader(root, batch_size=B, seq_len=T, mode="random", seed=2, doc_boundaries=True, dtype=dtype) as loader:
        for batch in take(loader, 10):
            assert batch.positions.dtype == dtype and batch.cu_seqlens.dtype == torch.int32
            cu = batch.cu_seqlens.tolist()
            assert cu[0] == 0 and cu[-1] == B * T and all(a < b for a, b in zip(cu, cu[1:]))
            lengths = np.diff(cu).tolist()
            assert batch.max_seqlen == max(lengths)
            flat_pos = batch.positions.reshape(-1).tolist()
            assert flat_pos == [p for n in lengths for p in range(n)]  # restart at 0 in every segment
            ref = []
            for row in range(B):
                x = batch.x[row].numpy()
                # Find the row's shard and start from its (unique enough) content.
                for k, shard in enumerate(shards):
                    tokens = shard[0] if isinstance(shard, tuple) else shard
                    hits = [s for s in range(len(tokens) - T) if np.array_equal(tokens[s:s + T + 1],
                                                                               np.append(x, batch.y[row, -1]))]
                    if hits:
                        break
                ref += reference_segments(x, starts_of[k] if source == "offsets" else None, hits[0], eos)
            assert lengths == ref


def test_doc_boundaries_need_offsets_or_eos(unique_ds):
    with pytest.raises(ShardError, match="doc_boundaries needs document offsets"):
        Loader(unique_ds, batch_size=2, seq_len=T, doc_boundaries=True)


# ---- errors and shutdown


def test_worker_error_surfaces_in_consumer(tmp_path):
    tokens = np.arange(2000) % 100
    tokens[1500] = 100  # one token past the vocab, read by batch 23 (uint32 tokens: offset 64 + 4*1500)
    root = write_dataset(tmp_path / "bad", {"train": [tokens]}, vocab_size=0, tokenizer={"vocab_size": 100})
    with Loader(root, batch_size=4, seq_len=T, check_vocab=True, threads=2) as loader:
        good = 1500 // (4 * T)
        take(loader, good)  # the batches before it are fine
        with pytest.raises(ShardError, match=r"token id 100 at offset 6064 \(token 1500\) is >= the vocab size 100"):
            next(loader)
        with pytest.raises(ShardError):  # the loader stays failed
            next(loader)


def test_closed_loader(unique_ds):
    loader = Loader(unique_ds, batch_size=2, seq_len=T)
    next(loader)
    loader.close()
    loader.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)


def test_pickling_a_loader_says_where_to_create_it(unique_ds):
    # A DataLoader worker started with spawn or forkserver pickles its dataset: a Loader made in the
    # dataset's __init__ failed with pybind's "cannot pickle 'fmcore._C.TokenLoader' object".
    import copy
    import pickle

    with Loader(unique_ds, batch_size=2, seq_len=T, threads=1) as loader:
        for clone in (pickle.dumps, copy.deepcopy, copy.copy):
            with pytest.raises(TypeError, match=r"Loader cannot be pickled or copied.*__iter__"):
                clone(loader)
        assert next(loader).x.shape == (2, T)  # the loader itself is untouched


@pytest.fixture(scope="module")
def big_ds(tmp_path_factory):
    """Enough tokens that a (64, 256) batch takes the workers a while: consumers really wait in next()."""
    return write_dataset(tmp_path_factory.mktemp("big"), {"train": [np.arange(1 << 18) % 1000]}, vocab_size=1000)


def test_concurrent_consumers(big_ds):
    """Two threads calling next() on one loader get distinct batches, together the loader's first ones.
    next() used to wait for the batch number it read on entry; when the other thread took that batch,
    it waited for a batch that was already delivered, forever."""
    import threading

    kw = dict(batch_size=64, seq_len=256, threads=2, check_vocab=True)
    with Loader(big_ds, **kw) as loader:
        firsts = [[], []]

        def consume(k):
            for _ in range(20):
                firsts[k].append(int(next(loader).x[0, 0]))

        workers = [threading.Thread(target=consume, args=(k,)) for k in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=60)
        assert not any(w.is_alive() for w in workers), "a consumer hung in next()"
    with Loader(big_ds, **kw) as single:
        expected = sorted(int(b.x[0, 0]) for b in take(single, 40))
    assert sorted(firsts[0] + firsts[1]) == expected


@pytest.mark.parametrize("action", ["restart", "close"])
def test_restart_or_close_while_next_waits(big_ds, action):
    """One thread in next() while another restarts (load_state_dict) or closes the loader: next()
    returns a batch or raises RuntimeError. It used to keep a pointer into the ring across the wait
    (read after restart() had freed the ring) and to divide by the ring's size while restart() had
    emptied it (SIGFPE). A race: many rounds make the bad interleavings likely, not certain."""
    import threading

    loader = Loader(big_ds, batch_size=64, seq_len=256, threads=2, prefetch=2, check_vocab=True)
    state = loader.state_dict()
    done = threading.Event()
    errors = []

    def consume():
        while not done.is_set():
            try:
                next(loader)
            except RuntimeError as e:
                if "closed" in str(e) and action == "close":
                    return
                if "restart" not in str(e):
                    errors.append(e)
                    return

    consumer = threading.Thread(target=consume)
    consumer.start()
    try:
        if action == "restart":
            for _ in range(200):
                loader.load_state_dict(state)
        else:
            time.sleep(0.05)
            loader.close()
    finally:
        done.set()
        consumer.join(timeout=60)
    try:
        assert not consumer.is_alive(), "the consumer hung in next()"
        assert not errors, errors
        if action == "restart":  # after the storm, the loader still resumes exactly
            loader.load_state_dict(state)
            with Loader(big_ds, batch_size=64, seq_len=256, threads=1) as fresh:
                assert torch.equal(next(loader).x, next(fresh).x)
    finally:
        loader.close()


def test_bad_arguments(unique_ds):
    with pytest.raises(ValueError, match="rank"):
        Loader(unique_ds, batch_size=2, seq_len=T, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        Loader(unique_ds, batch_size=0, seq_len=T)
    with pytest.raises(ValueError, match="mode"):
        Loader(unique_ds, mode="shuffled")
    for name, bad in [("batch_size", 2.0), ("seq_len", None), ("seed", "0"), ("threads", 1.5), ("prefetch", True)]:
        with pytest.raises(TypeError, match=f"{name} must be an int"):
            Loader(unique_ds, **{"batch_size": 2, "seq_len": T, name: bad})
    for name, bad, bits in [("threads", 2**31, 31), ("prefetch", 2**40, 31), ("seq_len", 2**63, 63),
                            ("rank", -2**63 - 1, 63)]:  # pybind's error for these named no argument
        with pytest.raises(ValueError, match=rf"{name} must be in \[-2\^{bits}, 2\^{bits}\)"):
            Loader(unique_ds, **{"batch_size": 2, "seq_len": T, name: bad})
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\^64\)"):
        Loader(unique_ds, batch_size=2, seq_len=T, seed=2**64)
    # 0 silently meant the default (DataLoader's num_workers=0 reads as "no workers"); None is the default.
    for name, bad in [("threads", 0), ("prefetch", 0), ("threads", -1), ("prefetch", -2**40)]:
        with pytest.raises(ValueError, match=rf"{name} must be >= 1 \(None means the default, .*\), got {bad}"):
            Loader(unique_ds, **{"batch_size": 2, "seq_len": T, name: bad})
    # (2^61 + 1) * 16 wraps to 16 in 64 bits: the buffer size once did, and the workers overflowed it.
    with pytest.raises(ValueError, match=r"batch_size \* seq_len must be < 2\^56"):
        Loader(unique_ds, batch_size=2**61 + 1, seq_len=T)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_raises_and_never_touches_the_core(unique_ds):
    """A Loader inherited by a forked child (multiprocessing, DataLoader workers) has no worker threads
    there: next() and the state methods raise, close() and collection leak the C++ core instead of
    joining threads that do not exist (it hung or aborted). The child reports through its exit status."""
    loader = Loader(unique_ds, batch_size=2, seq_len=T, threads=2, prefetch=4)
    first = next(loader)
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no exceptions escaping; os._exit only
        status = 0
        try:
            signal.alarm(20)  # a hang becomes SIGALRM, which the parent sees
            for bit, call in enumerate([lambda: next(loader), loader.state_dict, lambda: loader.load_state_dict({})]):
                try:
                    call()
                except RuntimeError as e:
                    if "forked after it was created" not in str(e):
                        status |= 1 << bit
                else:
                    status |= 1 << bit
            loader.close()
            loader.close()
            del loader
            gc.collect()
        except BaseException:
            status |= 1 << 6
        os._exit(status)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung")
    status = done[1]
    assert os.WIFEXITED(status), f"the forked child was killed by signal {os.WTERMSIG(status)}"
    assert os.WEXITSTATUS(status) == 0, f"forked child failures (bits: next, state_dict, load_state_dict, " \
                                        f"other): {os.WEXITSTATUS(status):b}"
    with loader, Loader(unique_ds, batch_size=2, seq_len=T, threads=1) as fresh:  # the parent's loader still works
        same([first, next(loader)], take(fresh, 2))


SHUTDOWN = """
import sys, numpy as np
sys.path.insert(0, {python!r})
from fmcore.data import Loader, write_dataset
root = write_dataset({root!r}, {{"train": [np.arange(100000) % 1000]}}, vocab_size=1000)
idle = Loader(root, batch_size=8, seq_len=64, threads=4, prefetch=16)
kept = [next(idle) for _ in range(3)]  # its workers now block on a full ring; it is never closed
for step, batch in enumerate(Loader(root, batch_size=8, seq_len=64, mode="random", threads=3)):
    if step == 5:
        raise RuntimeError("consumer failed")  # an exception in the training loop
"""


def test_clean_shutdown(tmp_path):
    """An exception in the consumer, with open loaders whose workers are busy or blocked: the process
    exits with the traceback (no hang, no std::terminate, no crash). One subprocess: torch imports are slow."""
    import fmcore

    # The fmcore this test imported (the source tree or an installed wheel) is the one the child runs.
    code = SHUTDOWN.format(python=str(Path(fmcore.__file__).parents[1]), root=str(tmp_path / "ds"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.rstrip().endswith("RuntimeError: consumer failed"), proc.stderr


THREAD_LIMIT = """
import resource, sys, numpy as np
sys.path.insert(0, {python!r})
from fmcore.data import Loader, write_dataset
root = write_dataset({root!r}, {{"train": [np.arange(10000) % 1000]}}, vocab_size=1000)
vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
# Room for a few dozen thread stacks (8 MiB each) and no more.
resource.setrlimit(resource.RLIMIT_AS, (vm + 256 * 2**20, resource.RLIM_INFINITY))
try:
    Loader(root, batch_size=2, seq_len=16, threads=4096)
except RuntimeError as e:
    print("raised:", e)
with Loader(root, batch_size=2, seq_len=16, threads=2) as loader:  # the failed one's threads are gone
    print("batch", tuple(next(loader).x.shape))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_worker_threads_that_cannot_start_raise(tmp_path):
    """A worker thread the system refuses (here: an address-space limit too small for 4096 stacks)
    raises a RuntimeError naming the thread count, after joining the workers already started. It
    used to leave joinable std::threads behind the constructor's exception: std::terminate."""
    import fmcore

    code = THREAD_LIMIT.format(python=str(Path(fmcore.__file__).parents[1]), root=str(tmp_path / "ds"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "raised: could not start loader worker thread" in proc.stdout and "of 4096" in proc.stdout, proc.stdout
    assert "lower `threads`" in proc.stdout
    assert proc.stdout.rstrip().endswith("batch (2, 16)"), proc.stdout


# An LD_PRELOAD shim: the first open() of a shard fails with EINTR, as open(2) does on FUSE and NFS
# mounts when a signal handled in Python arrives while it blocks.
EINTR_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <string.h>
static int fired = 0;
int open(const char* path, int flags, ...) {
  va_list a; va_start(a, flags); int mode = va_arg(a, int); va_end(a);
  if (!fired && strstr(path, ".bin")) { fired = 1; errno = EINTR; return -1; }
  int (*real)(const char*, int, ...) = dlsym(RTLD_NEXT, "open");
  return real(path, flags, mode);
}
"""


def preload_shim(tmp_path, name: str, source: str) -> Path:
    """The C source of an LD_PRELOAD shim compiled to tmp_path/<name>.so (the test skips without a C
    compiler)."""
    import shutil

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    (tmp_path / f"{name}.c").write_text(source)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(tmp_path / f"{name}.so"), str(tmp_path / f"{name}.c"),
                    "-ldl"], check=True)
    return tmp_path / f"{name}.so"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="an LD_PRELOAD shim")
def test_an_interrupted_open_is_retried(unique_ds, tmp_path):
    # open() returning EINTR surfaced as "cannot open: Interrupted system call", a ShardError (a data
    # error ending fmcore train) naming a healthy shard.
    import fmcore

    shim = preload_shim(tmp_path, "eintr", EINTR_SHIM)
    code = (f"import sys; sys.path.insert(0, {str(Path(fmcore.__file__).parents[1])!r})\n"
            f"from fmcore.data import Loader\n"
            f"with Loader({str(unique_ds)!r}, batch_size=2, seq_len=16, threads=1) as loader:\n"
            f"    print(tuple(next(loader).x.shape))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, LD_PRELOAD=str(shim)))
    assert proc.returncode == 0 and proc.stdout.strip() == "(2, 16)", proc.stderr[-2000:]


# An LD_PRELOAD shim that holds back the start of the threads created while it is armed: a loader's
# workers then deliver nothing for 3 s, a wait no machine shortens.
SLOW_START_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>
static int armed = 0;
void arm(int on) { armed = on; }
struct start { void* (*fn)(void*); void* arg; };
static void* slow(void* p) { struct start s = *(struct start*)p; free(p); sleep(3); return s.fn(s.arg); }
int pthread_create(pthread_t* t, const pthread_attr_t* a, void* (*fn)(void*), void* arg) {
  int (*real)(pthread_t*, const pthread_attr_t*, void* (*)(void*), void*) = dlsym(RTLD_NEXT, "pthread_create");
  if (!armed) return real(t, a, fn, arg);
  struct start* s = malloc(sizeof *s); s->fn = fn; s->arg = arg;
  return real(t, a, slow, s);
}
"""

INTERRUPTED_NEXT = """
import ctypes, os, signal, sys, threading
signal.signal(signal.SIGINT, signal.default_int_handler)  # (ignored when started in the background)
sys.path.insert(0, {python!r})
from fmcore.data import Loader
shim = ctypes.CDLL(os.environ["LD_PRELOAD"])
shim.arm(1)
loader = Loader({root!r}, batch_size=2, seq_len=16, threads=1)
shim.arm(0)
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()  # while next() waits
try:
    next(loader)
except KeyboardInterrupt:
    print("interrupted at sample", loader.state_dict()["sample"])
print(next(loader).x.tolist() == next(Loader({root!r}, batch_size=2, seq_len=16, threads=1)).x.tolist())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="an LD_PRELOAD shim")
def test_ctrl_c_while_next_waits_takes_no_batch(unique_ds, tmp_path):
    # Python runs signal handlers between bytecodes: Ctrl-C while next() waited for a batch (slow
    # storage) took effect only once the batch had arrived, which was then dropped.
    import fmcore

    shim = preload_shim(tmp_path, "slow", SLOW_START_SHIM)
    code = INTERRUPTED_NEXT.format(python=str(Path(fmcore.__file__).parents[1]), root=str(unique_ds))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, LD_PRELOAD=str(shim)))
    assert proc.stdout.split("\n")[:2] == ["interrupted at sample 0", "True"], proc.stdout + proc.stderr[-2000:]


MAP_LIMIT = """
import mmap, sys, numpy as np
sys.path.insert(0, {python!r})
from fmcore.data import Loader, ShardError, write_dataset
root = write_dataset({root!r}, {{"train": [np.arange(1000) % 100 for _ in range(64)]}}, vocab_size=100)
held = []  # the process's memory maps used up: alternating protections keep neighbours from merging
try:
    while True:
        held.append(mmap.mmap(-1, 4096, prot=mmap.PROT_READ | (mmap.PROT_WRITE if len(held) % 2 else 0)))
except OSError:
    pass
for m in held[-32:]:  # room for Python to go on, not for the loader's 64 shards
    m.close()
del held[-32:]
try:
    Loader(root, batch_size=2, seq_len=16, threads=1, pin_memory=False)
except ShardError as e:
    print(e)
"""


@pytest.mark.skipif(not os.path.isfile("/proc/sys/vm/max_map_count")
                    or int(Path("/proc/sys/vm/max_map_count").read_text()) > 1 << 18,
                    reason="needs Linux's vm.max_map_count, small enough to reach in a few seconds")
def test_running_out_of_memory_maps_names_the_cause(tmp_path):
    """The loader maps every shard: past vm.max_map_count mmap fails with ENOMEM, which the error gave
    as a bare "Cannot allocate memory" naming the shard, with nothing about the limit or the fix."""
    import fmcore

    code = MAP_LIMIT.format(python=str(Path(fmcore.__file__).parents[1]), root=str(tmp_path / "ds"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    limit = int(Path("/proc/sys/vm/max_map_count").read_text())
    assert "cannot mmap: Cannot allocate memory" in proc.stdout, proc.stdout
    assert f"vm.max_map_count = {limit}" in proc.stdout and "64 in this split" in proc.stdout, proc.stdout
    assert "fmcore prepare --shard-tokens" in proc.stdout, proc.stdout


CHANGED_BEFORE_READ = """
import os, sys
sys.path.insert(0, {python!r})
import numpy as np
from fmcore.data import Loader, ShardError, write_dataset
root = write_dataset({root!r}, {{"train": [np.arange(50000) % 100 for _ in range(2)]}}, vocab_size=100)
loader = Loader(root, batch_size=4, seq_len=64, threads=1, prefetch=1, pin_memory=False)
state = loader.state_dict()
for _ in range(3):
    next(loader)
later = root / f"train_{{loader._core.epoch_order(0)[1]:06d}}.bin"  # the shard the loader reads next
if {how!r} == "truncated":  # (cp over it truncates it first)
    os.truncate(later, 4096)
else:  # rewritten in place, its size unchanged: another dataset's shard copied over it (rsync --inplace)
    with open(later, "r+b") as f:
        f.seek(64)
        f.write(np.full(50000, 7, np.uint16).tobytes())
    os.utime(later, ns=(os.stat(later).st_atime_ns, os.stat(later).st_mtime_ns + 10**9))
try:
    if {resume!r}:
        loader.load_state_dict(state)
    for _ in range(1000):
        next(loader)
    print("no error")
except ShardError as e:
    print(e)
try:
    next(loader)
except ShardError as e:
    print("and again:", e)
"""


@pytest.mark.parametrize("how", ["truncated", "rewritten"])
@pytest.mark.parametrize("resume", [False, True])
def test_a_shard_changed_before_it_is_read_raises_naming_it(tmp_path, how, resume):
    # The loader maps its shards when it starts: one truncated later (cp over it) killed the process with
    # SIGBUS when the loader reached it, no Python error, no name; one rewritten in place with its size
    # unchanged was read without a word, tokens never validated. Changed while being read, a shard still
    # raises SIGBUS (shard.h says why the loader maps).
    import fmcore

    code = CHANGED_BEFORE_READ.format(python=str(Path(fmcore.__file__).parents[1]), root=str(tmp_path / "ds"),
                                      how=how, resume=resume)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    first, again = proc.stdout.splitlines()
    assert first.startswith(f"{tmp_path / 'ds'}/train_00000") and first == again.removeprefix("and again: ")
    assert "the file changed since the loader opened it (100064 bytes then, " \
        f"{4096 if how == 'truncated' else 100064} now" in first, first


def test_the_memory_map_hint_where_the_limit_cannot_be_read(monkeypatch):
    # (/proc not mounted, as in some containers: the hint names the setting without its value)
    from fmcore.data.loader import _with_mmap_hint

    def unreadable(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", unreadable)
    hinted = str(_with_mmap_hint(ShardError(f"a.bin: cannot mmap: {os.strerror(errno.ENOMEM)}"), 3))
    assert "limit on memory maps, vm.max_map_count: the loader maps each shard, 3 in this split" in hinted


DAEMON_AT_EXIT = """
import sys, threading, time
sys.path.insert(0, {python!r})
from fmcore.data import Loader
# A normal run: close() while another thread iterates still raises there.
loader = Loader({root!r}, batch_size=2, seq_len=16, threads=1, prefetch=1, pin_memory=False)
errors = []
def consume(into):
    try:
        for _ in loader:
            pass
    except RuntimeError as e:
        into.append(str(e))
thread = threading.Thread(target=consume, args=(errors,))
thread.start()
time.sleep(0.2)
loader.close()
thread.join(timeout=60)
print("explicit close:", errors)
# Exit with a daemon thread iterating: the loader's finalizer closes it at interpreter exit.
loader = Loader({root!r}, batch_size=2, seq_len=16, threads=1, prefetch=1, pin_memory=False)
def iterate():  # (no except: an error here is the thread's traceback on stderr)
    for _ in loader:
        pass
threading.Thread(target=iterate, daemon=True).start()
time.sleep(0.2)
print("exiting", flush=True)
"""


def test_a_daemon_thread_iterating_at_exit_is_quiet(unique_ds):
    """The finalizer closes the loader at interpreter exit under a daemon thread still in next(): that
    thread printed a traceback ending "RuntimeError: the loader is closed" on every such exit."""
    import fmcore

    code = DAEMON_AT_EXIT.format(python=str(Path(fmcore.__file__).parents[1]), root=str(unique_ds))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("explicit close: ['the loader ") and "closed" in lines[0], lines
    assert lines[1] == "exiting", lines
