"""Where fmcore's kernels run (fmcore._info) and what model.ops="auto" picks from it."""

import dataclasses

import pytest
import torch

from fmcore import _info


@pytest.mark.parametrize("arch, capability, runs", [
    ("9.0a", (9, 0), True), ("9.0a", (10, 0), False), ("9.0a", (8, 0), False),  # wgmma: sm_90 only
    ("9.0a+PTX", (10, 0), False),
    ("8.0", (8, 0), True), ("8.0", (8, 6), True), ("8.0", (9, 0), False), ("8.6", (8, 0), False),
    ("8.0+PTX", (9, 0), True), ("8.0+PTX", (7, 5), False), ("9.0", (9, 0), True),
])
def test_arch_runs_on(arch, capability, runs):
    assert _info.arch_runs_on(arch, capability) is runs


class _FakeC:
    def __init__(self, with_cuda: bool, archs: str):
        self.info = {"with_cuda": with_cuda, "cuda_archs": archs}

    def build_info(self):
        return self.info


@pytest.fixture
def gpu(monkeypatch):
    """A pretend A100 (capability 8.0), whatever this machine has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")


def test_kernels_missing_on_a_machine_without_a_gpu(monkeypatch):
    monkeypatch.setattr(_info, "_C", _FakeC(True, "9.0a"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _info.kernels_missing_on("cuda") == "no CUDA device is available"


def test_kernels_missing_on(monkeypatch, gpu):
    assert _info.kernels_missing_on("cpu") is None
    assert "no kernels for mps" in _info.kernels_missing_on("mps")
    monkeypatch.setattr(_info, "_C", _FakeC(False, ""))
    assert "built without its CUDA kernels" in _info.kernels_missing_on("cuda")
    monkeypatch.setattr(_info, "_C", _FakeC(True, "9.0a"))
    why = _info.kernels_missing_on("cuda")
    assert "compiled for 9.0a, not for NVIDIA A100-SXM4-80GB (8.0)" in why
    assert 'FMCORE_CUDA_ARCHS="8.0"' in why
    monkeypatch.setattr(_info, "_C", _FakeC(True, "8.0,9.0a"))
    assert _info.kernels_missing_on("cuda") is None


def test_auto_ops_follow_where_the_kernels_run(monkeypatch):
    from fmcore.train import models
    from fmcore.train.config import ModelConfig

    cfg = ModelConfig(dim=64, n_layers=1, n_heads=1, max_seq_len=16)
    assert cfg.ops == "auto"
    assert models.resolve(cfg, vocab_size=100, device="cpu").ops == "fmcore"
    assert models.resolve(dataclasses.replace(cfg, ops="torch"), vocab_size=100).ops == "torch"
    monkeypatch.setattr(models, "kernels_missing_on", lambda device: "no kernel for this GPU")
    with pytest.warns(UserWarning, match="model.ops='auto' chose torch's ops: no kernel for this GPU"):
        assert models.resolve(cfg, vocab_size=100, device="cpu").ops == "torch"
