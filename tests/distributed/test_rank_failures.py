"""One rank failing while the others do not, on 2 CPU ranks (gloo): a checkpoint write (or rank 0's
checkpoint dir) that fails on one rank only fails the save on every rank, with that rank's cause, and
publishes nothing; a rank that hangs fails the others' collectives after parallel.timeout_s instead of
gloo's 30 minutes."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch

from tests.distributed.launch import run_ranks


class _Unwritable:
    """Pickling raises a full disk's OSError: a torch.save that fails on the rank that holds one."""

    def __reduce__(self):
        raise OSError(28, "No space left on device")


def _save_failing_on_rank_1(rank: int, world: int, tmp: str, background: bool) -> tuple[str, list[str]]:
    from fmcore.train import checkpoint

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt = Path(tmp) / "checkpoints"
    group = checkpoint.background_group(60)

    def save(step: int, extra: dict) -> None:
        if background:  # (the failure raised by wait(): at the trainer's next save, or at its end)
            checkpoint.save_async(ckpt, step, model, optimizer, extra, group=group).wait()
        else:
            checkpoint.save(ckpt, step, model, optimizer, extra)

    try:
        save(4, {"step": 4, "x": _Unwritable() if rank == 1 else 0})
        first = "saved"
    except checkpoint.CheckpointError as e:
        first = str(e)
    # A caller that treats a failed save as non-fatal and goes on: the next save must pair with the
    # other rank's next save, not with what remained of the failed one.
    save(6, {"step": 6})
    return first, sorted(p.name for p in ckpt.iterdir())


@pytest.mark.parametrize("background", [False, True], ids=["save", "save_async"])
def test_a_checkpoint_write_failing_on_one_rank_fails_the_save_on_every_rank(tmp_path, background):
    results = run_ranks(_save_failing_on_rank_1, 2, tmp_path / "launch", args=(str(tmp_path), background),
                        timeout=60)
    for message, _ in results:
        assert "saving the checkpoint of step 4" in message and "No space left on device (rank 1)" in message, message
    # Before: rank 0 passed its barrier against rank 1's next save and renamed the partial save, a
    # truncated extra_rank1.pt in it, to step_00000004 (which --resume auto would then pick).
    assert all(names == ["step_00000006"] for _, names in results), results


def _save_into_a_file(rank: int, world: int, tmp: str) -> str:
    from fmcore.train import checkpoint

    model = torch.nn.Linear(4, 4)
    try:
        checkpoint.save(Path(tmp) / "not-a-dir", 2, model, torch.optim.AdamW(model.parameters()), {"step": 2})
    except checkpoint.CheckpointError as e:
        return str(e)
    return "saved"


def test_a_checkpoint_dir_rank_0_cannot_make_fails_the_save_on_every_rank(tmp_path):
    # Rank 0 alone makes the directory. Before, it raised before the barrier the other rank waited in,
    # which failed (a gloo connection error, not a CheckpointError) only once rank 0's process ended.
    (tmp_path / "not-a-dir").write_text("")
    messages = run_ranks(_save_into_a_file, 2, tmp_path / "launch", args=(str(tmp_path),), timeout=60)
    assert all("saving the checkpoint of step 2" in m and "FileExistsError" in m and "(rank 0)" in m
               for m in messages), messages


def _barrier_with_a_hung_peer(rank: int, world: int, port: int) -> tuple[float, str]:
    import torch.distributed as dist

    from fmcore.train.config import load_config
    from fmcore.train.trainer import setup_distributed

    # The trainer makes its own process group (under torchrun): replace the one run_ranks made.
    dist.destroy_process_group()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    setup_distributed(load_config("tiny", ["--parallel.data", "ddp", "--train.device", "cpu",
                                           "--parallel.timeout_s", "2"]))
    if rank == 1:
        time.sleep(10)  # a rank stuck outside any collective (a hung file system, a deadlocked loader)
    t0 = time.perf_counter()
    try:
        dist.barrier()
        outcome = "passed"
    except RuntimeError as e:
        outcome = f"{type(e).__name__}: {e}"
    return time.perf_counter() - t0, outcome


