"""Shared test setup: the `device` fixture (cpu always, cuda when present) and output poisoning."""

import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def cuda_error_guard(request):
    """A kernel fault (illegal address, ...) is sticky: every later CUDA call in the process fails with
    it. Synchronize after each CUDA test so the fault is charged to the test that caused it, then end
    the process: under pytest-xdist a fresh worker takes over the remaining tests."""
    yield
    if not HAS_CUDA or "cuda" not in request.node.keywords:
        return
    try:
        torch.cuda.synchronize()
    except RuntimeError as e:
        message = f"{request.node.nodeid} left a CUDA error; later CUDA tests in this process cannot run: {e}"
        if os.environ.get("PYTEST_XDIST_WORKER"):
            print(message, file=sys.stderr, flush=True)
            os._exit(3)
        pytest.exit(message, returncode=3)


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every tensor torch allocates uninitialised (at::empty, what the ops allocate their outputs
    with) is filled with NaN, so an element a kernel forgets to write fails the comparison."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
    torch.utils.deterministic.fill_uninitialized_memory = old_fill
