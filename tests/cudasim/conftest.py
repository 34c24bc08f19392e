"""The `sim` fixture: libfmcore_sim (fmcore's CUDA bindings and kernels on fmsim, build.py) built
once per session and loaded, and `ncclsim`: the fmcore_ncclsim module (fmcore's NCCL communicator
over ncclsim.cpp); or the tests skipped with the reason they cannot be built. FMCORE_SIM=0 skips
them on purpose (the first build takes a few minutes on 2 cores); FMCORE_SIM=require (CI) makes a
missing prerequisite a failure, so that CI cannot pass with the simulator's tests silently skipped."""

import os

import pytest
import torch

from tests.cudasim import build
from tests.util import cpu_threads


def _built(build_fn, name: str):
    """build_fn()'s result, or the test skipped with the reason it cannot be built."""
    if os.environ.get("FMCORE_SIM") == "0":
        pytest.skip("FMCORE_SIM=0")
    try:
        return build_fn()
    except build.Unavailable as e:
        if os.environ.get("FMCORE_SIM") == "require":
            pytest.fail(f"{name} cannot be built here: {e} (FMCORE_SIM=require)")
        pytest.skip(f"{name} cannot be built here: {e}")


@pytest.fixture(scope="session")
def sim():
    _built(build.build, "fmcore_sim")
    return torch.ops.fmcore_sim


@pytest.fixture(scope="session")
def ncclsim():
    return _built(build.build_nccl, "fmcore_ncclsim")


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    # The simulator runs hundreds of OS threads per block; torch's OpenMP pool spinning beside them
    # on a 2-core machine only slows both down. (And under sim-tsan, the references' OpenMP regions,
    # which TSan cannot see into, would be reported as races.)
    with cpu_threads(1):
        yield
