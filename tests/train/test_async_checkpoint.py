"""checkpoint.async_save: checkpoints written in a background thread (DCP's async_save), renamed to
step_* only once complete, equal to synchronous ones, their failures raised, every way out waiting."""

import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from fmcore.train import checkpoint
from fmcore.train.config import load_config
from fmcore.train.trainer import main, train
from tests.train.test_trainer import _losses, overrides, sigint_raises  # noqa: F401  (a fixture)

# save_async in a process without a process group: DCP says so from its thread (the trainer quietens it).
single_process = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
TINY = ["--train.steps", "6", "--log.every", "1", "--model.dim", "64", "--model.n_layers", "2",
        "--checkpoint.export_hf", "false", "--train.eval_batches", "1", "--checkpoint.keep_last", "0"]


def contents(path: Path, tmp: Path) -> dict:
    """Every tensor and value DCP saved in checkpoint dir path, by name."""
    out = tmp / ("-".join(path.parts[-3:]) + ".pt")
    dcp_to_torch_save(path, out)
    return torch.load(out, weights_only=False)


def assert_same(a, b, where=""):
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), where  # bitwise
    else:
        assert a == b, where


def assert_same_extra(a: Path, b: Path) -> None:
    ea, eb = checkpoint.read_extra(a), checkpoint.read_extra(b)
    for key in ("step", "skipped_total", "nonfinite_streak", "log_window", "tokens", "loader", "scaler"):
        assert ea[key] == eb[key], key
    assert ea["rng"]["python"] == eb["rng"]["python"] and torch.equal(ea["rng"]["torch"], eb["rng"]["torch"])


def _blocked_writes(monkeypatch) -> threading.Event:
    """DCP's writes wait for the returned event to be set (at most 60 s)."""
    release, real = threading.Event(), FileSystemWriter.write_data

    def write_data(self, *args, **kwargs):
        assert release.wait(60), "the test never released the write"
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FileSystemWriter, "write_data", write_data)
    return release


@single_process
@pytest.mark.parametrize("impl", ["fmcore", "torch"])  # FusedAdamW / torch.optim.AdamW
def test_save_async_returns_before_writing_and_renames_once_written(tmp_path, monkeypatch, impl):
    from fmcore.optim import FusedAdamW

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    optimizer = (FusedAdamW if impl == "fmcore" else torch.optim.AdamW)(model.parameters(), lr=0.1)
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    checkpoint.save(tmp_path / "sync", 1, model, optimizer, {"step": 1})

    release = _blocked_writes(monkeypatch)
    pending = checkpoint.save_async(tmp_path / "async", 1, model, optimizer, {"step": 1})
    # Returned with the state staged and nothing written: training goes on, changing the live tensors.
    assert not pending.done()
    assert [p.name for p in (tmp_path / "async").iterdir()] == [".tmp-step_00000001"]
    assert checkpoint.latest(tmp_path / "async") is None  # nothing a resume would load
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    release.set()
    assert pending.wait() == tmp_path / "async" / "step_00000001"
    assert [p.name for p in (tmp_path / "async").iterdir()] == ["step_00000001"]
    # What was staged when save_async returned, not the weights of the step after it.
    assert_same(contents(pending.path, tmp_path), contents(tmp_path / "sync" / "step_00000001", tmp_path))
    assert checkpoint.read_extra(pending.path) == {"step": 1}


