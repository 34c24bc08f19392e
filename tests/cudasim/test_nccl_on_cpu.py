"""fmcore's NCCL communicator (csrc/dist/communicator.cpp, what fmcore._C.NcclCommunicator runs) on
ncclsim: the same C++ over a CPU model of NCCL and CUDA streams (ncclsim.cpp), ranks as threads of
this process. Its results, its groups, and above all the paths no GPU test can reach: a peer that
never arrives (at init, at the first collective, mid-run), an asynchronous NCCL error, a CUDA error
while waiting, each of which must abort the communicator and raise, never hang."""

import gc
import threading
import time

import pytest
import torch

SYSTEM_ERROR, INVALID_ARGUMENT, INVALID_USAGE, REMOTE_ERROR = 2, 4, 5, 6  # ncclResult_t
ILLEGAL_ADDRESS = 700  # cudaError_t
LONG = 30.0  # timeout_s for communicators that are not meant to time out
# timeout_s for those that are, once their ranks have met (the margin is for a loaded 2-core CI machine)
SHORT = 2.0


def on_ranks(ncclsim, world, body, join_s=60.0):
    """body(rank, uid) on `world` threads at once (one unique id); their results, rank order. The
    first exception a rank raised is re-raised here; a rank still running after join_s fails."""
    uid = ncclsim.nccl_unique_id()
    results, errors = [None] * world, [None] * world

    def run(rank):
        try:
            results[rank] = body(rank, uid)
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            errors[rank] = e

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(join_s)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    for e in errors:
        if e is not None:
            raise e
    return results


def rank_input(rank, n, dtype):
    g = torch.Generator().manual_seed(1000 + rank)
    if dtype.is_floating_point:
        return torch.randn(n, generator=g).to(dtype)
    lo, hi = {torch.uint8: (0, 80), torch.int8: (-40, 40)}.get(dtype, (-1000, 1000))  # 3 ranks' sums fit
    return torch.randint(lo, hi, (n,), generator=g, dtype=dtype)


def wait_until(predicate, seconds):
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64,
                                   torch.int32, torch.int8, torch.uint8])
def test_collectives_give_what_torch_computes(ncclsim, world, dtype):
    n = 37  # not a multiple of anything
    inputs = [rank_input(r, n * world, dtype) for r in range(world)]
    wide = torch.stack([x.double() for x in inputs])
    floating = dtype.is_floating_point
    ops = ["sum", "max", "min"] + (["avg"] if floating else [])
    reference = {"sum": wide.sum(0), "max": wide.max(0).values, "min": wide.min(0).values,
                 "avg": wide.mean(0)}

    def body(rank, uid):
        comm = ncclsim.NcclCommunicator(uid, world, rank, 0, LONG)
        assert (comm.rank, comm.world_size, comm.device) == (rank, world, 0)
        out = {}
        for op in ops:  # in place, on one stream, with no wait between calls
            out[op] = inputs[rank].clone()
            comm.all_reduce(out[op], op)
        out["reduce_scatter"] = torch.full((n,), -7).to(dtype)
        comm.reduce_scatter(out["reduce_scatter"], inputs[rank], "sum")
        out["all_gather"] = torch.full((n * world * world,), -7).to(dtype)
        comm.all_gather(out["all_gather"], inputs[rank])
        # NCCL's in-place all-gather: this rank's input is its slice of the output
        out["in_place"] = torch.full((n * world,), -7).to(dtype)
        out["in_place"][rank * n:(rank + 1) * n] = inputs[rank][:n]
        comm.all_gather(out["in_place"], out["in_place"][rank * n:(rank + 1) * n])
        out["broadcast"] = inputs[rank].clone()
        comm.broadcast(out["broadcast"], world - 1)
        comm.synchronize()
        comm.close()
        return out

    tol = {torch.bfloat16: {"rtol": 1e-2, "atol": 2e-2 * world}, torch.float16: {"rtol": 1e-3, "atol": 3e-3 * world}}
    tol = tol.get(dtype, {"rtol": 1e-6, "atol": 1e-6})
    for rank, out in enumerate(on_ranks(ncclsim, world, body)):
        for op in ops:
            torch.testing.assert_close(out[op].double(), reference[op].to(dtype).double(), **tol)
        torch.testing.assert_close(out["reduce_scatter"].double(),
                                   reference["sum"][rank * n:(rank + 1) * n].to(dtype).double(), **tol)
        assert torch.equal(out["all_gather"], torch.cat(inputs))
        assert torch.equal(out["in_place"], torch.cat([x[:n] for x in inputs]))
        assert torch.equal(out["broadcast"], inputs[world - 1])


