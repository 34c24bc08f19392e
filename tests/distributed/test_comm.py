"""fmcore.dist.Communicator against torch.distributed and against a float64 reference, on 2 CPU ranks
(gloo), and fmcore's NCCL communicator at world size 1 on CUDA.

Every rank's input is regenerated from a seed by every other rank, so each rank knows the exact
expected result of a collective without communicating. All the 2-rank checks run in one process
group (one fork) and are reported as separate tests.
"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist

from fmcore import _C
from fmcore.dist import Communicator, nccl_available
from tests.distributed.launch import run_inline, run_ranks

# Odd sizes: 1 (a single element), 7 and 1023 (not divisible by any vector width), 4099 (prime, more
# than one gloo chunk); each is the per-rank slice, so flat buffers are world * n.
SIZES = [1, 7, 1023, 4099]
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
INTS = [torch.int32, torch.int64]


def make(rank: int, n: int, dtype: torch.dtype, salt: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + 17 * n + salt)
    if dtype.is_floating_point:
        return torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    return torch.randint(-1000, 1000, (n,), generator=g, dtype=torch.int64).to(dtype)


def reduce_ref(tensors: list[torch.Tensor], op: str) -> torch.Tensor:
    """The reduction in float64 (exact for 2 ranks of these dtypes), cast back once."""
    dt = tensors[0].dtype
    x = torch.stack([t.to(torch.float64 if dt.is_floating_point else torch.int64) for t in tensors])
    out = {"sum": x.sum(0), "avg": x.mean(0) if dt.is_floating_point else None,
           "max": x.max(0).values, "min": x.min(0).values}[op]
    return out.to(dt)


def assert_reduced(got: torch.Tensor, inputs: list[torch.Tensor], op: str, torch_result: torch.Tensor):
    ref = reduce_ref(inputs, op)
    if op == "avg":
        # sum in the dtype, then a division: two roundings where the reference has one.
        eps = torch.finfo(got.dtype).eps
        torch.testing.assert_close(got, ref, rtol=2 * eps, atol=2 * eps)
    else:
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.testing.assert_close(got, torch_result, rtol=0, atol=0)


def check_all_reduce(comm, rank, world):
    for dtype in FLOATS + INTS:
        for n in SIZES:
            for op in ("sum", "avg", "max", "min") if dtype.is_floating_point else ("sum", "max", "min"):
                inputs = [make(r, n, dtype) for r in range(world)]
                t = inputs[rank].clone()
                comm.all_reduce(t, op)
                expect = inputs[rank].clone()
                if op == "avg":
                    dist.all_reduce(expect, dist.ReduceOp.SUM)
                    expect /= world
                else:
                    dist.all_reduce(expect, {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                             "min": dist.ReduceOp.MIN}[op])
                assert_reduced(t, inputs, op, expect)


def check_reduce_scatter(comm, rank, world):
    for dtype in FLOATS + INTS:
        for n in SIZES:
            for op in ("sum", "avg") if dtype.is_floating_point else ("sum",):
                inputs = [make(r, world * n, dtype, salt=1) for r in range(world)]
                out = torch.empty(n, dtype=dtype)
                comm.reduce_scatter(out, inputs[rank].clone(), op)
                full = inputs[rank].clone()
                dist.all_reduce(full, dist.ReduceOp.SUM)
                expect = full[rank * n:(rank + 1) * n]
                if op == "avg":
                    expect = expect / world
                mine = [x[rank * n:(rank + 1) * n] for x in inputs]
                assert_reduced(out, mine, op, expect)


def check_all_gather(comm, rank, world):
    for dtype in FLOATS + INTS + [torch.bool, torch.uint8]:
        for n in SIZES:
            inputs = [make(r, n, dtype if dtype != torch.bool else torch.int32, salt=2) for r in range(world)]
            if dtype == torch.bool:
                inputs = [x > 0 for x in inputs]
            inputs = [x.to(dtype) for x in inputs]
            out = torch.empty(world * n, dtype=dtype)
            comm.all_gather(out, inputs[rank])
            assert torch.equal(out, torch.cat(inputs)), (dtype, n)


def check_broadcast(comm, rank, world):
    for src in range(world):
        for dtype in (torch.float32, torch.bfloat16, torch.int64):
            t = make(rank, 1023, dtype, salt=3)
            comm.broadcast(t, src=src)
            assert torch.equal(t, make(src, 1023, dtype, salt=3))


def check_async(comm, rank, world):
    # Several collectives in flight at once, waited in reverse order.
    inputs = [[make(r, n, torch.float32, salt=4) for r in range(world)] for n in SIZES]
    tensors = [x[rank].clone() for x in inputs]
    works = [comm.all_reduce(t, "avg", async_op=True) for t in tensors]
    out = torch.empty(world * 7, dtype=torch.float16)
    gathered = [make(r, 7, torch.float16, salt=5) for r in range(world)]
    works.append(comm.all_gather(out, gathered[rank], async_op=True))
    for w in reversed(works):
        w.wait()
    for t, x in zip(tensors, inputs):
        torch.testing.assert_close(t, reduce_ref(x, "avg"), rtol=2e-7, atol=2e-7)
    assert torch.equal(out, torch.cat(gathered))


def check_grouped(comm, rank, world):
    a = make(rank, 7, torch.float32, salt=6)
    b = torch.empty(3)
    with comm.grouped():
        comm.all_reduce(a, "sum")
        comm.reduce_scatter(b, make(rank, 3 * world, torch.float32, salt=7), "sum")
    torch.testing.assert_close(a, reduce_ref([make(r, 7, torch.float32, salt=6) for r in range(world)], "sum"))
    full = reduce_ref([make(r, 3 * world, torch.float32, salt=7) for r in range(world)], "sum")
    torch.testing.assert_close(b, full[3 * rank:3 * rank + 3])


def check_bad_inputs(comm, rank, world):
    with pytest.raises(ValueError, match="expected input of 8 elements"):
        comm.reduce_scatter(torch.empty(4), torch.empty(7))
    with pytest.raises(ValueError, match="expected output of 8 elements"):
        comm.all_gather(torch.empty(7), torch.empty(4))
    with pytest.raises(ValueError, match="one dtype"):
        comm.all_gather(torch.empty(8), torch.empty(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="'avg' needs a floating"):
        comm.all_reduce(torch.zeros(3, dtype=torch.int32), "avg")
    with pytest.raises(ValueError, match="expected op"):
        comm.all_reduce(torch.zeros(3), "prod")
    with pytest.raises(ValueError, match="expected 0 <= src"):
        comm.broadcast(torch.zeros(3), src=world)
    if not nccl_available():  # the CPU machines: asking for NCCL names what is missing
        with pytest.raises(RuntimeError, match="needs fmcore built with NCCL and a CUDA device"):
            Communicator(backend="nccl")


def check_in_place(comm, rank, world):
    n = 5
    # NCCL's in-place layouts: this rank's slice of the flat buffer
    flat = torch.zeros(world * n)
    flat[rank * n:(rank + 1) * n] = rank + 1
    comm.all_gather(flat, flat[rank * n:(rank + 1) * n])
    assert torch.equal(flat, torch.arange(1.0, world + 1).repeat_interleave(n))
    big = torch.arange(world * n, dtype=torch.float32) + rank
    comm.reduce_scatter(big[rank * n:(rank + 1) * n], big, "sum")
    want = sum(torch.arange(world * n, dtype=torch.float32) + r for r in range(world))[rank * n:(rank + 1) * n]
    assert torch.equal(big[rank * n:(rank + 1) * n], want)
    # any other overlap is undefined on NCCL: refused on every backend alike
    off = 1 if rank == 0 else 0  # not rank * n
    with pytest.raises(ValueError, match=rf"input overlaps output but is not its rank-{rank} slice"):
        comm.all_gather(flat, flat[off:off + n])
    with pytest.raises(ValueError, match=rf"output overlaps input but is not its rank-{rank} slice"):
        comm.reduce_scatter(big[off:off + n], big)


CHECKS = {f.__name__.removeprefix("check_"): f for f in
          [check_all_reduce, check_reduce_scatter, check_all_gather, check_broadcast, check_async,
           check_grouped, check_bad_inputs, check_in_place]}


def _body(rank, world):
    comm = Communicator(backend="torch")
    assert (comm.rank, comm.world_size, comm.backend) == (rank, world, "torch")
    results = {}
    for name, check in CHECKS.items():
        try:
            check(comm, rank, world)
            results[name] = None
        except Exception:  # noqa: BLE001  (reported per check)
            results[name] = traceback.format_exc()
        dist.barrier()  # a failed check must not leave the other rank inside a collective
    return results


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    return run_ranks(_body, 2, tmp_path_factory.mktemp("comm"))


@pytest.mark.parametrize("name", list(CHECKS))
def test_collective_two_ranks(two_rank_results, name):
    for rank, results in enumerate(two_rank_results):
        assert results[name] is None, f"rank {rank}:\n{results[name]}"


def test_needs_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        Communicator()


# ---- CUDA: fmcore's NCCL communicator at world size 1 (the H100 machine has one GPU). With one rank
# every reduction is the identity, so these check the plumbing (unique id through the store, dtype
# mapping, streams, async/grouped paths, error reporting), not the arithmetic across ranks.
def _cuda_body(rank, world):
    comm = Communicator(backend="nccl", device=torch.device("cuda", 0))
    assert comm.backend == "nccl"
    results = {}
    for dtype in FLOATS + INTS:
        for n in SIZES:
            x = make(0, n, dtype).cuda()
            t = x.clone()
            comm.all_reduce(t, "sum")
            results[f"all_reduce {dtype} {n}"] = torch.equal(t, x)
            if dtype.is_floating_point:
                t = x.clone()
                comm.all_reduce(t, "avg")
                results[f"avg {dtype} {n}"] = torch.equal(t, x)
            out = torch.full_like(x, 7)
            comm.reduce_scatter(out, x, "sum")
            results[f"reduce_scatter {dtype} {n}"] = torch.equal(out, x)
            out = torch.full_like(x, 7)
            comm.all_gather(out, x)
            results[f"all_gather {dtype} {n}"] = torch.equal(out, x)
            t = x.clone()
            comm.broadcast(t, 0)
            results[f"broadcast {dtype} {n}"] = torch.equal(t, x)
    # async on the side stream: the result is ordered before later work on the current stream
    big = torch.randn(1 << 22, device="cuda")
    ref = big.clone()
    work = comm.all_reduce(big, "avg", async_op=True)
    work.wait()
    results["async"] = torch.equal(big * 1, ref)
    with comm.grouped():
        a = ref.clone()
        comm.all_reduce(a, "sum")
        b = torch.empty(7, device="cuda")
        comm.all_gather(b, torch.arange(7.0, device="cuda"))
    comm.synchronize()
    results["grouped"] = torch.equal(a, ref) and torch.equal(b, torch.arange(7.0, device="cuda"))
    try:
        comm._nccl.all_reduce(torch.zeros(3), "sum")  # a CPU tensor reaches the C++ checks
        results["cpu tensor rejected"] = False
    except RuntimeError as e:
        results["cpu tensor rejected"] = "expected tensor on cuda:0" in str(e)
    try:
        comm._nccl.all_reduce(torch.zeros(3, dtype=torch.complex64, device="cuda"), "sum")
        results["complex rejected"] = False
    except ValueError as e:
        results["complex rejected"] = "dtype" in str(e)
    comm._nccl.abort("test abort")
    try:
        comm.all_reduce(torch.zeros(3, device="cuda"))
        results["aborted raises"] = False
    except _C.NcclError as e:
        results["aborted raises"] = "test abort" in str(e)
    return results


@pytest.mark.cuda
def test_nccl_world_size_1(tmp_path):
    if not _C.has_nccl:
        pytest.fail("fmcore was built without NCCL on a CUDA machine")
    # In this process: a forked child could not use CUDA once the parent has initialised it.
    results = run_inline(_cuda_body, tmp_path)
    failed = [k for k, ok in results.items() if not ok]
    assert not failed, failed


def test_nccl_constructor_validates_before_touching_the_gpu():
    # CI builds with CUDA (so with NCCL) on machines without a GPU: the checks run there too.
    if not _C.has_nccl:
        pytest.skip("fmcore was built without NCCL")
    uid = _C.nccl_unique_id()
    assert isinstance(uid, bytes) and len(uid) == 128
    with pytest.raises(ValueError, match="expected unique_id of 128 bytes, got 5"):
        _C.NcclCommunicator(b"short", 2, 0, 0, 1.0)
    with pytest.raises(ValueError, match="expected 0 <= rank < world_size, got rank 2, world_size 2"):
        _C.NcclCommunicator(uid, 2, 2, 0, 1.0)
    with pytest.raises(ValueError, match="timeout_s > 0"):
        _C.NcclCommunicator(uid, 1, 0, 0, 0.0)
    assert len(_C.nccl_version()) == 3


_NO_PEER = """
import time, fmcore
from fmcore import _C
t0 = time.monotonic()
try:
    _C.NcclCommunicator(_C.nccl_unique_id(), 2, 0, 0, 3.0)