@single_process
def test_a_failed_background_write_raises_at_wait_naming_the_step(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", full)
    pending = checkpoint.save_async(tmp_path, 3, model, optimizer, {"step": 3})
    with pytest.raises(checkpoint.CheckpointError, match=r"saving the checkpoint of step 3 in .* No space left"):
        pending.wait()
    assert list(tmp_path.iterdir()) == []  # the partial save deleted


@single_process
def test_an_abandoned_save_is_never_renamed(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    release = _blocked_writes(monkeypatch)
    pending = checkpoint.save_async(tmp_path, 2, model, optimizer, {"step": 2})
    pending.abandon()
    release.set()
    pending.wait()  # (the write goes on to its end)
    assert [p.name for p in tmp_path.iterdir()] == [".tmp-step_00000002"]
    monkeypatch.undo()
    checkpoint.save(tmp_path, 4, model, optimizer, {"step": 4})  # which deletes the leftover
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000004"]


def _run(dataset, run, *extra):
    train(load_config("tiny", overrides(dataset, run, *TINY, *extra)))
    return _losses(run)


@pytest.mark.parametrize("layout", ["none", "zero1"])  # FusedAdamW; ZeroAdamW's DTensor buckets (1 process)
def test_async_checkpoints_equal_sync_ones_and_resume_the_same(dataset, tmp_path, layout):
    args = ["--checkpoint.every", "2", "--parallel.data", layout]
    sync = _run(dataset, tmp_path / "sync", *args)
    assert _run(dataset, tmp_path / "async", *args, "--checkpoint.async_save", "true") == sync
    for step in (2, 4, 6):
        a, b = (tmp_path / run / "checkpoints" / f"step_{step:08d}" for run in ("async", "sync"))
        assert_same(contents(a, tmp_path), contents(b, tmp_path), f"step {step}")
        assert_same_extra(a, b)
    resumed = tmp_path / "resumed" / "checkpoints" / "step_00000004"
    shutil.copytree(tmp_path / "async" / "checkpoints" / "step_00000004", resumed)
    after = _run(dataset, tmp_path / "resumed", *args, "--checkpoint.resume", str(resumed))
    assert after == {s: sync[s] for s in (5, 6)}  # bitwise


def test_training_goes_on_while_a_checkpoint_is_written(dataset, tmp_path, monkeypatch):
    from fmcore.train import metrics

    run, seen = tmp_path / "run", {}
    release, real_log = _blocked_writes(monkeypatch), metrics.Reporter.log

    def log(self, record):
        real_log(self, record)
        if record.get("step") == 3 and "loss" in record:  # a step after the step-2 save began
            seen["step 3 before step 2's checkpoint"] = checkpoint.step_dirs(run / "checkpoints") == []
            release.set()

    monkeypatch.setattr(metrics.Reporter, "log", log)
    _run(dataset, run, "--checkpoint.every", "2", "--checkpoint.async_save", "true")
    assert seen == {"step 3 before step 2's checkpoint": True}
    assert [s for s, _ in checkpoint.step_dirs(run / "checkpoints")] == [2, 4, 6]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004",
                                                                        "step_00000006"]


def test_retention_counts_complete_checkpoints_and_the_end_waits(dataset, tmp_path, monkeypatch, capsys):
    # Each write slow: step 2's save waits for step 1's (and says so), the run's end for step 5's.
    real = FileSystemWriter.write_data

    def slow(self, *args, **kwargs):
        if self.path.name in (".tmp-step_00000001", ".tmp-step_00000005"):
            time.sleep(2.5)  # (the step between the saves must take under 1.5 s for the "waited" line)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FileSystemWriter, "write_data", slow)
    run = tmp_path / "run"
    _run(dataset, run, "--train.steps", "5", "--checkpoint.every", "1", "--checkpoint.keep_last", "2",
         "--checkpoint.keep_every", "2", "--checkpoint.async_save", "true")
    assert re.search(r"waited \d+\.\d s for the previous checkpoint to be written before saving step 2",
                     capsys.readouterr().out)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004",
                                                                        "step_00000005"]