def test_grouped_calls_and_many_in_flight(ncclsim):
    world, n = 2, 1000

    def body(rank, uid):
        comm = ncclsim.NcclCommunicator(uid, world, rank, 0, LONG)
        # Inputs stay referenced until synchronize: on the CPU, unlike CUDA's stream-ordered caching
        # allocator, freed memory is reused at once, under the still-queued collective.
        a, b, mine = torch.full((n,), float(rank + 1)), torch.empty(2 * n), torch.full((n,), float(rank))
        warm = torch.ones(1)
        comm.all_reduce(warm)  # connected: group_end below returns at once
        comm.synchronize()
        if rank == 1:
            time.sleep(0.3)  # rank 0's synchronize must wait for the group, so for this rank
        comm.group_start()
        comm.group_start()  # nested: the calls run at the outermost group_end
        comm.all_reduce(a, "sum")
        comm.group_end()
        comm.all_gather(b, mine)
        comm.group_end()
        comm.synchronize()
        grouped = a.clone(), b.clone()
        # 200 collectives in flight at once (events are recycled as they complete), each on its own
        # tensor: the host's writes are not ordered after queued work as a CUDA stream's would be.
        c = [torch.full((8,), float(i + rank)) for i in range(200)]
        for t in c:
            comm.all_reduce(t, "max")
        comm.synchronize()
        return *grouped, torch.stack(c)

    for a, b, c in on_ranks(ncclsim, world, body):
        assert torch.equal(a, torch.full((n,), 3.0))
        assert torch.equal(b, torch.cat([torch.zeros(n), torch.ones(n)]))
        assert torch.equal(c, torch.arange(1.0, 201.0)[:, None].expand(200, 8))


def test_bad_arguments_raise_naming_them(ncclsim):
    def body(rank, uid):
        comm = ncclsim.NcclCommunicator(uid, 1, 0, 0, LONG)
        x = torch.zeros(6)
        cases = [
            (lambda: comm.reduce_scatter(torch.zeros(3), torch.zeros(4)), ValueError,
             "expected input of 3 elements"),
            (lambda: comm.all_gather(torch.zeros(3), torch.zeros(4)), ValueError, "expected output of 4"),
            (lambda: comm.all_gather(torch.zeros(3), torch.zeros(3, dtype=torch.float64)), ValueError,
             "one dtype, got Double and Float"),
            (lambda: comm.all_reduce(torch.zeros(3, dtype=torch.complex64)), ValueError, "tensor has dtype"),
            (lambda: comm.all_reduce(torch.zeros(3, dtype=torch.bool)), ValueError, "bool only for"),
            (lambda: comm.all_reduce(torch.zeros(3, dtype=torch.int32), "avg"), ValueError,
             "'avg' needs a floating tensor"),
            (lambda: comm.all_reduce(x, "prod"), ValueError, "expected op 'sum', 'avg', 'max' or 'min'"),
            (lambda: comm.broadcast(x, 1), ValueError, "expected 0 <= root < 1, got 1"),
            (lambda: comm.all_reduce(x[::2]), ValueError, "to be contiguous"),
            (lambda: comm.all_reduce(torch.zeros(3, device="meta")), RuntimeError,
             "expected tensor on cuda:0 .* got meta"),
            (lambda: comm.group_end(), RuntimeError, "group_end without group_start"),
        ]
        for call, error, message in cases:
            with pytest.raises(error, match=message):
                call()
        comm.group_start()
        with pytest.raises(RuntimeError, match="synchronize inside a group"):
            comm.synchronize()
        comm.group_end()
        comm.all_reduce(x.fill_(2), "sum")
        comm.synchronize()
        assert torch.equal(x, torch.full((6,), 2.0))
        assert ncclsim.sim_comm_state(uid, 0) == "live"
        # NCCL refusing an argument does spoil it: a non-blocking communicator keeps the failed call's
        # result as its state, which every later call returns, so it is aborted at once
        ncclsim.sim_fail_next("ncclAllReduce", INVALID_ARGUMENT, "count too large")
        with pytest.raises(ncclsim.NcclError, match=r"ncclAllReduce failed: invalid argument.*\(count too large\)"):
            comm.all_reduce(x)
        assert not comm.healthy and ncclsim.sim_comm_state(uid, 0) == "aborted"

    on_ranks(ncclsim, 1, body)


