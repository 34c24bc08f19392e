"""The `sim` fixture: libfmcore_sim (fmcore's CUDA bindings and kernels on fmsim, build.py) built
once per session and loaded, or the whole directory skipped with the reason it cannot be built."""

import pytest
import torch

from tests.cudasim import build


@pytest.fixture(scope="session")
def sim():
    try:
        build.build()
    except build.Unavailable as e:
        pytest.skip(f"fmcore_sim cannot be built here: {e}")
    return torch.ops.fmcore_sim
