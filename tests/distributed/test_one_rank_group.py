"""The trainer's data-parallel layouts in a process group of one rank, against the same run without a
group: on the CPU (gloo) and on one GPU (NCCL), the GPU machine's only way to run the layouts' CUDA
paths. What gloo cannot show, this shows on a GPU: the meta-device build filling CUDA DTensors (each
rank's rows of the initial weights cut on the GPU), fsdp2's bf16 all-gathers and fp32 reduce-scatters
through NCCL, ZeRO-1's flat buffers through fmcore's communicator, and DCP saving and loading CUDA
shards. One rank reduces nothing, so the losses equal one process's up to the kernels' own order; a
checkpoint saved at step 10 resumes in the layout and reproduces steps 11-20."""

from __future__ import annotations

import pytest

from tests.conftest import DEVICES
from tests.distributed.launch import run_inline
from tests.distributed.test_parallel_train import (B, RTOL, SAVE_AT, STEPS, assert_exports_close,  # noqa: F401
                                                   assert_losses_close, dataset, losses, overrides, resume_from)

# (parallel.data, train.precision): bf16 autocast makes fsdp2 gather bf16 parameters (its mixed
# precision policy), bf16 weights make ZeRO-1 keep fp32 masters in its flat shards
CASES = [("ddp", "fp32"), ("zero1", "fp32"), ("fsdp2", "fp32"), ("fsdp2", "bf16-autocast"), ("zero1", "bf16")]
BUILT = {"ddp": "DistributedDataParallel, FusedAdamW", "zero1": "GPT, ZeroAdamW",
         "fsdp2": "FSDPGPT of DTensors, FusedAdamW"}


def _train(rank: int, world: int, args: list[str]) -> None:
    from fmcore.train.config import load_config
    from fmcore.train.parallel import forget_mesh
    from fmcore.train.trainer import train

    try:
        train(load_config("tiny", args))
    finally:
        forget_mesh()  # (the mesh's groups die with this group)


@pytest.mark.parametrize("data, precision", CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_a_one_rank_group_trains_and_resumes_as_one_process(dataset, tmp_path, monkeypatch, device, data,  # noqa: F811
                                                           precision):
    from torch.distributed.tensor import DTensor

    from fmcore.train import trainer
    from fmcore.train.config import load_config
    from fmcore.train.trainer import train

    # what each run's layout made of the model and optimizer, so that the test knows the layout was used
    built, build_model, build_optimizer = [], trainer.build_model, trainer.build_optimizer

    def model_built(*a, **kw):
        model, mcfg = build_model(*a, **kw)
        built.append(type(model).__name__ + (" of DTensors" if isinstance(next(model.parameters()), DTensor) else ""))
        return model, mcfg

    def optimizer_built(*a, **kw):
        built.append(type(optimizer := build_optimizer(*a, **kw)).__name__)
        return optimizer

    monkeypatch.setattr(trainer, "build_model", model_built)
    monkeypatch.setattr(trainer, "build_optimizer", optimizer_built)

    common = ["--train.device", device, "--train.precision", precision]
    train(load_config("tiny", overrides(dataset, tmp_path / "one", B, *common)))
    layout = [*common, "--parallel.data", data]
    backend = "nccl" if device == "cuda" else "gloo"
    built.clear()
    run_inline(_train, tmp_path, args=(overrides(dataset, tmp_path / "run", B, *layout),), backend=backend)
    assert ", ".join(built) == BUILT[data]
    # fsdp2 under bf16 autocast computes the norms with bf16-rounded weights: not one process's bits
    tolerance = {"rtol": 10 * RTOL} if precision == "bf16-autocast" else {}
    assert_losses_close(losses(tmp_path / "run"), losses(tmp_path / "one"), range(1, STEPS + 1), **tolerance)
    if precision == "fp32":
        assert_exports_close(tmp_path / "run", tmp_path / "one")
    ckpt = resume_from(tmp_path / "run", tmp_path / "resumed")
    run_inline(_train, tmp_path, args=(overrides(dataset, tmp_path / "resumed", B, *layout, "--checkpoint.resume",
                                                 str(ckpt)),), backend=backend)
    assert_losses_close(losses(tmp_path / "resumed"), losses(tmp_path / "run"), range(SAVE_AT + 1, STEPS + 1))