def test_in_place_layouts_are_nccls_only(ncclsim):
    def body(rank, uid):
        comm = ncclsim.NcclCommunicator(uid, 2, rank, 0, LONG)
        n = 3
        flat = torch.zeros(2 * n)
        flat[rank * n:(rank + 1) * n] = rank + 1
        comm.all_gather(flat, flat[rank * n:(rank + 1) * n])  # this rank's slice: NCCL's in-place form
        big = torch.arange(2.0 * n) + rank
        comm.reduce_scatter(big[rank * n:(rank + 1) * n], big)
        comm.synchronize()
        assert torch.equal(flat, torch.tensor([1.0] * n + [2.0] * n))
        assert torch.equal(big[rank * n:(rank + 1) * n], (2 * torch.arange(2.0 * n) + 1)[rank * n:(rank + 1) * n])
        other = (1 - rank) * n  # the other rank's slice: undefined on NCCL
        with pytest.raises(ValueError, match=f"all_gather: input overlaps the flat buffer but is not its rank-{rank}"):
            comm.all_gather(flat, flat[other:other + n])
        with pytest.raises(ValueError, match="reduce_scatter: output overlaps"):
            comm.reduce_scatter(big[other:other + n], big)
        assert comm.healthy

    on_ranks(ncclsim, 2, body)


def test_a_timeout_of_centuries_is_not_an_overflow(ncclsim):
    # steady_clock's int64 nanoseconds hold 292 years: timedelta.max (8.6e13 s, "never") overflowed into
    # a deadline in the past, and init was "still in progress after the timeout" at once.
    def body(rank, uid):
        comm = ncclsim.NcclCommunicator(uid, 1, 0, 0, 8.64e13)
        x = torch.ones(3)
        comm.all_reduce(x)
        comm.synchronize()
        return comm.healthy

    assert on_ranks(ncclsim, 1, body) == [True]


@pytest.mark.parametrize("how", ["a call in the group fails", "abort() in the group"])
def test_an_abort_inside_a_group_ends_the_group(ncclsim, how):
    # NCCL's group depth belongs to the thread: group_end raised before calling ncclGroupEnd on an
    # aborted communicator, leaving this thread in an open group for good, where every later NCCL
    # call (a new communicator's, torch's) is only recorded: a silent no-op.
    def body(rank, uid):
        comm = ncclsim.NcclCommunicator(uid, 1, 0, 0, LONG)
        comm.group_start()
        if how == "abort() in the group":
            comm.abort("stopping")
        else:
            ncclsim.sim_fail_next("ncclAllGather", SYSTEM_ERROR, "link down in a group")
            with pytest.raises(ncclsim.NcclError, match="link down in a group"):
                comm.all_gather(torch.zeros(2), torch.zeros(2))
        assert ncclsim.sim_comm_state(uid, 0) == "live"  # NCCL aborts at the group's end, not inside
        with pytest.raises(ncclsim.NcclError, match="communicator unusable"):
            comm.all_reduce(torch.zeros(2))
        with pytest.raises(ncclsim.NcclError, match="communicator unusable"):
            comm.group_end()
        assert ncclsim.sim_comm_state(uid, 0) == "aborted"
        fresh_uid = ncclsim.nccl_unique_id()
        fresh = ncclsim.NcclCommunicator(fresh_uid, 1, 0, 0, LONG)
        x = torch.full((4,), 3.0)
        fresh.all_reduce(x, "sum")
        fresh.synchronize()  # (with the thread's group left open, this returned at once, x untouched)
        return ncclsim.sim_comm_state(fresh_uid, 0)

    assert on_ranks(ncclsim, 1, body) == ["live"]


def test_the_watchdog_waits_for_an_open_group_to_end(ncclsim):
    # A timeout the watchdog notices while the caller's group is open: aborting then (from the
    # watchdog's thread) would free a communicator the caller's open group still refers to.
    rank0_done = threading.Event()

    def body(rank, uid):
        comm = ncclsim.NcclCommunicator(uid, 2, rank, 0, SHORT)
        x = torch.ones(2)  # (alive until the stream is done with it, as a caller must keep it)
        comm.all_reduce(x)
        comm.synchronize()
        if rank == 1:
            rank0_done.wait(30)
            return None
        try:
            comm.all_reduce(x)  # rank 1 never comes: times out
            comm.group_start()
            time.sleep(SHORT + 1.5)  # the watchdog sees the timeout here
            assert ncclsim.sim_comm_state(uid, 0) == "live"
            with pytest.raises(ncclsim.NcclError, match="all_reduce enqueued .* has not completed"):
                comm.group_end()
            return ncclsim.sim_comm_state(uid, 0)
        finally:
            rank0_done.set()

    assert on_ranks(ncclsim, 2, body)[0] == "aborted"


