"""fmsim itself: kernels with known bugs (selftest.cu) must be reported, a correct one must run.
Without these, a simulator that ran nothing, or ignored barriers, would pass every kernel test."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.ops.test_wgmma_probe import FORMS, check_probe

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
        ("atomic_add2_misaligned", r"misaligned float2 atomicAdd.* in atomic_add2_kernel"),
        # wgmma: never waited for, waited for but never committed, d written while in flight, a
        # descriptor without the 128-byte swizzle, operand rows past the shared memory, smem_addr
        # of a static __shared__ array, operands stored with no fence.proxy.async after them, an
        # operand overwritten in flight, no wgmma.fence before the first wgmma, register A
        # rewritten in flight, a wgmma issued by half a warpgroup
        ("wgmma_misuse_0", r"wgmma issued but never waited for.* in wgmma_misuse_kernel"),
        ("wgmma_misuse_1", r"wgmma issued but never waited for.* in wgmma_misuse_kernel"),
        ("wgmma_misuse_2", r"wgmma accumulator written while the wgmma was in flight"),
        ("wgmma_misuse_3", r"wgmma descriptor: only the 128-byte swizzle is modelled"),
        ("wgmma_misuse_4", r"wgmma operand: address outside dynamic shared memory"),
        ("wgmma_misuse_5", r"smem_addr: address outside dynamic shared memory"),
        ("wgmma_misuse_6", r"wgmma operand: shared memory written after the last fence.proxy.async"),
        ("wgmma_misuse_7", r"wgmma operand: shared memory written after the last fence.proxy.async"),
        ("wgmma_misuse_8", r"wgmma issued with no wgmma.fence since the thread's last wgmma.wait_group"),
        ("wgmma_misuse_9", r"wgmma A fragment registers written while the wgmma was in flight"),
        ("wgmma_misuse_10", r"wgmma issued 0 times by thread 64 but 1 times by thread 0 of its warpgroup"),
    ],
)
def test_faults_are_reported(sim, case, message):
    with pytest.raises(RuntimeError, match=message):
        sim.sim_selftest(case)


def test_float2_atomic_add_loses_no_update(sim):
    # 288 threads add (1, 2) to one 8-byte pair at once, as attention's dq accumulation does on sm_90.
    assert sim.sim_selftest("atomic_add2") == (SUCCESS, 1.0)


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [64, 128])
@pytest.mark.parametrize("form", FORMS)
def test_wgmma_follows_the_descriptor_and_fragment_layouts(sim, form, n, dtype):
    # csrc/kernels/wgmma_probe.cu, the check tests/ops/test_wgmma_probe.py runs on the GPU: 64 x 128
    # times 128 x n through one warpgroup, with attention's tile loader, descriptors and register A,
    # K-major A and B (ss), MN-major A and B (ss_mn, B's second 64 columns LBO bytes on, past a gap
    # of NaN poison) or register A and MN-major B (rs, onto an accumulator of 0.5s). fmsim sums each
    # k16 step exactly and rounds it once to fp32: 8 roundings at most.
    check_probe(sim.sim_wgmma_probe, form, n, dtype, "cpu", ulps=8)


def test_wgmma_runs_at_its_wait(sim):
    # d reads NaN from issue to the wait that covers the op (also while a chained op on it is still
    # in flight)
    assert sim.sim_selftest("wgmma_in_flight") == (SUCCESS, 1.0)


def test_warp_votes(sim):
    assert sim.sim_selftest("vote") == (SUCCESS, 1.0)


def test_ex2_approx_flushes_subnormals(sim):
    assert sim.sim_selftest("ex2") == (SUCCESS, 1.0)


@pytest.mark.skipif("thread" not in os.environ.get("FMCORE_SIM_SANITIZE", ""),
                    reason="only under ThreadSanitizer (scripts/sanitize_cpu.sh sim-tsan)")
def test_tsan_reports_shared_memory_no_barrier_orders(sim):
    # fmsim's own locks must not order what CUDA leaves unordered: a shared word written by warp 0
    # and read by warp 1 with only shuffles in between is a data race for TSan. In a child process,
    # since TSan ends the process at its first report.
    code = "import torch; from tests.cudasim import build; build.build(); torch.ops.fmcore_sim.sim_selftest('unordered_shared')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=600)
    assert "ThreadSanitizer: data race" in proc.stderr, proc.stderr[-2000:]