@pytest.mark.parametrize("every, failing", [(2, 2), (0, 6)])  # raised at the next save / at the end
def test_a_failed_background_write_ends_the_run_naming_the_checkpoint(dataset, tmp_path, monkeypatch, capsys,
                                                                      every, failing):
    real = FileSystemWriter.write_data

    def fail_at_one_step(self, *args, **kwargs):
        if self.path.name == f".tmp-step_{failing:08d}":
            raise OSError(5, "Input/output error")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FileSystemWriter, "write_data", fail_at_one_step)
    run = tmp_path / "run"
    args = ["tiny", *overrides(dataset, run, *TINY, "--checkpoint.every", str(every), "--checkpoint.async_save",
                               "true")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"checkpoint error: saving the checkpoint of step {failing} in" in err and "Input/output error" in err
    assert "Traceback" not in err
    assert not (run / "checkpoints" / f"step_{failing:08d}").exists()


def _main_thread_in(*functions: str) -> bool:
    """Whether the main thread is inside all of these functions now."""
    frame, names = sys._current_frames()[threading.main_thread().ident], set()
    while frame is not None:
        names.add(frame.f_code.co_name)
        frame = frame.f_back
    return names.issuperset(functions)


def _until(condition) -> None:
    deadline = time.time() + 60
    while not condition():
        assert time.time() < deadline
        time.sleep(0.01)


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_a_background_write_waits_for_it_or_abandons_it(dataset, tmp_path, monkeypatch, capsys,
                                                                      sigint_raises, presses):
    # Ctrl-C while step 4's checkpoint is written: the run waits for it (kept, complete); a second
    # Ctrl-C while it waits abandons it (never renamed: its .tmp-* dir, deleted by the next save).
    real = FileSystemWriter.write_data
    done = threading.Event()

    def interrupted_write(self, *args, **kwargs):
        if self.path.name == ".tmp-step_00000004":
            # Once the run holds the pending save: training, or in the step-6 save waiting for this one.
            _until(lambda: not _main_thread_in("save") or _main_thread_in("save", "wait_for_pending"))
            os.kill(os.getpid(), signal.SIGINT)
            _until(lambda: _main_thread_in("finish_writing", "wait"))  # the run's way out, waiting for this write
            if presses == 2:
                os.kill(os.getpid(), signal.SIGINT)
                _until(lambda: not _main_thread_in("finish_writing"))  # (it abandoned the write)
            done.set()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FileSystemWriter, "write_data", interrupted_write)
    run = tmp_path / "run"
    args = ["tiny", *overrides(dataset, run, *TINY, "--checkpoint.every", "2", "--checkpoint.async_save", "true")]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "waiting for the checkpoint of step 4 to be written" in err and "interrupted" in err
    assert "Traceback" not in err
    for thread in threading.enumerate():  # an abandoned write goes on after main() returned
        if thread.name.startswith("fmcore-checkpoint"):
            thread.join(60)
    assert done.is_set()
    monkeypatch.undo()
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == (["step_00000002", "step_00000004"] if presses == 1 else [".tmp-step_00000004", "step_00000002"])
    assert main([*args, "--resume", "auto"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004",
                                                                       "step_00000006"]


def test_a_nonfinite_stop_names_its_checkpoint_once_written(dataset, tmp_path, monkeypatch):
    from fmcore.train import metrics
    from fmcore.train.trainer import TrainingStopped

    real_write, real_message, said = FileSystemWriter.write_data, metrics.Reporter.message, {}

    def slow(self, *args, **kwargs):
        time.sleep(0.5)
        return real_write(self, *args, **kwargs)

    def message(self, text):
        if text.startswith("stopping at step"):
            said["checkpoints then"] = [s for s, _ in checkpoint.step_dirs(run / "checkpoints")]
        real_message(self, text)

    monkeypatch.setattr(FileSystemWriter, "write_data", slow)
    monkeypatch.setattr(metrics.Reporter, "message", message)
    run = tmp_path / "run"
    # An absurd lr puts ~1e30 into the weights after the first step; every later forward overflows.
    args = [*TINY, "--train.steps", "50", "--optim.lr", "1e30", "--schedule.warmup_steps", "0", "--train.max_skipped",
            "3", "--optim.grad_clip", "0", "--checkpoint.async_save", "true"]
    with pytest.raises(TrainingStopped, match="checkpoint of the last good state: .*step_00000004"):
        train(load_config("tiny", overrides(dataset, run, *args)))
    assert said == {"checkpoints then": [4]}


@single_process
def test_an_error_of_the_rename_or_pruning_is_raised_once(dataset, tmp_path, monkeypatch):
    # Not a CheckpointError (rank 0's prune after the write): raised at the next save, and the way out
    # neither waits for that finished save again nor raises its error a second time.
    def prune(*_args):
        raise PermissionError(13, "Permission denied", "old checkpoint")

    waits, real_wait = [], checkpoint.PendingSave.wait

    def wait(self):
        waits.append(self.step)
        return real_wait(self)

    monkeypatch.setattr(checkpoint, "prune", prune)
    monkeypatch.setattr(checkpoint.PendingSave, "wait", wait)
    cfg = load_config("tiny", overrides(dataset, tmp_path / "run", *TINY, "--checkpoint.every", "2",
                                        "--checkpoint.async_save", "true"))
    with pytest.raises(PermissionError) as raised:
        train(cfg)
    assert waits == [2] and not getattr(raised.value, "__notes__", None)


@single_process
def test_a_failed_background_write_is_noted_on_the_error_that_ended_the_run(dataset, tmp_path, monkeypatch, capsys):
    # Step 2's write fails in the background; step 3 raises before the next save looks: the run's own error
    # is raised, and the save's failure is not lost (a note on it; printed on Python 3.10, which has none).
    from fmcore.train import trainer

    real_write, real_step, steps = FileSystemWriter.write_data, trainer.train_step, []

    def fail_at_step_2(self, *args, **kwargs):
        if self.path.name == ".tmp-step_00000002":
            raise OSError(5, "Input/output error")
        return real_write(self, *args, **kwargs)

    def third_step_raises(*args, **kwargs):
        steps.append(len(steps) + 1)
        if len(steps) == 3:
            raise RuntimeError("the run's own error")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(FileSystemWriter, "write_data", fail_at_step_2)
    monkeypatch.setattr(trainer, "train_step", third_step_raises)
    cfg = load_config("tiny", overrides(dataset, tmp_path / "run", *TINY, "--checkpoint.every", "2",
                                        "--checkpoint.async_save", "true"))
    with pytest.raises(RuntimeError, match="the run's own error") as raised:
        train(cfg)
    noted = "\n".join(getattr(raised.value, "__notes__", [])) + capsys.readouterr().err
    assert re.search(r"and .*step 2.*Input/output error", noted), noted