def test_an_nccl_failure_aborts_and_later_calls_raise(ncclsim):
    def body(rank, uid):
        comm = ncclsim.NcclCommunicator(uid, 1, 0, 0, LONG)
        ncclsim.sim_fail_next("ncclAllGather", SYSTEM_ERROR, "socket closed by peer")
        with pytest.raises(ncclsim.NcclError,
                           match=r"ncclAllGather failed: unhandled system error.*\(socket closed by peer\)"):
            comm.all_gather(torch.zeros(2), torch.zeros(2))
        assert not comm.healthy and ncclsim.sim_comm_state(uid, 0) == "aborted"
        with pytest.raises(ncclsim.NcclError, match="communicator unusable: .*socket closed by peer"):
            comm.all_reduce(torch.zeros(2))

    on_ranks(ncclsim, 1, body)


def test_an_earlier_failures_message_is_not_blamed(ncclsim):
    # ncclGetLastError is process-wide and never cleared: a later failure that left no message of its
    # own was reported with the earlier one's (another communicator's, or torch's) as its cause.
    def body(rank, uid):
        first = ncclsim.NcclCommunicator(uid, 1, 0, 0, LONG)
        ncclsim.sim_fail_next("ncclBroadcast", SYSTEM_ERROR, "an earlier cause")
        with pytest.raises(ncclsim.NcclError, match=r"\(an earlier cause\)"):
            first.broadcast(torch.zeros(2), 0)
        second = ncclsim.NcclCommunicator(ncclsim.nccl_unique_id(), 1, 0, 0, LONG)
        ncclsim.sim_fail_next("ncclBroadcast", SYSTEM_ERROR, "an earlier cause")  # the message unchanged
        with pytest.raises(ncclsim.NcclError) as raised:
            second.broadcast(torch.zeros(2), 0)
        assert "unhandled system error" in str(raised.value) and "earlier cause" not in str(raised.value)

    on_ranks(ncclsim, 1, body)


def test_an_error_reached_while_in_progress_aborts_whatever_its_code(ncclsim):
    # NCCL reports e.g. two ranks on one GPU as ncclInvalidUsage, asynchronously when non-blocking:
    # unlike the same code returned by a call, the communicator is then broken and must be aborted.
    def body(rank, uid):
        def two_ranks_on_one_gpu():
            assert wait_until(lambda: ncclsim.sim_comm_state(uid, 0) == "live", 10)
            ncclsim.sim_async_error(uid, 0, INVALID_USAGE, "Duplicate GPU detected")

        injector = threading.Thread(target=two_ranks_on_one_gpu)
        injector.start()
        with pytest.raises(ncclsim.NcclError,
                           match=r"ncclCommInitRankConfig failed: invalid usage.*\(Duplicate GPU detected\)"):
            ncclsim.NcclCommunicator(uid, 2, 0, 0, LONG)
        injector.join()
        return ncclsim.sim_comm_state(uid, 0)

    assert on_ranks(ncclsim, 1, body) == ["aborted"]


def test_init_without_its_peer_times_out_and_aborts(ncclsim):
    def body(rank, uid):
        t0 = time.monotonic()
        with pytest.raises(ncclsim.NcclError, match="ncclCommInitRankConfig still in progress after the timeout"):
            ncclsim.NcclCommunicator(uid, 2, 0, 0, 0.5)
        assert ncclsim.sim_comm_state(uid, 0) == "aborted"
        return time.monotonic() - t0

    (took,) = on_ranks(ncclsim, 1, body)
    assert 0.5 <= took < 10


def test_first_collective_without_its_peer_times_out(ncclsim):
    # NCCL connects ranks at their first collective: a missing peer shows up there, as a call that stays
    # in progress; the communicator must give up after its timeout.
    rank0_done = threading.Event()

    def body(rank, uid):
        comm = ncclsim.NcclCommunicator(uid, 2, rank, 0, SHORT)
        if rank == 1:  # joins, then never calls
            rank0_done.wait(30)
            return None
        try:
            with pytest.raises(ncclsim.NcclError, match="ncclAllReduce still in progress after the timeout"):
                comm.all_reduce(torch.zeros(4))
            return ncclsim.sim_comm_state(uid, 0)
        finally:
            rank0_done.set()

    assert on_ranks(ncclsim, 2, body)[0] == "aborted"


