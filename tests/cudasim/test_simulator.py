"""fmsim itself: kernels with known bugs (selftest.cu) must be reported, a correct one must run.
Without these, a simulator that ran nothing, or ignored barriers, would pass every kernel test."""

import math

import pytest

SUCCESS, INVALID_VALUE, INVALID_CONFIGURATION = 0, 1, 9


def test_correct_block_sum(sim):
    # 3 blocks of 96 threads over in[i] = i % 7: shuffles, shared memory and a barrier all work.
    err, total = sim.sim_selftest("sum")
    assert err == SUCCESS
    assert total == sum(i % 7 for i in range(3 * 96))


@pytest.mark.parametrize(
    "case,message",
    [
        ("divergent", r"deadlock: divergent barrier/shuffle in divergent_kernel block \(0,0,0\)"),
        ("exited_lane", r"full-mask warp shuffle/sync with a returned lane.* in exited_lane_kernel"),
        ("misaligned", r"misaligned vector access.* in misaligned_kernel"),
        ("launch_bounds", r"256 threads a block exceeds __launch_bounds__\(128\)"),
        ("ldmatrix_global", r"ldmatrix row address: address outside shared memory.* in ldmatrix_global"),
    ],
)
def test_faults_are_reported(sim, case, message):
    with pytest.raises(RuntimeError, match=message):
        sim.sim_selftest(case)


def test_launch_validation(sim):
    assert sim.sim_selftest("block_too_large")[0] == INVALID_CONFIGURATION
    # 64 KiB of dynamic shared memory needs the opt-in ...
    assert sim.sim_selftest("smem_no_optin")[0] == INVALID_VALUE
    # ... and then runs, its memory poisoned with NaN before the block starts.
    err, value = sim.sim_selftest("smem_optin")
    assert err == SUCCESS and math.isnan(value)


def test_static_shared_poisoned_between_blocks(sim):
    err, value = sim.sim_selftest("stale_shared")
    assert err == SUCCESS and math.isnan(value)


def test_cp_async_lands_at_its_wait(sim):
    # read before the wait: NaN; wait_group 1 lands the older group only; wait_group 0 the rest
    assert sim.sim_selftest("cp_async") == (SUCCESS, 1.0)


def test_mma_follows_the_ptx_fragment_layout(sim):
    err, worst = sim.sim_selftest("mma")
    assert err == SUCCESS and worst == 0.0