def test_a_hung_rank_fails_the_others_after_parallel_timeout_s(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (waited, outcome), _ = run_ranks(_barrier_with_a_hung_peer, 2, tmp_path, args=(port,), timeout=60)
    # Before: no timeout was passed, so rank 0 waited out rank 1's 10 s (gloo's default: 30 minutes).
    assert outcome != "passed" and waited < 8, (waited, outcome)


def test_parallel_timeout_s_must_be_positive():
    from fmcore.train.config import ConfigError, load_config

    for bad in ("0", "-1", "inf", "nan"):
        with pytest.raises(ConfigError, match="parallel.timeout_s: expected a finite value > 0"):
            load_config("tiny", ["--parallel.timeout_s", bad])


def _train_with_a_hung_rank(rank: int, world: int, dataset: str, run: str) -> tuple[float, str]:
    from fmcore.train import trainer
    from tests.distributed.test_parallel_train import _train, overrides

    step, calls = trainer.train_step, []

    def hanging_step(*args, **kwargs):
        calls.append(time.perf_counter())
        if rank == 1 and len(calls) == 3:
            time.sleep(12)  # stuck outside any collective; the others wait in the step's first one
        return step(*args, **kwargs)

    trainer.train_step = hanging_step
    try:  # run_ranks' process group has a 60 s timeout: what times out earlier is the mesh's own groups
        _train(rank, world, overrides(Path(dataset), Path(run), 2, "--parallel.data", "fsdp2", "--parallel.tensor",
                                      "2", "--parallel.timeout_s", "3", "--checkpoint.every", "0"))
        outcome = "passed"
    except RuntimeError as e:
        outcome = f"{type(e).__name__}: {e}"
    # Timed from the hung step's start: the setup before it takes seconds more on a loaded machine.
    waited = time.perf_counter() - calls[2] if len(calls) >= 3 else math.inf
    return waited, outcome


def test_a_hung_rank_fails_the_2d_mesh_collectives_after_parallel_timeout_s(tmp_path):
    # dp=2 x tp=2: every collective of a step runs on the mesh's tensor- or data-parallel groups, which
    # init_device_mesh had made with torch's default timeout (gloo 30 min): the others waited out rank 1.
    import email

    import matplotlib

    from fmcore import data

    matplotlib.use("Agg")
    import matplotlib.pyplot as _pyplot  # noqa: F401  (imported once, before the fork)
    dataset = data.prepare([Path(email.__file__).parent], tmp_path / "email", vocab_size=512, val_fraction=0.1,
                           workers=1, progress=False)
    results = run_ranks(_train_with_a_hung_rank, 4, tmp_path / "launch", args=(str(dataset), str(tmp_path / "run")),
                        timeout=90)
    for rank in (0, 2, 3):
        waited, outcome = results[rank]
        assert outcome != "passed" and waited < 11, (rank, waited, outcome)


@pytest.fixture(scope="module")
def email_dataset(tmp_path_factory) -> Path:
    import email

    import matplotlib

    from fmcore import data

    matplotlib.use("Agg")
    import matplotlib.pyplot as _pyplot  # noqa: F401  (imported once, before the fork)
    return data.prepare([Path(email.__file__).parent], tmp_path_factory.mktemp("data") / "email", vocab_size=512,
                        val_fraction=0.1, workers=1, progress=False)


def _train_with_a_rank_dying_before_the_mesh(rank: int, world: int, dataset: str, run: str) -> tuple[float, str]:
    from fmcore.train import trainer
    from tests.distributed.test_parallel_train import _train, overrides

    make_loader = trainer.make_loader

    def failing_loader(cfg, *args, **kwargs):
        if rank == 1:  # a data error on one rank only, between the run dir's broadcast and the mesh
            raise OSError(24, "Too many open files")
        return make_loader(cfg, *args, **kwargs)

    trainer.make_loader = failing_loader
    t0 = time.perf_counter()
    try:  # rank 1 returns at once: run_ranks ends its process, closing its connections
        _train(rank, world, overrides(Path(dataset), Path(run), 2, "--parallel.data", "ddp", "--parallel.timeout_s",
                                      "20", "--checkpoint.every", "0"))
        outcome = "passed"
    except (OSError, RuntimeError) as e:  # (DistStoreError is a RuntimeError)
        outcome = f"{type(e).__name__}: {e}"
    return time.perf_counter() - t0, outcome


def test_a_rank_dying_before_the_mesh_fails_the_others_at_once(email_dataset, tmp_path):
    # Making the mesh's groups is a rendezvous through the store, which does not notice a dead rank: the
    # others waited there parallel.timeout_s (10 minutes by default), then failed with the store's "Wait
    # timeout" (under torchrun "DistStoreError: wait timeout ... keys: /default_pg/0//1//cpu//0/1").
    (waited, outcome), (_, failed) = run_ranks(_train_with_a_rank_dying_before_the_mesh, 2, tmp_path / "launch",
                                               args=(str(email_dataset), str(tmp_path / "run")), timeout=90)
    assert "Too many open files" in failed, failed
    assert "Connection closed by peer" in outcome and waited < 15, (waited, outcome)


def _train_with_rank_1s_val_split_broken(rank: int, world: int, dataset: str, run: str, how: str) -> tuple[str, bool]:
    """(what rank 0 printed, whether the run evaluated) of an fsdp2 run whose rank 1 cannot read its
    copy of the val split (how="unreadable": its shard is gone) or finds none listed (how="unlisted":
    its manifest is another version's)."""
    import contextlib
    import io

    from fmcore.data.shards import ShardError
    from fmcore.train import trainer
    from tests.distributed.test_parallel_train import _train, overrides

    make_loader, has_split = trainer.make_loader, trainer.dataset_has_split

    def loader_without_val(cfg, dataset, env, split="train", *args, **kwargs):
        if rank == 1 and split == "val":
            raise ShardError(f"{dataset}/val_000000.bin: No such file or directory")
        return make_loader(cfg, dataset, env, split, *args, **kwargs)

    if how == "unreadable":
        trainer.make_loader = loader_without_val
    else:
        trainer.dataset_has_split = lambda d, split: False if rank == 1 and split == "val" else has_split(d, split)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # rank 0 prints the run's messages
        _train(rank, world, overrides(Path(dataset), Path(run), 2, "--parallel.data", "fsdp2", "--parallel.timeout_s",
                                      "10", "--train.steps", "4", "--train.eval_every", "2", "--checkpoint.every", "0"))
    records = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return out.getvalue(), any("eval_loss" in r for r in records)


@pytest.mark.parametrize("how, said", [("unreadable", "has a val split the loader cannot read on rank 1 ("),
                                       ("unlisted", "has no val split on rank 1: evaluation is off")])
def test_a_val_split_one_rank_cannot_use_turns_evaluation_off_on_every_rank(email_dataset, tmp_path, how, said):
    # Rank 1 alone turned evaluation off: the others' evaluation collectives met its training step's (and,
    # when its manifest listed no val split, it skipped the gather of every rank's answer), and every rank
    # failed after parallel.timeout_s with "Timed out waiting 10000ms for recv/send operation".
    (printed, evaluated), _ = run_ranks(_train_with_rank_1s_val_split_broken, 2, tmp_path / "launch",
                                        args=(str(email_dataset), str(tmp_path / "run"), how), timeout=90)
    assert not evaluated
    assert said in printed and "evaluation is off" in printed, printed


def _train_with_rank_1s_config_changed(rank: int, world: int, dataset: str, run: str, *change: str) -> str:
    from fmcore.train.config import ConfigError
    from tests.distributed.test_parallel_train import _train, overrides

    try:
        _train(rank, world, overrides(Path(dataset), Path(run), 2, "--parallel.data", "zero1",
                                      *(change if rank == 1 else [])))
    except ConfigError as e:
        return str(e)
    return "trained"


@pytest.mark.parametrize("key,theirs,ours", [("model.dim", "128", "64"), ("train.steps", "2", "STEPS"),
                                             ("checkpoint.every", "1", "SAVE_AT")])
def test_ranks_given_different_configs_fail_naming_the_setting(email_dataset, tmp_path, key, theirs, ours):
    # Another model.dim: zero1's buckets were sized by each rank's own model, and the first
    # reduce-scatter aborted the processes ("gloo::EnforceNotMet ... Received data size doesn't match
    # expected size"). Fewer train.steps, another checkpoint.every: one rank waited parallel.timeout_s in
    # a collective (the next step's, a save's) the other never joined.
    from tests.distributed import test_parallel_train

    ours = str(getattr(test_parallel_train, ours, ours))
    said = run_ranks(_train_with_rank_1s_config_changed, 2, tmp_path / "launch",
                     args=(str(email_dataset), str(tmp_path / "run"), f"--{key}", theirs), timeout=90)
    assert said == [f"{key} is {theirs} on rank 1 but {ours} on rank 0: every rank must run the same config",
                    f"{key} is {ours} on rank 0 but {theirs} on rank 1: every rank must run the same config"]