@pytest.mark.parametrize("waiting_in", ["synchronize", "watchdog"])
def test_a_collective_its_peer_never_joins_times_out(ncclsim, waiting_in):
    # Mid-run, the collective is enqueued and the call returns; the stream then waits on the missing
    # peer. synchronize() must raise after the timeout; and with no call at all, the watchdog thread
    # must abort the communicator by itself (so NCCL's kernels return and the stream drains).
    rank0_done = threading.Event()

    def body(rank, uid):
        comm = ncclsim.NcclCommunicator(uid, 2, rank, 0, SHORT)
        x = torch.ones(4)
        comm.all_reduce(x)  # both ranks: connected
        comm.synchronize()
        if rank == 1:
            rank0_done.wait(30)
            return None
        try:
            comm.all_reduce(x)  # rank 1 never comes
            assert comm.healthy  # enqueued, not failed
            if waiting_in == "synchronize":
                with pytest.raises(ncclsim.NcclError, match=r"all_reduce enqueued .* s ago has not completed"):
                    comm.synchronize()
            else:
                assert wait_until(lambda: not comm.healthy, 10), "the watchdog did not abort"
                with pytest.raises(ncclsim.NcclError, match=r"all_reduce enqueued .* s ago has not completed"):
                    comm.check()
            return ncclsim.sim_comm_state(uid, 0)
        finally:
            rank0_done.set()

    assert on_ranks(ncclsim, 2, body)[0] == "aborted"


def test_an_asynchronous_error_aborts(ncclsim):
    def body(rank, uid):
        comm = ncclsim.NcclCommunicator(uid, 2, rank, 0, LONG)
        x = torch.ones(4)
        comm.all_reduce(x)
        comm.synchronize()
        if rank == 0:
            ncclsim.sim_async_error(uid, 0, REMOTE_ERROR, "rank 1 exited")
            assert wait_until(lambda: not comm.healthy, 10), "the watchdog did not see the error"
            with pytest.raises(ncclsim.NcclError, match=r"an asynchronous operation failed: remote process "
                                                        r"exited or there was a network error \(rank 1 exited\)"):
                comm.check()
        del comm  # rank 1's is aborted by its destructor
        gc.collect()
        return ncclsim.sim_comm_state(uid, rank)

    assert on_ranks(ncclsim, 2, body) == ["aborted", "aborted"]


def test_a_cuda_error_while_waiting_aborts(ncclsim):
    def body(rank, uid):
        comm = ncclsim.NcclCommunicator(uid, 1, 0, 0, LONG)
        ncclsim.sim_fail_next_event_query(ILLEGAL_ADDRESS)
        x = torch.ones(4)
        comm.all_reduce(x)
        with pytest.raises(ncclsim.NcclError, match="CUDA error while waiting for all_reduce: an illegal memory"):
            comm.synchronize()
        return ncclsim.sim_comm_state(uid, 0)

    assert on_ranks(ncclsim, 1, body) == ["aborted"]


def test_mismatched_collectives_fail_on_every_rank(ncclsim):
    def body(rank, uid):
        comm = ncclsim.NcclCommunicator(uid, 2, rank, 0, LONG)
        x = torch.ones(4 + rank)
        # A bug in the caller: different sizes. The model reports it (real NCCL would hang or corrupt
        # memory) as an asynchronous error, which reaches the rank in the call (still connecting) or
        # in synchronize, and must abort the communicator either way.
        with pytest.raises(ncclsim.NcclError, match=r"internal error.*\(collective #0 does not match"):
            comm.all_reduce(x)
            comm.synchronize()
        assert not comm.healthy

    on_ranks(ncclsim, 2, body)


def test_close_abort_and_destructor(ncclsim):
    def body(rank, uid):
        comm = ncclsim.NcclCommunicator(uid, 2, rank, 0, LONG)
        x = torch.ones(4)
        comm.all_reduce(x)
        if rank == 0:
            comm.close()  # graceful: finalize and destroy
            state = ncclsim.sim_comm_state(uid, 0)
            with pytest.raises(ncclsim.NcclError, match="the communicator was closed"):
                comm.all_reduce(x)
            comm.abort("too late")  # harmless after close
            return state
        comm.synchronize()
        del comm  # never closed: the destructor aborts
        gc.collect()
        return ncclsim.sim_comm_state(uid, 1)

    assert on_ranks(ncclsim, 2, body) == ["closed", "aborted"]

    def user_abort(rank, uid):
        comm = ncclsim.NcclCommunicator(uid, 1, 0, 0, LONG)
        comm.abort("stopping the job")
        assert not comm.healthy
        with pytest.raises(ncclsim.NcclError, match="unusable: stopping the job"):
            comm.broadcast(torch.ones(2), 0)
        return ncclsim.sim_comm_state(uid, 0)

    assert on_ranks(ncclsim, 1, user_abort) == ["aborted"]