except _C.NcclError as e:
    print("raised after", round(time.monotonic() - t0, 1), "s:", e)
else:
    print("no error")
"""


@pytest.mark.cuda
def test_nccl_init_without_peers_times_out_and_aborts():
    # world_size 2 with no second rank: the non-blocking init never completes; the communicator must
    # abort after its 3 s timeout and raise instead of hanging. In a child process, so that a hang
    # (the bug this guards against) fails the test instead of stalling the suite.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _NO_PEER], capture_output=True, text=True, timeout=180)
    assert "raised after" in out.stdout and "still in progress after the timeout" in out.stdout, (
        out.stdout + out.stderr)


# ---- the NCCL unique id's trip through the store, with fmcore._C's NCCL names faked (no GPU needed)
class _FakeNccl:
    """Stands in for fmcore._C: ids name the rank and call that made them; a communicator is its id."""

    has_nccl = True

    def __init__(self, rank):
        self.rank, self.made = rank, 0

    def nccl_unique_id(self):
        self.made += 1
        return f"rank {self.rank} id {self.made}".encode().ljust(128, b"\0")

    def NcclCommunicator(self, uid, world, rank, device, timeout_s):  # noqa: N802 (the _C name)
        return uid.rstrip(b"\0").decode()


def _unique_id_body(rank, world):
    from datetime import timedelta

    from fmcore.dist import comm as comm_mod

    dist.distributed_c10d._get_default_store().set_timeout(timedelta(seconds=10))  # a hang fails fast
    comm_mod._C = _FakeNccl(rank)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank makes every group
    mine = pairs[rank // 2]
    ids = []
    # The pairs create different numbers of communicators (pipeline stages doing different things),
    # then the world creates one: its members must agree on its id whatever the groups did before.
    for _ in range(2 if rank < 2 else 1):
        ids.append(Communicator(mine, backend="torch")._create_nccl())
    ids.append(Communicator(backend="torch")._create_nccl())
    ids.append(Communicator(mine, backend="torch")._create_nccl())  # and a pair's later one
    return ids


def test_nccl_unique_id_keys_are_per_group(tmp_path):
    ids = run_ranks(_unique_id_body, 4, tmp_path, timeout=60)
    world_ids = [r[-2] for r in ids]
    assert len(set(world_ids)) == 1 and world_ids[0].startswith("rank 0 "), world_ids
    assert ids[0][-1] == ids[1][-1] and ids[2][-1] == ids[3][-1], ids


def _timeout_body(rank, world):
    from datetime import timedelta

    from fmcore.dist import comm as comm_mod

    seen = []

    class Fake(_FakeNccl):
        def NcclCommunicator(self, uid, world, rank, device, timeout_s):  # noqa: N802
            seen.append(timeout_s)

    comm_mod._C = Fake(rank)
    Communicator(backend="torch", timeout=timedelta(seconds=90))._create_nccl()
    for bad in (timedelta(0), timedelta(seconds=-1), 30):
        with pytest.raises(ValueError, match="expected timeout a positive datetime.timedelta"):
            Communicator(backend="torch", timeout=bad)
    return seen


def test_timeout_is_a_positive_timedelta(tmp_path):
    # A number (seconds?) failed with an AttributeError about total_seconds, on NCCL only; a non-positive
    # timeout passed on the torch backend, whose collectives ignore it.
    (seen,) = run_ranks(_timeout_body, 1, tmp_path)
    assert seen == [90.0]


class _ClosableNccl:
    """Stands in for the C++ NCCL communicator (no GPU here): enough to close it."""

    def close(self):
        pass


def _closed_body(rank, world):
    comm = Communicator(backend="torch")
    comm._nccl, comm.backend = _ClosableNccl(), "nccl"
    comm.close()
    t = torch.ones(4)
    calls = {"all_reduce": lambda: comm.all_reduce(t), "broadcast": lambda: comm.broadcast(t),
             "reduce_scatter": lambda: comm.reduce_scatter(t[:4], t), "all_gather": lambda: comm.all_gather(t, t[:4]),
             "grouped": lambda: comm.grouped().__enter__()}
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=r"used after close\(\)"):
            call()
    return True


def test_a_closed_nccl_communicator_refuses_collectives(tmp_path):
    # Its calls went on over torch.distributed (the group's gloo or NCCL), silently another backend.
    assert run_ranks(_closed_body, 1, tmp_path) == [True]  # (forked: a group made in this process hung later forks)


def _arguments_body(rank, world):
    with pytest.raises(ValueError, match="expected backend 'auto', 'nccl' or 'torch', got 'gloo'"):
        Communicator(backend="gloo")
    comm = Communicator(backend="torch")
    strided = torch.zeros(4, 2)[:, 0]  # 4 elements, every other one of a buffer
    with pytest.raises(ValueError, match="all_gather: expected contiguous input and output"):
        comm.all_gather(strided, torch.ones(4))
    with pytest.raises(ValueError, match="reduce_scatter: expected contiguous input and output"):
        comm.reduce_scatter(torch.zeros(4), strided)
    work = comm.all_reduce(torch.ones(3), async_op=True)
    work.wait()
    work.wait()  # (a second wait is a no-op)
    comm.close()  # the torch backend holds nothing to release: it goes on working
    t = torch.ones(3)
    comm.all_reduce(t)
    return t.tolist()


def test_a_communicators_arguments_are_checked_by_name(tmp_path):
    assert run_ranks(_arguments_body, 1, tmp_path) == [[1.0, 1.0, 1.0]]
