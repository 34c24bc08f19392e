"""log.profile: a torch.profiler trace and op table of a window of train steps, on the CPU."""

import json
import os

import pytest
import torch

from fmcore.train import trainer
from fmcore.train.config import load_config
from tests.distributed.launch import run_ranks
from tests.train.test_trainer import SMALL, _short_run  # _short_run: 4 steps of a 2-layer, 64-wide tiny model


def _trace(path):
    """The trace's events, and the steps (train_step#N ranges) it holds."""
    events = json.loads(path.read_text())["traceEvents"]
    steps = sorted(int(e["name"].split("#")[1]) for e in events if e.get("name", "").startswith("train_step#"))
    return events, steps


@pytest.mark.parametrize("window, name, steps", [
    ("2:4", "rank0-steps2-4", [2, 3]),
    ("3:5", "rank0-steps3-5", [3, 4]),  # up to train.steps: the run's last step, written before the run ends
    ("", None, []),  # off: no profile directory
])
def test_a_profile_window_writes_a_trace_and_a_table(dataset, tmp_path, capsys, window, name, steps):
    run = tmp_path / "run"
    _short_run(dataset, run, "--log.profile", window)
    if name is None:
        assert not (run / "profile").exists()
        return
    assert sorted(p.name for p in (run / "profile").iterdir()) == [f"{name}.json", f"{name}.txt"]
    events, traced = _trace(run / "profile" / f"{name}.json")
    assert traced == steps
    ops = {e.get("name") for e in events}
    assert "aten::mm" in ops or "aten::addmm" in ops, sorted(ops)[:50]
    assert any(op.startswith("fmcore::") for op in ops if op)  # ops = "auto" is fmcore's on the CPU
    table = (run / "profile" / f"{name}.txt").read_text()
    assert "Self CPU" in table and "aten::" in table
    assert f"profile of train steps {steps[0]} to {steps[-1]}: {run / 'profile' / name}.json" in capsys.readouterr().out


def test_a_run_ending_inside_the_window_writes_the_steps_it_ran(dataset, tmp_path, capsys, monkeypatch):
    # Ctrl-C in step 3 of a 2:5 window: the profiler stopped (a later one can start) and steps 2 and 3 written.
    real = trainer.train_step
    calls = []

    def interrupted_in_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            torch.mm(torch.ones(2, 2), torch.ones(2, 2))  # (some of step 3 ran)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", interrupted_in_step_3)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _short_run(dataset, run, "--log.profile", "2:5")
    assert not torch.autograd._profiler_enabled()
    _, traced = _trace(run / "profile" / "rank0-steps2-4.json")
    assert traced == [2, 3]
    assert (run / "profile" / "rank0-steps2-4.txt").is_file()
    assert "profile of train steps 2 to 3 (the run ended in step 3)" in capsys.readouterr().out


def test_a_resume_profiles_only_the_window_steps_it_runs(dataset, tmp_path):
    run = tmp_path / "run"
    _short_run(dataset, run, "--checkpoint.save_final", "true")  # steps 1-4
    _short_run(dataset, run, "--checkpoint.save_final", "true", "--train.steps", "6", "--log.profile", "2:4",
               "--resume", "auto")  # steps 5-6: past the window
    assert not (run / "profile").exists()
    _short_run(dataset, run, "--train.steps", "8", "--log.profile", "5:9", "--resume", "auto")  # steps 7-8 of it
    assert sorted(p.name for p in (run / "profile").iterdir()) == ["rank0-steps7-9.json", "rank0-steps7-9.txt"]
    assert _trace(run / "profile" / "rank0-steps7-9.json")[1] == [7, 8]


def _train(rank: int, world: int, args: list[str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    trainer.train(load_config("tiny", args))


def test_each_rank_writes_its_own_trace(dataset, tmp_path):
    # As under torchrun: two ddp ranks, one trace and table each (rank 0 alone reports).
    run = tmp_path / "run"
    run_ranks(_train, 2, tmp_path / "launch", args=([
        "--data.dataset", str(dataset), "--log.run_dir", str(run), *SMALL, "--train.steps", "2", "--model.dim", "64",
        "--model.n_layers", "2", "--checkpoint.save_final", "false", "--checkpoint.export_hf", "false",
        "--train.eval_batches", "1", "--parallel.data", "ddp", "--log.profile", "2:3"],), timeout=120)
    names = sorted(p.name for p in (run / "profile").iterdir())
    assert names == [f"rank{r}-steps2-3.{ext}" for r in (0, 1) for ext in ("json", "txt")]
    for r in (0, 1):
        assert _trace(run / "profile" / f"rank{r}-steps2-3.json")[1] == [2]
