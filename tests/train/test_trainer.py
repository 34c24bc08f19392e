"""The loop end to end on the CPU: tiny learns, kill -9 + resume is bitwise, divergence stops cleanly."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fmcore
from fmcore.train import checkpoint
from fmcore.train.config import ConfigError, load_config
from fmcore.train.metrics import read_metrics
from fmcore.train.resume import choose_run_dir
from fmcore.train.trainer import TrainingStopped, main, train

# Small enough for seconds on 2 cores, big enough to learn: the tiny preset at a quarter of its tokens.
# One thread: on a shared, oversubscribed CI machine OpenMP's spinning threads make 2 threads ~10x slower.
SMALL = ["--train.batch_size", "8", "--train.seq_len", "64", "--log.progress", "plain", "--log.tensorboard", "false",
         "--train.threads", "1"]


def overrides(dataset, run_dir, *extra):
    return ["--data.dataset", str(dataset), "--log.run_dir", str(run_dir), *SMALL, *extra]


def test_tiny_learns_and_writes_its_run_dir(dataset, tmp_path):
    run = tmp_path / "run"
    cfg = load_config("tiny", overrides(dataset, run, "--train.steps", "100", "--schedule.warmup_steps", "10",
                                        "--train.eval_every", "50", "--train.eval_batches", "2",
                                        "--log.sample_tokens", "8", "--log.every", "10", "--log.tensorboard", "true",
                                        "--checkpoint.every", "50"))
    summary = train(cfg)
    first, last = summary["first_loss"], summary["last_loss"]
    assert first == pytest.approx(math.log(1024), abs=0.5)  # a fresh model is close to uniform
    assert last < first - 1.2, f"loss fell only from {first:.3f} to {last:.3f}"
    assert summary["eval_loss"] < first - 1.0
    saved = load_config(str(run / "config.toml"))
    saved.name = cfg.name
    assert saved == cfg  # the config round-trips
    resolved = json.loads((run / "resolved.json").read_text())
    assert resolved["model"]["ops"] == "fmcore" and resolved["model"]["vocab_size"] == 1024  # "auto" on the CPU
    assert resolved["precision"] == "fp32" and resolved["params"] == summary["params"]
    records = read_metrics(run / "metrics.jsonl")
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1] + list(range(10, 101, 10))
    for key in ("lr", "grad_norm", "tok_s", "step_s", "loader_wait_s", "mem_mib"):
        assert all(r[key] is not None and r[key] >= 0 for r in records if "loss" in r), key
    assert [r["step"] for r in records if "eval_loss" in r] == [50, 100]
    assert (run / "loss.png").stat().st_size > 1000
    assert json.loads((run / "summary.json").read_text())["steps"] == 100
    assert [s for s, _ in checkpoint.step_dirs(run / "checkpoints")] == [50, 100]
    assert (run / "hf" / "model.safetensors").is_file() and (run / "hf" / "tokenizer.json").is_file()
    assert list((run / "tb").iterdir())


def _cli(args, **kw):
    # The child imports the same fmcore as this test process: the source tree in development, the
    # installed wheel in CI (a clean clone's python/ has no compiled extension).
    pkg_root = Path(fmcore.__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pkg_root), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "fmcore", "train", "tiny", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


@pytest.mark.parametrize("ops", ["torch", "fmcore"])  # torch.optim.AdamW + SDPA / FusedAdamW + fmcore kernels
def test_sigkill_and_resume_is_bitwise_identical(dataset, tmp_path, ops):
    """A run killed with SIGKILL right after a checkpoint and resumed with --resume auto logs exactly
    the losses (and grad norms) of the uninterrupted run: model, optimizer, loader and RNGs restored."""
    common = ["--model.ops", ops, "--train.steps", "12", "--checkpoint.every", "4", "--checkpoint.keep_last", "1", "--log.every", "1",
              "--model.dim", "64", "--model.n_layers", "2", "--train.threads", "1", "--checkpoint.export_hf", "false",
              "--schedule.warmup_steps", "3"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    ref = _cli(overrides(dataset, whole, *common))
    victim = _cli(overrides(dataset, broken, *common))
    deadline = time.time() + 120
    while not (broken / "checkpoints" / "step_00000008").is_dir():
        assert victim.poll() is None, f"the run ended before its step-8 checkpoint:\n{victim.stdout.read()}"
        assert time.time() < deadline, "no step-8 checkpoint after 120 s"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    victim.stdout.close()
    assert victim.returncode == -signal.SIGKILL
    resumed = _cli(overrides(dataset, broken, *common, "--resume", "auto"))
    out, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, out
    assert "resumed from step_00000008" in out or "resumed from step_00000012" in out
    out_ref, _ = ref.communicate(timeout=120)
    assert ref.returncode == 0, out_ref
    a, b = _losses(whole), _losses(broken)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert a == b  # bitwise: floats written with repr
    grad = lambda run: [r["grad_norm"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]  # noqa: E731
    assert grad(whole) == grad(broken)


@pytest.mark.parametrize("impl", ["fmcore", "torch"])  # FusedAdamW skips inside its step; the loop skips AdamW's
def test_nonfinite_steps_are_skipped_then_the_run_stops_with_a_checkpoint(dataset, tmp_path, capsys, impl):
    run = tmp_path / "run"
    # An absurd lr puts ~1e30 into the weights after the first step; every later forward overflows.
    args = overrides(dataset, run, "--train.steps", "50", "--optim.lr", "1e30", "--schedule.warmup_steps", "0",
                     "--train.max_skipped", "3", "--optim.grad_clip", "0", "--log.every", "1", "--model.n_layers", "1",
                     "--model.ops", impl, "--optim.impl", impl)
    assert main(["tiny", *args]) == 1  # TrainingStopped: one line, exit status 1
    assert "fmcore train: stopped: 3 consecutive non-finite steps" in capsys.readouterr().err
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert math.isfinite(records[0]["loss"]) and records[-1]["skipped"] == 3
    assert records[-1]["loss"] is None  # not finite: written as null (NaN is not JSON)
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=_no_constants)
    (step, path), = checkpoint.step_dirs(run / "checkpoints")
    assert step == records[-1]["step"]
    # The checkpoint holds the weights of the last good step: finite, and what a resume would load.
    state = torch.load(path / "extra_rank0.pt", weights_only=False)
    assert state["skipped_total"] == 3


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def test_run_dir_choice(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny")
    assert choose_run_dir(cfg) == (Path("runs/tiny"), None)
    # --resume auto with no checkpoint to resume starts afresh (a job script's first start, or its
    # restart before the first checkpoint) where the checkpoints will be
    assert choose_run_dir(load_config("tiny", ["--resume", "auto"])) == (Path("runs/tiny"), None)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    assert choose_run_dir(cfg) == (Path("runs/tiny"), None)  # an empty dir (no .lock either) holds no run
    (tmp_path / "runs" / "tiny" / "metrics.jsonl").write_text("")
    assert choose_run_dir(cfg) == (Path("runs/tiny-2"), None)  # a second fresh run does not clobber the first
    ck = tmp_path / "runs" / "tiny" / "checkpoints"
    (ck / "step_00000005").mkdir(parents=True)
    (ck / ".tmp-step_00000009").mkdir()  # a save interrupted by a crash: never picked
    resume = load_config("tiny", ["--resume", "auto"])
    assert choose_run_dir(resume) == (Path("runs/tiny"), Path("runs/tiny/checkpoints/step_00000005"))
    explicit = load_config("tiny", ["--log.run_dir", "runs/tiny"])
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        choose_run_dir(explicit)
    # An explicit checkpoint continues its own run, or a branch in log.run_dir: never writing (and
    # pruning old checkpoints) in the original run when another run dir is named.
    (ck / "step_00000005" / ".metadata").write_bytes(b"")
    step5 = "runs/tiny/checkpoints/step_00000005"
    assert choose_run_dir(load_config("tiny", ["--resume", step5])) == ((tmp_path / "runs/tiny").resolve(), Path(step5))
    branch = load_config("tiny", ["--resume", step5, "--log.run_dir", "runs/branch"])
    assert choose_run_dir(branch) == (Path("runs/branch"), Path(step5))
    (tmp_path / "runs" / "branch" / "checkpoints" / "step_00000001").mkdir(parents=True)
    with pytest.raises(ConfigError, match="runs/branch already holds checkpoints of another run"):
        choose_run_dir(branch)
    with pytest.raises(ConfigError, match="not a checkpoint directory"):
        choose_run_dir(load_config("tiny", ["--resume", "runs/tiny"]))


def test_a_run_that_failed_before_writing_leaves_the_default_run_dir_to_the_next(dataset, tmp_path, monkeypatch):
    # A config error found after the run dir was locked left runs/tiny holding its .lock alone: the
    # corrected run went to runs/tiny-2, the next to -3, ...
    import fcntl

    monkeypatch.chdir(tmp_path)
    args = ["--data.dataset", str(dataset), *SMALL, "--train.steps", "2", "--model.dim", "64", "--model.n_layers", "1",
            "--checkpoint.export_hf", "false", "--checkpoint.save_final", "false", "--train.eval_batches", "1"]
    with pytest.raises(ConfigError, match="tokens_per_step"):
        train(load_config("tiny", [*args, "--train.tokens_per_step", "1000"]))
    assert os.listdir("runs/tiny") == [".lock"]
    assert choose_run_dir(load_config("tiny", args)) == (Path("runs/tiny"), None)
    with open("runs/tiny/.lock") as held:  # unless a live run holds it (between its lock and its first write)
        fcntl.flock(held, fcntl.LOCK_EX)
        assert choose_run_dir(load_config("tiny", args)) == (Path("runs/tiny-2"), None)
    assert train(load_config("tiny", args))["run_dir"] == str(Path("runs/tiny"))


def test_retention_keeps_the_last_k_and_every_mth(tmp_path):
    for s in range(1, 11):
        (tmp_path / f"step_{s:08d}").mkdir()
    checkpoint.prune(tmp_path, keep_last=2, keep_every=4)
    assert [s for s, _ in checkpoint.step_dirs(tmp_path)] == [4, 8, 9, 10]


@pytest.mark.parametrize("section, key, value", [("log", "every", 0), ("train", "steps", -5)])
def test_train_checks_a_config_changed_in_code(dataset, tmp_path, section, key, value):
    cfg = load_config("tiny", overrides(dataset, tmp_path / "run"))
    setattr(getattr(cfg, section), key, value)  # what a sweep does to a loaded Config
    with pytest.raises(ConfigError, match=f"{section}.{key}: expected > 0"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_main_leaves_the_callers_process_group(dataset, tmp_path):
    # main() destroyed whatever process group was initialised, the caller's own too.
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert main(["tiny", *overrides(dataset, tmp_path / "run", "--train.steps", "2", "--model.dim", "64",
                                        "--model.n_layers", "1", "--checkpoint.export_hf", "false",
                                        "--checkpoint.save_final", "false", "--train.eval_batches", "1")]) == 0
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("env, why", [
    ({"RANK": "1"}, "RANK is 1 but WORLD_SIZE is not set"),  # was a TypeError in _from_main
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE is 2 but RANK is not set"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "0 <= RANK < WORLD_SIZE"),  # was a rendezvous timeout
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "1"},
     "0 <= LOCAL_RANK < LOCAL_WORLD_SIZE"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x': expected an integer"),
])
def test_inconsistent_launcher_variables_are_config_errors(dataset, tmp_path, monkeypatch, capsys, env, why):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["tiny", *overrides(dataset, tmp_path / "run", "--train.steps", "1")]) == 2
    assert why in capsys.readouterr().err


@pytest.mark.parametrize("data", ["fsdp2", "zero1"])
def test_a_one_process_parallel_run_leaves_no_process_group(dataset, tmp_path, data):
    # The 1-rank group such a run initialises for itself stayed: the caller's own init_process_group
    # then raised "trying to initialize the default process group twice". (In a process of its own:
    # after an fsdp2 backward here, autograd refuses to run in the processes the distributed tests fork.)
    # Nor did the next runs accumulate what the group's init sets: sys.excepthook wrapped once more per run
    # (tracebacks prefixed "[rank0]: [rank0]: ..."), and, zero1, the optimizer, model and process group kept
    # alive by its gradient hooks (3 gloo threads and 4 fds more per run).
    args = overrides(dataset, "RUN_DIR", "--parallel.data", data, "--train.steps", "2", "--model.dim", "64",
                     "--model.n_layers", "1", "--checkpoint.export_hf", "false", "--checkpoint.save_final", "false",
                     "--train.eval_batches", "1")
    script = f"""
import gc, os, sys
from pathlib import Path
import torch.distributed as dist
from fmcore.train.config import load_config
from fmcore.train.trainer import train
hook, counts = sys.excepthook, []
for run in ("a", "b", "c"):  # and the next run makes its own again
    train(load_config("tiny", [str(Path({str(tmp_path)!r}) / run) if a == "RUN_DIR" else a for a in {args!r}]))
    assert not dist.is_initialized()
    assert sys.excepthook is hook, "sys.excepthook left wrapped"
    gc.collect()
    counts.append((len(os.listdir("/proc/self/task")), len(os.listdir("/proc/self/fd"))))
assert counts[1] == counts[2], f"(threads, fds) after each run: {{counts}}"
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(fmcore.__file__).resolve().parent.parent),
                                                       os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def test_cli_errors_exit_2(capsys, tmp_path):
    assert main(["tiny", "--optim.lrr", "1"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()  # a directory without a manifest or shards
    assert main(["tiny", "--data.dataset", str(tmp_path / "empty"), "--log.run_dir", str(tmp_path / "run")]) == 2
    assert "data error: " in capsys.readouterr().err  # one line, not a traceback
    assert main(["--help"]) == 0
    assert "--schedule.kind" in capsys.readouterr().out
    assert main(["tiny", "--optim.lr", "1e-3", "--help"]) == 0
    assert "--schedule.kind" in capsys.readouterr().out


def test_a_token_id_past_the_vocabulary_is_a_data_error(dataset, tmp_path, capsys):
    # A corrupt shard (its checksum is not verified on open: that reads the whole dataset) must not
    # reach the embedding, where an id past the table is a device-side assert on the GPU.
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(dataset, bad)
    shard = sorted(bad.glob("train_*.bin"))[0]
    with open(shard, "r+b") as f:
        f.seek(64 + 2 * 100)  # token 100: read by the first sequential batch (uint16 ids after the header)
        f.write(b"\xff\xff")
    assert main(["tiny", *overrides(bad, tmp_path / "run", "--data.mode", "sequential", "--train.steps", "2")]) == 2
    assert "token id 65535 at offset 264 (token 100) is >= the vocab size" in capsys.readouterr().err


def test_a_damaged_checkpoint_is_a_checkpoint_error(dataset, tmp_path, capsys):
    args = ["tiny", *overrides(dataset, tmp_path / "run", "--train.steps", "2", "--model.dim", "64",
                               "--model.n_layers", "1", "--checkpoint.export_hf", "false")]
    assert main(args) == 0
    for f in (tmp_path / "run" / "checkpoints" / "step_00000002").glob("*.distcp"):
        f.unlink()
    assert main([*args, "--train.steps", "3", "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint error: " in err and "step_00000002 is damaged" in err and "Traceback" not in err


def test_a_truncated_checkpoint_file_is_damaged_not_another_model(dataset, tmp_path, capsys):
    # A .distcp cut short or overwritten: torch's zip reader's RuntimeError ("PytorchStreamReader failed ...",
    # or an EOFError) was reported as a checkpoint that "does not fit this model and optimizer".
    args = ["tiny", *overrides(dataset, tmp_path / "run", "--train.steps", "2", "--model.dim", "64",
                               "--model.n_layers", "1", "--checkpoint.export_hf", "false")]
    assert main(args) == 0
    for f in (tmp_path / "run" / "checkpoints" / "step_00000002").glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])
    assert main([*args, "--train.steps", "3", "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint error: " in err and "step_00000002 is damaged" in err and "does not fit" not in err, err
    assert "__0_0.distcp holds 100 bytes, .metadata places data up to byte " in err, err  # (the file is named)


def test_a_damaged_extra_state_is_a_checkpoint_error(dataset, tmp_path, capsys):
    # extra_rank<r>.pt (step, loader and RNG state) truncated: before, torch's zip reader's traceback.
    args = ["tiny", *overrides(dataset, tmp_path / "run", "--train.steps", "2", "--model.dim", "64",
                               "--model.n_layers", "1", "--checkpoint.export_hf", "false")]
    assert main(args) == 0
    extra = tmp_path / "run" / "checkpoints" / "step_00000002" / "extra_rank0.pt"
    extra.write_bytes(extra.read_bytes()[:300])
    assert main([*args, "--train.steps", "3", "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint error: " in err and "step_00000002 is damaged (extra_rank0.pt is unreadable" in err, err
    assert "Traceback" not in err


def test_a_damaged_checkpoint_metadata_is_a_checkpoint_error(dataset, tmp_path, capsys):
    # DCP's .metadata (a pickle) truncated or overwritten: before, a raw UnpicklingError / EOFError traceback.
    args = ["tiny", *overrides(dataset, tmp_path / "run", "--train.steps", "2", "--model.dim", "64",
                               "--model.n_layers", "1", "--checkpoint.export_hf", "false")]
    assert main(args) == 0
    metadata = tmp_path / "run" / "checkpoints" / "step_00000002" / ".metadata"
    for damage in (metadata.read_bytes()[:100], b"not a pickle"):
        metadata.write_bytes(damage)
        capsys.readouterr()
        assert main([*args, "--train.steps", "3", "--resume", "auto"]) == 2
        err = capsys.readouterr().err
        assert "checkpoint error: " in err and "step_00000002 is damaged (.metadata is unreadable" in err, err


def test_tokens_per_step_must_divide(dataset, tmp_path):
    cfg = load_config("tiny", overrides(dataset, tmp_path / "r", "--train.tokens_per_step", "1000"))
    with pytest.raises(ConfigError, match=r"multiple of train.batch_size \* train.seq_len \* data-parallel processes "
                                          r"\(8 \* 64 \* 1 = 512\): the nearest are 512 and 1024"):
        train(cfg)


def _short_run(dataset, run, *extra):
    cfg = load_config("tiny", overrides(dataset, run, "--train.steps", "4", "--log.every", "1", "--model.dim", "64",
                                        "--model.n_layers", "2", "--checkpoint.export_hf", "false",
                                        "--checkpoint.save_final", "false", "--train.eval_batches", "1", *extra))
    train(cfg)
    return [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def _short_run_killed_after_saving(killed_step, monkeypatch, dataset, run, *extra):
    """_short_run interrupted (KeyboardInterrupt) just after it saved step killed_step's checkpoint."""
    real = checkpoint.save

    def save_then_die(ckpt_dir, step, *rest, **kw):
        path = real(ckpt_dir, step, *rest, **kw)
        if step == killed_step:
            raise KeyboardInterrupt
        return path

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(checkpoint, "save", save_then_die)
        _short_run(dataset, run, *extra)


def test_gradient_accumulation_matches_one_big_batch(dataset, tmp_path):
    """2 micro-batches of 4 read the same 8 windows as one batch of 8 (the loader's sample order), so
    the steps agree up to summation order."""
    big = _short_run(dataset, tmp_path / "big")
    acc = _short_run(dataset, tmp_path / "acc", "--train.batch_size", "4", "--train.tokens_per_step", str(8 * 64))
    assert [r["tokens"] for r in acc] == [r["tokens"] for r in big] == [512, 1024, 1536, 2048]
    for a, b in zip(acc, big):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_deterministic_mode_is_strict_and_matches_the_default_run(dataset, tmp_path, monkeypatch):
    """train.deterministic turns on torch's strict mode (fmcore's attention then takes its
    deterministic backward on CUDA) for the run; the CPU is deterministic already, so the losses are
    the same. The caller's mode (poison_outputs' warn-only mode here) is back after it: the next run
    of a sweep, without train.deterministic, must not run strict."""
    from fmcore.train import trainer

    modes, step = [], trainer.train_step

    def recording_step(*args, **kwargs):
        modes.append((torch.are_deterministic_algorithms_enabled(),
                      torch.is_deterministic_algorithms_warn_only_enabled()))
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", recording_step)
    default = _short_run(dataset, tmp_path / "a", "--model.ops", "fmcore")
    strict = _short_run(dataset, tmp_path / "b", "--model.ops", "fmcore", "--train.deterministic", "true")
    assert modes == [(True, True)] * 4 + [(True, False)] * 4
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert [r["loss"] for r in strict] == [r["loss"] for r in default]


def test_train_leaves_the_callers_threads_and_rngs_as_they_were(dataset, tmp_path):
    # A sweep in one process: train.threads set for one run was still torch's thread count in the next
    # (whose threads = 0 "keeps torch's default"), and the seeding reset the caller's RNGs, so a random
    # search drawing from torch's RNG drew the same hyperparameters after every run.
    import random

    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        torch.manual_seed(123)
        random.seed(123)
        expected = torch.rand(3), random.random()
        torch.manual_seed(123)
        random.seed(123)
        _short_run(dataset, tmp_path / "run", "--train.threads", "1")
        assert torch.get_num_threads() == threads + 1
        assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    finally:
        torch.set_num_threads(threads)


def test_the_loss_curve_leaves_the_callers_matplotlib_backend(tmp_path):
    # plot_loss switched matplotlib to Agg: in a notebook, figures after a run no longer showed inline.
    import matplotlib
    import matplotlib.pyplot as plt

    from fmcore.train.metrics import plot_loss

    backend = matplotlib.get_backend()
    plt.switch_backend("svg")  # another backend than the Agg plot_loss used to set
    try:
        assert plot_loss([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}], tmp_path / "loss.png", "t").is_file()
        assert matplotlib.get_backend() == "svg" and not plt.get_fignums()
        assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        plt.switch_backend(backend)


def test_train_runs_under_the_callers_no_grad(dataset, tmp_path):
    # The first backward raised "element 0 of tensors does not require grad" (a notebook's
    # torch.set_grad_enabled(False) from an earlier evaluation, or a call inside torch.no_grad()).
    with torch.no_grad():
        assert len(_short_run(dataset, tmp_path / "run")) == 4
        assert not torch.is_grad_enabled()


def test_an_interrupted_run_closes_what_it_opened(dataset, tmp_path, monkeypatch):
    # A KeyboardInterrupt (a notebook's stop button) left the progress bar open, the next run's bar
    # drawn below it, TensorBoard's writer thread running, and metrics.jsonl open while the traceback
    # was kept (IPython keeps the last one).
    import threading

    from tqdm import tqdm

    from fmcore.train import trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train_step", interrupted)
    run = tmp_path / "run"
    bars, threads = len(tqdm._instances), set(threading.enumerate())
    with pytest.raises(KeyboardInterrupt) as kept:
        _short_run(dataset, run, "--log.progress", "bar", "--log.tensorboard", "true")
    assert len(tqdm._instances) == bars
    assert set(threading.enumerate()) - threads <= {t for t in threading.enumerate() if t.name == "tqdm_monitor"}
    fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
           if os.path.islink(f"/proc/self/fd/{fd}")]
    assert not [path for path in fds if path.startswith(str(run))], kept
    monkeypatch.undo()
    assert len(_short_run(dataset, run)) == 4  # the run dir is free for the next run


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_document_boundaries_train(dataset, tmp_path, arch):
    # No warmup: in the tiny preset's 30-step warmup, 4 steps moved the loss by less than the batches
    # differ (it rose by 6e-4 under torch 2.11).
    records = _short_run(dataset, tmp_path / "r", "--data.doc_boundaries", "true", "--model.arch", arch,
                         "--model.tie_embeddings", str(arch == "gpt2").lower(), "--schedule.warmup_steps", "0")
    assert all(math.isfinite(r["loss"]) for r in records) and records[-1]["loss"] < records[0]["loss"] - 0.02, (
        [r["loss"] for r in records])


@pytest.mark.parametrize("precision, ops", [("bf16-autocast", "torch"), ("bf16-autocast", "fmcore"), ("fp16", "torch"),
                                            ("fp16", "fmcore"), ("bf16", "fmcore")])
def test_mixed_precision_runs_on_cpu(dataset, tmp_path, precision, ops):
    records = _short_run(dataset, tmp_path / "r", "--train.precision", precision, "--model.ops", ops,
                         "--schedule.warmup_steps", "1")
    assert math.isfinite(records[-1]["loss"]) and records[-1]["loss"] < records[0]["loss"]


@pytest.mark.parametrize("impl", ["fmcore", "torch"])
def test_an_fp16_overflow_is_a_skipped_step_with_either_optimizer(impl):
    from fmcore.optim import FusedAdamW
    from fmcore.train.trainer import StepOptions, train_step

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    loss_of = lambda x, y, *docs: torch.nn.functional.cross_entropy(model(x).float(), y)  # noqa: E731
    opt = (FusedAdamW(model.parameters(), max_grad_norm=1.0, skip_nonfinite=True) if impl == "fmcore"
           else torch.optim.AdamW(model.parameters()))
    # A scale that overflows the scaled loss (the first steps of an fp16 run overflow the same way).
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    before = [p.detach().clone() for p in model.parameters()]
    batch = (torch.randn(4, 8), torch.randint(0, 8, (4,)), None, None, None)
    loss, norm, good = train_step(loss_of, opt, lambda: batch, 1, StepOptions(impl, "fp16", torch.device("cpu"), 1.0),
                                  scaler)
    # FusedAdamW stepped by scaler.step reported the previous step's norm (0.0) and a good step.
    assert math.isfinite(loss) and not math.isfinite(norm) and not good
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scaler.get_scale() == 2.0**126
    scaler.update(2.0**8)  # then a scale that fits: the step is applied
    loss, norm, good = train_step(loss_of, opt, lambda: batch, 1, StepOptions(impl, "fp16", torch.device("cpu"), 1.0),
                                  scaler)
    assert good and math.isfinite(norm) and norm > 0
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_compare_reports_relative_differences(tmp_path, capsys):
    from fmcore.train import compare

    for name, scale in (("a", 1.0), ("b", 1.01)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": scale * (5.0 - s / 10)}) + "\n" for s in range(1, 11)))
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--plot", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "10 common steps, max |rel diff| 1.000%" in out and (tmp_path / "c.png").is_file()
    # A diverged step (written as null) is the largest difference, not skipped by max() as a nan was.
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": None if s == 3 else 5.0 - s / 10}) + "\n" for s in range(1, 11)))
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "d")]) == 0
    assert "max |rel diff| inf% (step 3)" in capsys.readouterr().out
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
    assert "holds no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "later").mkdir()  # logged at other steps only (log.every 7 against 1, from step 14)
    (tmp_path / "later" / "metrics.jsonl").write_text(json.dumps({"step": 14, "loss": 4.0}) + "\n")
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "later"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'later'}: no step in common with {tmp_path / 'a'}\n" in out and "10 common steps" in out


def test_compare_of_a_zero_loss_gives_the_absolute_difference(tmp_path, capsys):
    # A logged loss of 0 in the first run was a ZeroDivisionError and a traceback.
    from fmcore.train import compare

    for name, losses in (("a", [1.0, 0.0, 0.0]), ("b", [1.0, 0.5, 0.0])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": loss}) + "\n" for s, loss in enumerate(losses, 1)))
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "max |rel diff| inf% (step 2)" in out and "at step 3: 0.000%" in out and "max |diff| 0.5 (step 2)" in out


def test_a_resume_with_another_global_batch_says_so(dataset, tmp_path, capsys):
    # Resumed on other processes with the same per-rank batch, each step sees another number of tokens and
    # the loss curve changes with it: the run said nothing.
    _short_run(dataset, tmp_path / "run", "--checkpoint.save_final", "true")
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000004"
    capsys.readouterr()
    _short_run(dataset, tmp_path / "same", "--train.steps", "5", "--checkpoint.resume", str(ckpt))
    assert "tokens per step" not in capsys.readouterr().out
    _short_run(dataset, tmp_path / "half", "--train.steps", "5", "--train.batch_size", "4", "--checkpoint.resume",
               str(ckpt))
    assert "note: 256 tokens per step, the checkpoint's run took 512: train.tokens_per_step" in capsys.readouterr().out


def test_a_warmup_longer_than_the_run_is_a_warning(dataset, tmp_path, capsys):
    # A smoke run shorter than the preset's warmup (tiny: 30) runs, but its lr never reached optim.lr,
    # and nothing said so.
    records = _short_run(dataset, tmp_path / "run", "--schedule.warmup_steps", "10", "--optim.lr", "1e-3")
    out = capsys.readouterr().out
    assert ("warning: schedule.warmup_steps (10) exceeds train.steps (4): the lr warms up for the whole run and "
            "peaks at 0.0004 (optim.lr is 0.001)") in out, out
    assert records[-1]["lr"] == pytest.approx(4e-4)
    _short_run(dataset, tmp_path / "run2", "--schedule.warmup_steps", "4")
    assert "warmup_steps" not in capsys.readouterr().out


@pytest.mark.parametrize("first, then", [("fmcore", "torch"), ("torch", "fmcore")])
def test_resume_with_the_other_optimizer(dataset, tmp_path, first, then):
    """FusedAdamW and torch.optim.AdamW checkpoints load into each other (the same state; torch's
    implementation flags keep the current optimizer's values), and the resumed run continues from
    the saved state: its first loss is the one the saved run logged at that step."""
    run = tmp_path / "run"
    whole = _short_run(dataset, run, "--optim.impl", first, "--checkpoint.every", "2")
    saved = run / "checkpoints" / "step_00000002"
    resumed = _short_run(dataset, run, "--optim.impl", then, "--checkpoint.resume", str(saved))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert resumed[2]["loss"] == whole[2]["loss"]  # step 3's loss: the weights after step 2, as saved
    assert resumed[3]["loss"] == pytest.approx(whole[3]["loss"], rel=1e-5)


@pytest.mark.parametrize("impl", ["fmcore", "torch"])
def test_a_checkpoint_loads_into_an_optimizer_grouping_its_params_otherwise(tmp_path, impl):
    """Parallel layouts group the same parameters otherwise (tensor parallelism splits each group into
    its DTensor and plain parameters; fsdp2 + tensor keeps two groups): a checkpoint of fsdp2 +
    tensor 2 resumed with tensor 2 alone raised KeyError 'lr' in FusedAdamW.load_state_dict. The
    per-parameter state loads by name; the groups and their hyperparameters stay the optimizer's."""
    from fmcore.optim import FusedAdamW

    def build(split: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        w, b = [model[0].weight, model[1].weight], [model[0].bias, model[1].bias]
        groups = [{"params": w[:1], "weight_decay": 0.1}, {"params": w[1:], "weight_decay": 0.1}] if split else \
            [{"params": w, "weight_decay": 0.1}]
        groups.append({"params": b, "weight_decay": 0.0})
        opt = FusedAdamW(groups, lr=1e-3) if impl == "fmcore" else torch.optim.AdamW(groups, lr=1e-3)
        return model, opt

    model, opt = build(split=False)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    checkpoint.save(tmp_path, 1, model, opt, {"step": 1})
    model2, opt2 = build(split=True)
    checkpoint.load(tmp_path / "step_00000001", model2, opt2)
    assert [(g["lr"], g["weight_decay"]) for g in opt2.param_groups] == [(1e-3, 0.1), (1e-3, 0.1), (1e-3, 0.0)]
    for p, p2 in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p2, p, rtol=0, atol=0)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt2.state[p2][key], opt.state[p][key], rtol=0, atol=0)


def test_a_root_parameter_missing_from_a_regrouped_checkpoint_is_named():
    # The regroup looks for a fused tensor's parts beside it: a parameter of the root module ("scale") has
    # none, and rsplit(".") of its name raised "not enough values to unpack", naming neither it nor the key.
    from fmcore.train import relayout

    with pytest.raises(ValueError, match=r"^optim\.state\.scale\.exp_avg is not in the checkpoint$"):
        relayout.regroup({"scale": torch.zeros(3)}, {}, "optim.state.{}.exp_avg")


@pytest.mark.parametrize("impl", ["fmcore", "torch"])
def test_split_projections_load_into_the_fused_layer_and_back(tmp_path, impl):
    # Tensor parallelism saves a fused projection as SplitLinear's parts ("qkv.parts.1.weight"), which
    # DCP cannot map onto one tensor; checkpoint.load regroups them (here in one process, no group).
    from fmcore.optim import FusedAdamW
    from fmcore.train.parallel import SplitLinear

    def build(split: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 12), torch.nn.Linear(12, 4))
        if split:
            model[0] = SplitLinear(model[0], [4, 6, 2])
        opt = (FusedAdamW if impl == "fmcore" else torch.optim.AdamW)(model.parameters(), lr=1e-2)
        return model, opt

    def fused_state(model, opt):  # name -> (weight, exp_avg, exp_avg_sq, step), the parts fused again
        out = {}
        for name, p in model.named_parameters():
            head, sep, tail = name.partition(".parts.")
            key = f"{head}.{tail.partition('.')[2]}" if sep else name
            s = opt.state[p]
            out.setdefault(key, []).append((p.detach(), s["exp_avg"], s["exp_avg_sq"], s["step"]))
        return {k: [torch.cat([v[i] for v in vs]) if i < 3 else vs[0][i] for i in range(4)] for k, vs in out.items()}

    for save_split in (True, False):
        model, opt = build(save_split)
        for _ in range(2):
            model(torch.randn(3, 4)).square().sum().backward()
            opt.step()
        checkpoint.save(tmp_path / str(save_split), 2, model, opt, {"step": 2})
        model2, opt2 = build(not save_split)
        checkpoint.load(tmp_path / str(save_split) / "step_00000002", model2, opt2)
        want, got = fused_state(model, opt), fused_state(model2, opt2)
        assert want.keys() == got.keys()
        # one step tensor per parameter: torch's AdamW adds 1 to each in place (a shared one counted 3 a step)
        steps = [opt2.state[p]["step"] for p in model2.parameters()]
        assert len({id(t) for t in steps}) == len(steps)
        for key in want:
            for w, g in zip(want[key], got[key]):
                torch.testing.assert_close(g, w, rtol=0, atol=0, msg=key)


def test_split_projections_that_do_not_fit_name_the_checkpoint(tmp_path):
    # The regroup's own mismatches (a part's rows, a missing name) were CheckpointErrors passed on as they
    # were: "the parts of model.0.weight in the checkpoint have 12 rows, this model's 10", naming neither
    # the checkpoint nor that it does not fit, as DCP's mismatches are reported.
    from fmcore.train.parallel import SplitLinear

    def build(split: bool, out: int):
        model = torch.nn.Sequential(torch.nn.Linear(4, out), torch.nn.Linear(out, 4))
        if split:
            model[0] = SplitLinear(model[0], [4, 6, 2])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model(torch.randn(3, 4)).square().sum().backward()
        opt.step()
        return model, opt

    checkpoint.save(tmp_path, 1, *build(True, 12), {"step": 1})
    path = tmp_path / "step_00000001"
    want = (rf"^{re.escape(str(path))} does not fit this model and optimizer: ValueError: the parts of "
            r"model.0.weight in the checkpoint have 12 rows, this model's 10$")
    with pytest.raises(checkpoint.CheckpointError, match=want):
        checkpoint.load(path, *build(False, 10))
    # and the other way: parts here, a fused tensor of other rows there, or none
    checkpoint.save(tmp_path / "fused", 1, *build(False, 10), {"step": 1})
    path = tmp_path / "fused" / "step_00000001"
    with pytest.raises(checkpoint.CheckpointError, match=r"does not fit this model and optimizer: ValueError: "
                                                         r"model.0.weight in the checkpoint has 10 rows, this model's "
                                                         r"parts of it 12$"):
        checkpoint.load(path, *build(True, 12))
    checkpoint.save(tmp_path / "fused12", 1, *build(False, 12), {"step": 1})
    model, opt = build(True, 12)
    model.append(SplitLinear(torch.nn.Linear(4, 4), [2, 2]))  # 2.parts.*: no model.2.weight there
    with pytest.raises(checkpoint.CheckpointError, match=r"ValueError: model.2.weight is not in the checkpoint$"):
        checkpoint.load(tmp_path / "fused12" / "step_00000001", model, opt)


def test_a_checkpoint_keeps_the_resuming_optimizers_implementation_flags(tmp_path):
    # torch.optim.AdamW's foreach / fused / capturable are this machine's choice: a checkpoint written with
    # foreach=False (or fused=True on a GPU) brought its own flags back into the resumed optimizer.
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    checkpoint.save(tmp_path, 1, model, opt, {"step": 1})
    model2 = torch.nn.Linear(4, 4)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3, foreach=True)
    checkpoint.load(tmp_path / "step_00000001", model2, opt2)
    assert opt2.param_groups[0]["foreach"] is True
    torch.testing.assert_close(opt2.state[model2.weight]["exp_avg"], opt.state[model.weight]["exp_avg"])


@pytest.mark.parametrize("impl", ["torch", "fmcore"])
def test_a_checkpoint_before_the_first_applied_step_changes_no_later_step(tmp_path, impl):
    # The trainer saves after skipped steps too (an fp16 overflow streak at the start, which torch.optim.AdamW
    # never steps through): DCP's get_state_dict made the missing state with a step() of zero gradients,
    # which the optimizer counted, so its first real step was its second (a 0.74x update), in the run that
    # saved and in one resumed from the save. (FusedAdamW: the same, saved before its first step() call.)
    from fmcore.optim import FusedAdamW

    def first_step(save: bool, resume: bool = False):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 8)
        make = lambda m: (FusedAdamW(m.parameters(), lr=1e-2) if impl == "fmcore"  # noqa: E731
                          else torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=True))
        opt = make(model)
        if save:
            checkpoint.save(tmp_path / f"{save}{resume}", 4, model, opt, {"step": 4})
        if resume:
            opt = make(model)
            checkpoint.load(tmp_path / f"{save}{resume}" / "step_00000004", model, opt)
        model(torch.ones(2, 8)).square().sum().backward()
        opt.step()
        return model.weight.detach()

    plain = first_step(False)
    assert torch.equal(first_step(True), plain)
    assert torch.equal(first_step(True, resume=True), plain)


@pytest.mark.parametrize("change, field", [(["--model.n_layers", "1"], "model.n_layers"),
                                           (["--model.dim", "32"], "model.dim"),
                                           (["--model.tie_embeddings", "false"], "model.tie_embeddings")])
def test_resume_into_another_model_raises_naming_the_field(dataset, tmp_path, change, field):
    """torch.distributed.checkpoint would load a smaller model's share of the saved weights silently
    (n_layers 1 from a 2-layer checkpoint) and fail on a larger one with a per-rank traceback."""
    run = tmp_path / "run"
    _short_run(dataset, run, "--checkpoint.every", "2")
    with pytest.raises(ConfigError, match=f"written for another model.*{field} = "):
        _short_run(dataset, run, *change, "--checkpoint.resume", "auto")


def test_resuming_an_earlier_step_of_the_run_sets_its_later_checkpoints_aside(dataset, tmp_path):
    # Branching from step 2 of a 4-step run in its own dir: retention (the highest steps) would delete the
    # branch's checkpoints and --resume auto would go back to the abandoned step 4.
    run = tmp_path / "run"
    keep = ["--checkpoint.every", "1", "--checkpoint.save_final", "true", "--checkpoint.keep_last", "3"]
    _short_run(dataset, run, *keep)
    assert [s for s, _ in checkpoint.step_dirs(run / "checkpoints")] == [2, 3, 4]
    _short_run(dataset, run, *keep, "--checkpoint.resume", str(run / "checkpoints" / "step_00000002"),
               "--optim.lr", "1e-4")
    assert [s for s, _ in checkpoint.step_dirs(run / "checkpoints")] == [2, 3, 4]  # the branch's 3 and 4
    (aside,) = run.glob("checkpoints-abandoned-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step_00000003", "step_00000004"]
    extra = torch.load(run / "checkpoints" / "step_00000004" / "extra_rank0.pt", weights_only=False)
    assert extra["config"]["optim"]["lr"] == 1e-4


def test_a_resume_loads_its_checkpoint_without_drawing_the_initial_weights(dataset, tmp_path, monkeypatch):
    # The checkpoint loads every parameter: the draws (26 s a 1.1B model on two CPU threads, on every
    # rank) were thrown away at each resume. The resumed steps are the uninterrupted run's, bit for bit.
    from fmcore.train import models

    run = tmp_path / "run"
    whole = _short_run(dataset, run, "--checkpoint.every", "2")
    monkeypatch.setattr(models.CausalLM, "initial_weights", lambda *a: pytest.fail("a resume drew the initial weights"))
    resumed = _short_run(dataset, run, "--checkpoint.every", "2", "--checkpoint.resume",
                         str(run / "checkpoints" / "step_00000002"))
    assert [r["loss"] for r in resumed if r["step"] > 2] == [r["loss"] for r in whole if r["step"] > 2]


def test_a_val_split_the_loader_cannot_read_turns_evaluation_off_up_front(dataset, tmp_path, capsys):
    # A val split shorter than seq_len + 1 failed in the final evaluation, after the training, before the
    # final checkpoint: the whole run lost. It is now found at the start (and the final save comes first).
    import shutil

    short = tmp_path / "short"
    shutil.copytree(dataset, short)
    manifest = json.loads((short / "manifest.json").read_text())
    val_tokens = sum(s["tokens"] for s in manifest["splits"]["val"]["shards"])
    seq = val_tokens  # one token too many for a window of seq_len + 1
    records = _short_run(short, tmp_path / "run", "--train.seq_len", str(seq), "--model.max_seq_len", str(seq),
                         "--train.batch_size", "1", "--checkpoint.save_final", "true")
    assert len(records) == 4 and "has a val split the loader cannot read" in capsys.readouterr().out
    assert [s for s, _ in checkpoint.step_dirs(tmp_path / "run" / "checkpoints")] == [4]


def test_resume_with_other_data_settings_is_a_config_error(dataset, tmp_path):
    run = tmp_path / "run"
    _short_run(dataset, run, "--checkpoint.save_final", "true")
    ckpt = run / "checkpoints" / "step_00000004"
    with pytest.raises(ConfigError, match="loader state was saved with a different seed.*data settings"):
        _short_run(dataset, tmp_path / "other", "--train.steps", "6", "--train.seed", "1",
                   "--checkpoint.resume", str(ckpt))


def test_a_run_killed_before_its_final_evaluation_evaluates_when_resumed(dataset, tmp_path, monkeypatch):
    # Killed between the final checkpoint and the final evaluation, the resumed run has nothing to train:
    # it said so and skipped the evaluation, and the summary gave an earlier evaluation as the final one.
    from fmcore.train import trainer

    run = tmp_path / "run"
    args = ("--checkpoint.save_final", "true", "--train.eval_every", "2")
    real = trainer.evaluate

    def killed_at_the_end(model, cfg, *rest):
        if any(s == 4 for s, _ in checkpoint.step_dirs(run / "checkpoints")):
            raise KeyboardInterrupt  # the run dies here
        return real(model, cfg, *rest)

    monkeypatch.setattr(trainer, "evaluate", killed_at_the_end)
    with pytest.raises(KeyboardInterrupt):
        _short_run(dataset, run, *args)
    monkeypatch.setattr(trainer, "evaluate", real)
    summary = train(load_config("tiny", overrides(dataset, run, "--train.steps", "4", "--model.dim", "64",
                                                  "--model.n_layers", "2", "--checkpoint.export_hf", "false",
                                                  "--train.eval_batches", "1", *args, "--resume", "auto")))
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and summary["eval_loss"] == evals[-1]["eval_loss"]
    # Resumed once more, with its final evaluation logged: nothing to train, nothing evaluated again.
    again = train(load_config("tiny", overrides(dataset, run, "--train.steps", "4", "--model.dim", "64",
                                                "--model.n_layers", "2", "--checkpoint.export_hf", "false",
                                                "--train.eval_batches", "1", *args, "--resume", "auto")))
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "eval_loss" in r] == [2, 4]
    assert again["eval_loss"] == summary["eval_loss"]


def test_a_run_dir_in_use_is_a_config_error(dataset, tmp_path):
    # Two runs in one run dir interleaved their metrics and deleted each other's saves in progress.
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "w") as held:  # what another fmcore train holds for its lifetime
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="is in use by another fmcore train"):
            _short_run(dataset, run)
    _short_run(dataset, run)  # free again; and a run ends releasing it:
    _short_run(dataset, run, "--train.steps", "5", "--checkpoint.save_final", "true")



def test_a_run_dir_that_cannot_be_made_is_a_config_error(tmp_path):
    # --log.run_dir naming a file (or a path under one) ended fmcore train with mkdir's FileExistsError traceback.
    from fmcore.train.resume import lock_run_dir

    (tmp_path / "afile").write_text("")
    for where, why in (("afile", "File exists"), ("afile/run", "Not a directory")):
        with pytest.raises(ConfigError, match=rf"log.run_dir {tmp_path / where} cannot be the run dir: {why}"):
            lock_run_dir(tmp_path / where)

def test_resume_drops_a_torn_metrics_line_and_rewrites_the_file_atomically(tmp_path, monkeypatch):
    from fmcore.train import metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')  # a full disk's end
    metrics.Reporter(tmp_path, total_steps=4, start_step=2, progress="none", tensorboard=False).close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2]

    def crash(*args):
        raise OSError("killed")

    monkeypatch.setattr(metrics.os, "replace", crash)  # dying mid-rewrite keeps the whole history
    with pytest.raises(OSError, match="killed"):
        metrics.Reporter(tmp_path, total_steps=4, start_step=1, progress="none", tensorboard=False)
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_a_reporter_close_interrupted_midway_is_finished_by_the_next(tmp_path, monkeypatch):
    # A second Ctrl-C while TensorBoard's writer flushed (a slow filesystem) left metrics.jsonl open and
    # the writer's thread running; the trainer's cleanup then called close() again, which did nothing.
    import threading

    from torch.utils.tensorboard import SummaryWriter

    from fmcore.train import metrics

    threads = set(threading.enumerate())
    report = metrics.Reporter(tmp_path, total_steps=4, start_step=0, progress="none", tensorboard=True)
    report.log({"step": 1, "loss": 2.0, "lr": 1e-3, "tok_s": 1.0})
    file, real_close = report.file, SummaryWriter.close

    def interrupted(self):
        monkeypatch.setattr(SummaryWriter, "close", real_close)  # only the first close is interrupted
        raise KeyboardInterrupt

    monkeypatch.setattr(SummaryWriter, "close", interrupted)
    with pytest.raises(KeyboardInterrupt):
        report.close()
    assert file.closed  # closed although the writer's close raised
    report.close()
    assert not set(threading.enumerate()) - threads  # the writer's thread is joined
    report.log({"step": 2, "loss": 1.0, "lr": 1e-3, "tok_s": 1.0})  # a closed Reporter reports nothing
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]


def test_a_failed_save_is_a_checkpoint_error_naming_the_step(dataset, tmp_path, capsys, monkeypatch):
    # A full disk surfaced as two tracebacks ending in torch's "unexpected pos 704 vs 598".
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("")  # not a directory
    args = ["tiny", *overrides(dataset, run, "--train.steps", "2", "--model.dim", "64", "--model.n_layers", "1",
                               "--checkpoint.export_hf", "false")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "checkpoint error: saving the checkpoint of step 2 in" in err and "Traceback" not in err

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    (run / "checkpoints").unlink()
    monkeypatch.setattr(checkpoint.dcp, "save", full)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "step 2" in err and "MiB free there" in err and "unexpected pos" in err and "Traceback" not in err
    assert not list((run / "checkpoints").iterdir())  # the partial save is deleted


def test_resume_applies_the_configs_optimizer_hyperparameters(dataset, tmp_path):
    # The checkpoint's param groups brought back its weight_decay, betas and eps: a changed value was
    # ignored (the run bitwise identical) while config.toml recorded it.
    import shutil

    run = tmp_path / "run"
    _short_run(dataset, run, "--checkpoint.every", "2")
    shutil.copytree(run, tmp_path / "copy")
    same = _short_run(dataset, run, "--checkpoint.resume", "auto")
    changed = _short_run(dataset, tmp_path / "copy", "--checkpoint.resume", "auto", "--optim.eps", "1.0")
    assert same[2]["loss"] == changed[2]["loss"]  # step 3: the weights as saved
    assert same[3]["loss"] != changed[3]["loss"]  # step 4: after a step with eps 1


def test_a_save_deletes_the_leftovers_of_interrupted_saves(tmp_path):
    # A crash mid-save of a step the run never saves again (checkpoint.every changed) leaked its .tmp-* dir.
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    (tmp_path / ".tmp-step_00000006").mkdir()
    (tmp_path / ".tmp-step_00000006" / "__0_0.distcp").write_bytes(b"partial")
    checkpoint.save(tmp_path, 8, model, optimizer, {"step": 8})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000008"]


@pytest.fixture
def sigint_raises():
    """SIGINT raising KeyboardInterrupt in this process, as in a terminal: a job that a non-interactive
    shell starts in the background (CI's, nohup) inherits SIGINT ignored, and Python installs no handler."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _ctrl_c():
    """A real SIGINT to this process: Python raises KeyboardInterrupt at the next bytecode, here."""
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)  # (never reached: the interrupt comes first)


@pytest.mark.parametrize("how", ["inside DCP", "inside torch.save"])
def test_ctrl_c_during_a_save_or_load_is_an_interrupt_not_a_checkpoint_error(tmp_path, monkeypatch, how,
                                                                               sigint_raises):
    # DCP catches BaseException in its writers and readers: Ctrl-C mid-save was reported as "saving the
    # checkpoint of step 2 ... failed (N MiB free there): KeyboardInterrupt" (or, inside torch.save's zip
    # writer, "... unexpected pos 704 vs 598"), exit code 2; mid-load as a checkpoint that "does not fit
    # this model and optimizer".
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    path = checkpoint.save(tmp_path, 1, model, optimizer, {"step": 1})

    def interrupted(*args, **kwargs):
        if how == "inside DCP":
            _ctrl_c()
        try:
            _ctrl_c()
        except KeyboardInterrupt:  # what torch's zip writer does when interrupted mid-file
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    monkeypatch.setattr(FileSystemWriter, "write_data", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, model, optimizer, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]  # the partial save deleted
    monkeypatch.setattr(FileSystemReader, "read_data", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.load(path, model, optimizer)


def test_ctrl_c_ends_fmcore_train_with_one_line_and_130(dataset, tmp_path, capsys, monkeypatch, sigint_raises):
    # Ctrl-C printed a 60-line traceback (one per rank under torchrun, which passes SIGINT on to every
    # worker), or, mid-save, a checkpoint error with exit code 2.
    from torch.distributed.checkpoint import FileSystemWriter

    run = tmp_path / "run"
    args = ["tiny", *overrides(dataset, run, "--train.steps", "6", "--model.dim", "64", "--model.n_layers", "1",
                               "--checkpoint.every", "2", "--checkpoint.export_hf", "false")]
    real = checkpoint.save

    def ctrl_c_in_the_step_4_save(ckpt_dir, step, *rest, **kw):
        if step == 4:
            monkeypatch.setattr(FileSystemWriter, "write_data", lambda *a, **k: _ctrl_c())
        return real(ckpt_dir, step, *rest, **kw)

    monkeypatch.setattr(checkpoint, "save", ctrl_c_in_the_step_4_save)
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume auto" in err and "Traceback" not in err and "checkpoint error" not in err
    monkeypatch.undo()
    assert [s for s, _ in checkpoint.step_dirs(run / "checkpoints")] == [2]
    assert main([*args, "--resume", "auto"]) == 0  # the lock released, the run continues
    assert [s for s, _ in checkpoint.step_dirs(run / "checkpoints")][-1] == 6


def test_help_into_a_pipe_closed_early_ends_without_a_traceback():
    # `fmcore train --help | head`: the reader closed the pipe and the help's 17 KB raised BrokenPipeError out
    # of its print, a traceback under the lines the reader wanted. (Closed before the child writes: no race.)
    pkg_root = Path(fmcore.__file__).resolve().parent.parent  # (as _cli: this test's fmcore)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pkg_root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "fmcore", "train", "--help"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    assert proc.communicate(timeout=60)[1] == "" and proc.returncode == 141


def test_ctrl_c_replaced_by_a_peers_disappearance_is_still_an_interrupt(dataset, tmp_path, capsys, monkeypatch,
                                                                        sigint_raises):
    # Under torchrun every worker gets the SIGINT; the first to end breaks the others' collectives, and
    # a gloo error can replace their KeyboardInterrupt (DCP catches it to gather errors, then its gather
    # fails): a rank printed "checkpoint error: ... Connection closed by peer", exit code 2, or a traceback.
    from fmcore.train import trainer

    def swallowed(*args, **kwargs):
        try:
            _ctrl_c()
        except KeyboardInterrupt:
            pass  # (caught, as DCP's gather does) and then the peer is gone:
        raise RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:18831")

    monkeypatch.setattr(trainer, "train_step", swallowed)
    args = ["tiny", *overrides(dataset, tmp_path / "run", "--train.steps", "2", "--model.dim", "64",
                               "--model.n_layers", "1")]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_a_step_set_aside_by_a_crashed_save_stays_its_checkpoint(tmp_path, monkeypatch):
    # Saving a step that has a checkpoint moves the old one to .old-*; a crash before the new one took
    # the name left that step with no step_* dir: resume skipped it and nothing ever deleted it.
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoint.save(tmp_path, 4, model, optimizer, {"step": 4})
    checkpoint.save(tmp_path, 6, model, optimizer, {"step": 6})
    real_rename = os.rename

    def crash_at_the_final_rename(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise KeyboardInterrupt  # the process killed between the two renames
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_at_the_final_rename)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 6, model, optimizer, {"step": 6, "again": True})
    monkeypatch.setattr(os, "rename", real_rename)
    assert [(s, p.name) for s, p in checkpoint.step_dirs(tmp_path)] == [(4, "step_00000004"), (6, ".old-step_00000006")]
    assert checkpoint.read_extra(checkpoint.latest(tmp_path)) == {"step": 6}
    checkpoint.save(tmp_path, 8, model, optimizer, {"step": 8})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000006", "step_00000008"]
    assert checkpoint.read_extra(tmp_path / "step_00000006") == {"step": 6}
    checkpoint.save(tmp_path, 8, model, optimizer, {"step": 8, "again": True})  # the ordinary re-save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000006", "step_00000008"]
    assert checkpoint.read_extra(tmp_path / "step_00000008") == {"step": 8, "again": True}


def test_resume_in_or_out_of_bf16_master_weights_is_a_config_error(dataset, tmp_path):
    # A bf16 checkpoint resumed in fp32 loaded the bf16-rounded weights and dropped FusedAdamW's fp32
    # master copies without a word; an fp32 one resumed in bf16 failed on a "Missing key ... master_param".
    _short_run(dataset, tmp_path / "bf16", "--train.precision", "bf16", "--optim.impl", "fmcore",
               "--checkpoint.every", "2")
    with pytest.raises(ConfigError, match="written with train.precision 'bf16'.*this run's is 'fp32'"):
        _short_run(dataset, tmp_path / "bf16", "--train.precision", "fp32", "--optim.impl", "fmcore",
                   "--checkpoint.resume", "auto")
    _short_run(dataset, tmp_path / "fp32", "--checkpoint.every", "2")
    with pytest.raises(ConfigError, match="other than 'bf16'.*this run's is 'bf16'"):
        _short_run(dataset, tmp_path / "fp32", "--train.precision", "bf16", "--optim.impl", "fmcore",
                   "--checkpoint.resume", "auto")
    _short_run(dataset, tmp_path / "bf16", "--train.precision", "bf16", "--optim.impl", "fmcore",
               "--checkpoint.resume", "auto")  # the same precision resumes


def test_a_streak_of_nonfinite_steps_goes_on_across_a_resume(dataset, tmp_path):
    # The count of consecutive non-finite steps was not checkpointed: killed after the step-4 checkpoint
    # of a run that stops at step 6 (train.max_skipped 5), the resumed run went on to step 9.
    run = tmp_path / "run"
    diverge = ["--train.steps", "4", "--optim.lr", "1e30", "--schedule.warmup_steps", "0", "--train.max_skipped", "5",
               "--optim.grad_clip", "0", "--checkpoint.save_final", "true", "--train.eval_batches", "1"]
    records = _short_run(dataset, run, *diverge)  # step 1 good, 2-4 non-finite: a streak of 3 at the checkpoint
    assert records[-1]["skipped"] == 3
    with pytest.raises(TrainingStopped, match="5 consecutive"):
        _short_run(dataset, run, *diverge, "--train.steps", "20", "--resume", "auto")
    assert [s for s, _ in checkpoint.step_dirs(run / "checkpoints")][-1] == 6


def test_a_crash_while_pruning_leaves_no_incomplete_step_dir(tmp_path, monkeypatch):
    # rmtree deletes file by file: killed inside it, a step_* dir (said to be always complete) lacked files.
    import shutil

    for s in (1, 2):
        (tmp_path / f"step_{s:08d}").mkdir()
        (tmp_path / f"step_{s:08d}" / ".metadata").write_bytes(b"")
        (tmp_path / f"step_{s:08d}" / "__0_0.distcp").write_bytes(b"")
    real = shutil.rmtree

    def killed_inside(path, *args, **kwargs):
        next(Path(path).glob("*.distcp")).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_inside)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.prune(tmp_path, keep_last=1, keep_every=0)
    assert [s for s, _ in checkpoint.step_dirs(tmp_path)] == [2]
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real)
    model = torch.nn.Linear(2, 2)
    checkpoint.save(tmp_path, 3, model, torch.optim.AdamW(model.parameters()), {"step": 3}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]


def test_a_resumed_run_logs_the_uninterrupted_runs_records(dataset, tmp_path, monkeypatch):
    # After a resume the first step was logged on its own (an extra record) and the next record's
    # loss_avg covered only the steps since the resume: loss.png, which plots loss_avg, differed.
    args = ("--train.steps", "6", "--log.every", "4", "--checkpoint.every", "3")
    whole = _short_run(dataset, tmp_path / "whole", *args)
    _short_run_killed_after_saving(3, monkeypatch, dataset, tmp_path / "broken", *args)
    broken = _short_run(dataset, tmp_path / "broken", *args, "--resume", "auto")
    fields = lambda records: [(r["step"], r["loss"], r["loss_avg"]) for r in records]  # noqa: E731
    assert [r["step"] for r in whole] == [1, 4, 6] and fields(broken) == fields(whole)


def test_evaluation_reads_the_val_split_at_most_once(dataset):
    # The sequential val loader wraps around: eval_batches past one pass counted the first batches twice,
    # a "val loss" that was the mean of no set of val tokens.
    from fmcore.data import Loader
    from fmcore.train.trainer import Env, build_model, evaluate

    cfg = load_config("tiny", ["--train.batch_size", "8", "--train.seq_len", "64", "--train.device", "cpu"])
    with Loader(dataset, split="val", batch_size=8, seq_len=64, mode="sequential") as val:
        one_pass = val.batches_per_epoch
    assert one_pass >= 2
    env = Env(0, 1, 0, torch.device("cpu"))
    with Loader(dataset, split="train", batch_size=8, seq_len=64) as train_loader:
        model, _ = build_model(cfg, train_loader.vocab_size, env, "fp32")
    cfg.train.eval_batches = one_pass
    whole, _ = evaluate(model, cfg, dataset, env, "fp32")
    cfg.train.eval_batches = one_pass + one_pass // 2
    assert evaluate(model, cfg, dataset, env, "fp32")[0] == whole


def test_a_val_split_smaller_than_one_batch_is_evaluated_once(dataset):
    # batches_per_epoch 0 (fewer val windows than one batch of every rank: gpt2-124m's 16 x 1024 on 8 GPUs
    # against the embedded corpus's val split) left eval_batches uncapped: each batch wrapped around the
    # split, some windows were counted once more than others, and eval_batches 20 read it dozens of times.
    from fmcore.data import Loader
    from fmcore.train.trainer import Env, build_model, evaluate

    with Loader(dataset, split="val", batch_size=1, seq_len=64, mode="sequential") as val:
        windows = val.windows_per_epoch
    cfg = load_config("tiny", ["--train.batch_size", str(windows + windows // 3), "--train.seq_len", "64",
                               "--train.device", "cpu"])
    env = Env(0, 1, 0, torch.device("cpu"))
    with Loader(dataset, split="train", batch_size=8, seq_len=64) as train_loader:
        model, _ = build_model(cfg, train_loader.vocab_size, env, "fp32")
    with Loader(dataset, split="val", batch_size=windows, seq_len=64, mode="sequential") as val:
        batch = next(val)  # the whole split, once
    with torch.no_grad():
        model.eval()
        once = model(batch.x, batch.y).double().item()
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    for eval_batches in (1, 3):
        cfg.train.eval_batches = eval_batches
        calls.clear()
        got, _ = evaluate(model, cfg, dataset, env, "fp32")
        # (an untrained model's windows differ little: the weighting alone moved the loss by ~3e-6)
        assert calls == [windows] and got == pytest.approx(once, rel=1e-9), (eval_batches, calls, got, once)


def _slow_down(monkeypatch, name: str, seconds: float) -> None:
    """fmcore.train.trainer's function name, taking seconds longer."""
    from fmcore.train import trainer

    real = getattr(trainer, name)

    def slow(*args, **kw):
        time.sleep(seconds)
        return real(*args, **kw)

    monkeypatch.setattr(trainer, name, slow)


def test_the_eta_counts_the_evaluations_still_to_come(dataset, tmp_path, monkeypatch):
    # eta_s was the mean step time times the steps left: a run evaluating every 2 steps (0.3 s each
    # here) took several times the ETA it logged.
    _slow_down(monkeypatch, "evaluate", 0.3)
    records = _short_run(dataset, tmp_path / "run", "--train.steps", "6", "--train.eval_every", "2")
    at_3 = next(r for r in records if r["step"] == 3)
    # Still to come after step 3's record: 3 steps, the evaluation at step 4 and the final one.
    assert at_3["eta_s"] >= 0.6


def test_a_resumed_runs_summary_gives_the_whole_runs_wall_time(dataset, tmp_path, monkeypatch):
    # wall_s was the last segment's alone: beside steps (and tokens) counted from step 0, a resumed run
    # of 6 steps reported the time of the 2 it ran after the resume.
    _slow_down(monkeypatch, "train_step", 0.1)
    args = ("--train.steps", "6", "--checkpoint.every", "4")
    _short_run_killed_after_saving(4, monkeypatch, dataset, tmp_path / "run", *args)
    _short_run(dataset, tmp_path / "run", *args, "--resume", "auto")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["wall_s"] >= 0.6


def test_resume_on_a_dataset_of_another_vocabulary_raises_naming_the_vocab_size(dataset, tmp_path):
    # model.vocab_size 0 takes the dataset's vocabulary: the checkpoint's config was resolved with this
    # run's dataset, so the model check passed and torch.distributed.checkpoint failed with "does not fit
    # this model and optimizer: ... Size mismatch ... for model.wte.weight", naming neither.
    from fmcore import data

    other = data.prepare([Path(json.__file__).parent], tmp_path / "other", vocab_size=512, val_fraction=0.1,
                         workers=1, progress=False)
    run = tmp_path / "run"
    _short_run(dataset, run, "--checkpoint.every", "2")
    with pytest.raises(ConfigError, match=r"another model \(model\.vocab_size = 1024 there, 512 here.*data\.dataset"):
        _short_run(other, tmp_path / "branch", "--checkpoint.resume", str(run / "checkpoints" / "step_00000002"))


@pytest.mark.parametrize("there, here, field", [
    (["--parallel.data", "zero1"], ["--parallel.data", "ddp"], "parallel.data = 'zero1' there, 'ddp' here (this "
     "checkpoint does not record its zero1 buckets' layout"),
    (["--parallel.data", "zero1"], ["--parallel.data", "zero1", "--optim.decay_embeddings", "true"],
     "optim.decay_embeddings = False there, True here")])
def test_resume_in_another_parallel_layout_raises_naming_the_setting(tmp_path, there, here, field):
    # ZeroAdamW's flat shards are state dict keys the other layouts lack: such a resume failed as "does
    # not fit this model and optimizer: Missing key in checkpoint state_dict: optim.flat0.bucket0.master".
    # Since zero1 checkpoints record their buckets' layout, checkpoint.load converts (fmcore.train.relayout):
    # only an older one is refused.
    from fmcore.train.config import to_dict
    from fmcore.train.resume import check_same_layout

    extra = {"config": to_dict(load_config("tiny", there))}
    with pytest.raises(ConfigError, match=f"another parallel layout \\({re.escape(field)}"):
        check_same_layout(tmp_path, extra, load_config("tiny", here))
    check_same_layout(tmp_path, extra, load_config("tiny", there))  # the same layout resumes
    # and so do those torch.distributed.checkpoint reshards between (checkpoint.load regroups tensor
    # parallelism's split projections, and converts zero1's buckets with their recorded layout)
    for a, b in [("ddp", "fsdp2"), ("fsdp2", "none"), ("none", "ddp"), ("fsdp2", "zero1")]:
        check_same_layout(tmp_path, {"config": to_dict(load_config("tiny", ["--parallel.data", a]))},
                          load_config("tiny", ["--parallel.data", b]))
    check_same_layout(tmp_path, {"config": to_dict(load_config("tiny", ["--parallel.tensor", "2"]))},
                      load_config("tiny", ["--parallel.data", "fsdp2"]))
    recorded = {"config": to_dict(load_config("tiny", there)), "zero1_buckets": []}
    check_same_layout(tmp_path, recorded, load_config("tiny", here))


def test_a_checkpoint_outside_a_run_dir_continues_in_the_default_run_dir(tmp_path, monkeypatch):
    # A checkpoint copied or downloaded on its own (~/Downloads/step_00000004) made its grandparent the
    # run dir: config.toml, metrics.jsonl, checkpoints/, hf/ and a .lock were written into the user's folder.
    monkeypatch.chdir(tmp_path)
    loose = tmp_path / "home" / "Downloads" / "step_00000004"
    loose.mkdir(parents=True)
    (loose / ".metadata").write_bytes(b"")
    assert choose_run_dir(load_config("tiny", ["--resume", str(loose)])) == (Path("runs/tiny"), loose)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "config.toml").write_text("")
    assert choose_run_dir(load_config("tiny", ["--resume", str(loose)])) == (Path("runs/tiny-2"), loose)
    # one in a run dir (its checkpoints/, or a checkpoints-abandoned-*/ beside them) continues that run
    aside = tmp_path / "runs" / "tiny" / "checkpoints-abandoned-20260101-000000" / "step_00000004"
    aside.mkdir(parents=True)
    (aside / ".metadata").write_bytes(b"")
    assert choose_run_dir(load_config("tiny", ["--resume", str(aside)])) == ((tmp_path / "runs/tiny").resolve(), aside)


def test_resuming_a_set_aside_checkpoint_sets_the_other_branchs_later_checkpoints_aside(dataset, tmp_path):
    # Back to the abandoned branch (checkpoints-abandoned-*/step_00000002): the current branch's steps 3
    # and 4 stayed in checkpoints/, and the next --resume auto went on from that branch's step 4, not
    # from this one's step 3.
    run = tmp_path / "run"
    keep = ["--checkpoint.every", "1", "--checkpoint.save_final", "true", "--checkpoint.keep_last", "0"]
    _short_run(dataset, run, *keep)  # branch A: 1 2 3 4
    _short_run(dataset, run, *keep, "--checkpoint.resume", str(run / "checkpoints" / "step_00000001"),
               "--optim.lr", "1e-4")  # branch B from step 1: A's 2 3 4 set aside
    (aside,) = run.glob("checkpoints-abandoned-*")  # (the next set-aside, within the same second: another name)
    _short_run(dataset, run, *keep, "--checkpoint.resume", str(aside / "step_00000002"), "--train.steps", "3")
    latest = checkpoint.latest(run / "checkpoints")
    assert latest.name == "step_00000003"
    assert checkpoint.read_extra(latest)["config"]["optim"]["lr"] != 1e-4  # branch A's
    assert len(list(run.glob("checkpoints-abandoned-*"))) == 2


@pytest.mark.parametrize("compile_mode, key, values, graphs", [
    # the model's graphs differ with its depth; the blocks', shared by every block, with their width
    ("model", "--model.n_layers", ("1", "2", "1"), 3),
    # 6: training, evaluation and sampling, each for the first block (no residual on the fmcore path) and
    # the others
    ("blocks", "--model.dim", ("32", "64", "32"), 6),
])
def test_a_sweep_of_compiled_runs_keeps_compiling_past_dynamos_recompile_limit(dataset, tmp_path, monkeypatch,
                                                                               compile_mode, key, values, graphs):
    # torch.compile's cache is per code object: CausalLM.forward's (PreNormBlock.forward's, compiling the
    # blocks), shared by every model train() builds in a process. A run adds an entry per graph; a sweep over
    # model configs reached dynamo's recompile_limit (8) on its third config, and every later run trained
    # uncompiled (torch warned once). Here the limit is one run's worth, and the backend eager (fast).
    import torch._dynamo
    from torch._dynamo.utils import counters

    from fmcore.train.trainer import GRAPHS_PER_RUN

    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: real_compile(self, backend="eager"))
    # (config.patch, not monkeypatch: its undo left dynamo's config without the name, and the next compile in
    # this process, a forked rank's included, raised "recompile_limit does not exist")
    with torch._dynamo.config.patch(recompile_limit=GRAPHS_PER_RUN[compile_mode]):
        for value in values:  # the third: room was made by dropping the first's graphs, compiled again
            before = counters["stats"]["unique_graphs"]
            train(load_config("tiny", overrides(dataset, tmp_path / f"run{value}-{before}", "--train.steps", "2",
                                                "--model.dim", "32", key, value, "--train.compile", compile_mode,
                                                "--log.sample_tokens", "2", "--train.eval_batches", "1",
                                                "--checkpoint.export_hf", "false", "--checkpoint.save_final",
                                                "false")))
            assert counters["stats"]["unique_graphs"] - before == graphs, f"{key} {value}: not compiled"


def test_a_callers_group_keeps_the_callers_gpu(tmp_path, monkeypatch):
    # train() in a caller's own process group without torchrun's LOCAL_RANK (mp.spawn and init_process_group,
    # then torch.cuda.set_device(rank)): every rank was moved to cuda:0. (CUDA simulated: which device is
    # chosen is the point, not running on it.)
    import torch.distributed as dist

    from fmcore.train.trainer import setup_distributed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    chosen = [torch.device("cuda", 1)]  # the caller's torch.cuda.set_device(1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: chosen[-1].index)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(torch.device(d)))
    cfg = load_config("tiny", ["--train.device", "cuda"])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        env = setup_distributed(cfg)
    finally:
        dist.destroy_process_group()
    assert env.device == torch.device("cuda", 1) and chosen[-1] == torch.device("cuda", 1)


def test_the_mesh_is_made_again_for_another_timeout(tmp_path):
    # Runs of a sweep in a caller's process group share parallel's DeviceMesh: the first run's
    # parallel.timeout_s stayed on every later run's tensor- and data-parallel groups.
    import torch.distributed as dist

    from fmcore.train import parallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        cpu = torch.device("cpu")
        first = parallel.mesh(load_config("tiny", ["--parallel.timeout_s", "60"]), cpu)
        assert parallel.mesh(load_config("tiny", ["--parallel.timeout_s", "60"]), cpu) is first
        assert parallel.mesh(load_config("tiny", ["--parallel.timeout_s", "30"]), cpu) is not first
    finally:
        parallel.forget_mesh()
        dist.destroy_process_group()


def test_peak_tflops_takes_the_boards_own_figure(monkeypatch):
    # "NVIDIA H100 NVL" matched "H100" and got the SXM board's 989 dense bf16 TFLOP/s (its own: 835),
    # understating MFU by 16%.
    from fmcore.train.trainer import peak_tflops

    cfg = load_config("tiny")
    for name, want in [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
                       ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("Some GPU", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert peak_tflops(cfg, torch.device("cuda", 0)) == want, name
    assert peak_tflops(cfg, torch.device("cpu")) is None
    assert peak_tflops(load_config("tiny", ["--log.peak_tflops", "500"]), torch.device("cpu")) == 500


def test_launcher_variables_that_disagree_with_the_callers_group_are_a_config_error(tmp_path, monkeypatch, capsys):
    import torch.distributed as dist

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert main(["tiny", "--log.run_dir", str(tmp_path / "run")]) == 2
    finally:
        dist.destroy_process_group()
    assert "RANK=1 WORLD_SIZE=2 disagree with the initialised process group (rank 0 of 1)" in capsys.readouterr().err


def test_a_cuda_run_without_a_cuda_device_is_a_config_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["tiny", "--train.device", "cuda", "--log.run_dir", str(tmp_path / "run")]) == 2
    assert "train.device is 'cuda' but torch sees no CUDA device" in capsys.readouterr().err


def test_a_data_dataset_that_is_not_a_directory_is_a_config_error(tmp_path, capsys):
    assert main(["tiny", "--data.dataset", str(tmp_path / "absent"), "--log.run_dir", str(tmp_path / "run")]) == 2
    assert f"data.dataset: {tmp_path / 'absent'} is not a directory (make one with `fmcore prepare`)" in \
        capsys.readouterr().err


def _open_the_embedded_corpus(rank: int, world: int, root: str) -> str:
    """open_dataset without data.dataset, default_dataset replaced by one that takes a while on rank 0
    (preparing the corpus) and, elsewhere, checks that rank 0's is done."""
    import fmcore.data
    from fmcore.train.trainer import Env, open_dataset

    corpus = Path(root) / "corpus"

    def default_dataset():
        if rank == 0:
            time.sleep(0.5)
            corpus.mkdir()
        assert corpus.is_dir(), "read before rank 0 prepared it"
        return corpus

    fmcore.data.default_dataset = default_dataset
    return str(open_dataset(load_config("tiny"), Env(rank, world, rank, torch.device("cpu"))))


def test_without_data_dataset_rank_0_prepares_the_embedded_corpus_before_the_others_read_it(tmp_path):
    from tests.distributed.launch import run_ranks

    assert run_ranks(_open_the_embedded_corpus, 2, tmp_path / "launch", args=(str(tmp_path),)) == \
        [str(tmp_path / "corpus")] * 2


def test_samples_of_a_dataset_without_a_tokenizer_are_token_ids(tmp_path):
    # (llm.c shards carry no tokenizer.json: the sample line shows the ids)
    from fmcore.train.trainer import decode

    assert decode(None, [5, 17, 3]) == "5 17 3"
    assert decode(tmp_path / "tokenizer.json", [5]) == "5"  # named by a manifest but absent


def test_param_groups_list_a_shared_parameter_once_and_leave_frozen_ones_out():
    # (fmcore's models tie by reusing the embedding; a model changed in code may share a Parameter
    # between modules, which torch's optimizers refuse to see twice)
    from fmcore.train.trainer import param_groups

    emb, head, frozen = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False), torch.nn.Linear(4, 4)
    head.weight = emb.weight
    frozen.weight.requires_grad_(False)
    model = torch.nn.Sequential(emb, head, frozen)
    groups = param_groups(model, load_config("tiny"))
    assert [[id(p) for p in g["params"]] for g in groups] == [[], [id(emb.weight), id(frozen.bias)]]
    groups = param_groups(model, load_config("tiny", ["--optim.decay_embeddings", "true",
                                                      "--optim.decay_norms_biases", "true"]))
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(emb.weight), id(frozen.bias)]]


def _fp16_from_a_high_loss_scale(monkeypatch):
    """GradScaler starting at 2**24: an fp16 run's first steps overflow, and the scale halves each time."""
    init = torch.amp.GradScaler.__init__
    monkeypatch.setattr(torch.amp.GradScaler, "__init__", lambda self, *a, **k: init(self, *a, **{"init_scale": 2.0**24,
                                                                                                   **k}))


def test_an_fp16_run_resumes_with_its_loss_scale(dataset, tmp_path, monkeypatch):
    # The scale is checkpointed: resumed at its initial value instead, the run would overflow and skip
    # steps again that the uninterrupted run applied.
    _fp16_from_a_high_loss_scale(monkeypatch)
    args = ("--train.precision", "fp16", "--train.steps", "8", "--checkpoint.every", "4",
            "--schedule.warmup_steps", "1")
    whole = _short_run(dataset, tmp_path / "whole", *args)
    assert [r["skipped"] for r in whole][3] > 2  # overflows until step 4, then fewer or none
    ckpt = tmp_path / "whole" / "checkpoints" / "step_00000004"
    resumed = _short_run(dataset, tmp_path / "resumed", *args, "--checkpoint.resume", str(ckpt))
    fields = lambda records: [(r["step"], r["loss"], r["skipped"]) for r in records]  # noqa: E731
    assert fields(resumed) == fields(whole)[4:]


def test_ctrl_c_is_reported_by_rank_0_alone(tmp_path, monkeypatch, capsys):
    # (torchrun passes its SIGINT to every worker: one line from the job, not one per rank)
    from fmcore.train import trainer

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    for rank, said in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        assert main(["tiny", "--log.run_dir", str(tmp_path / "run")]) == 130
        assert ("fmcore train: interrupted" in capsys.readouterr().err) == said, rank


def test_fmcore_train_main_is_the_trainers():
    # fmcore.train.main, the package's documented entry point (fmcore.train.__all__)
    import fmcore.train

    assert fmcore.train.main(["--help"]) == 0


def test_a_save_after_a_crash_before_deleting_a_steps_old_copy_deletes_it(tmp_path, monkeypatch):
    # A step saved again: the old copy goes to .old-*, the new one takes the name, then the old one is
    # deleted. Killed before that deletion, the old copy stays beside the new one until the next save.
    import shutil

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoint.save(tmp_path, 6, model, optimizer, {"step": 6})
    real_rmtree = shutil.rmtree

    def crash_deleting_the_old_copy(path, *args, **kwargs):
        if Path(path).name.startswith(".old-"):
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", crash_deleting_the_old_copy)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 6, model, optimizer, {"step": 6, "again": True})
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".old-step_00000006", "step_00000006"]
    assert [(s, p.name) for s, p in checkpoint.step_dirs(tmp_path)] == [(6, "step_00000006")]  # the new one
    checkpoint.save(tmp_path, 8, model, optimizer, {"step": 8})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000006", "step_00000008"]
    assert checkpoint.read_extra(tmp_path / "step_00000006") == {"step": 6, "again": True}


def test_a_save_where_no_checkpoint_dir_can_be_made_names_the_step(tmp_path):
    # (the free space of a directory that does not exist is unknown: said so, not a second error)
    (tmp_path / "file").write_text("")
    model = torch.nn.Linear(2, 2)
    with pytest.raises(checkpoint.CheckpointError, match=r"saving the checkpoint of step 3 in .*file/checkpoints "
                                                         r"failed \(free space unknown\): NotADirectoryError"):
        checkpoint.save(tmp_path / "file" / "checkpoints", 3, model, torch.optim.AdamW(model.parameters()), {"step": 3})


def test_a_checkpoint_without_its_extra_state_is_a_checkpoint_error(tmp_path):
    model = torch.nn.Linear(2, 2)
    path = checkpoint.save(tmp_path, 1, model, torch.optim.AdamW(model.parameters()), {"step": 1})
    (path / "extra_rank0.pt").unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"step_00000001 is not a complete fmcore checkpoint "
                                                         r"\(missing .metadata or extra_rank0.pt\)"):
        checkpoint.read_extra(path)


def test_ctrl_c_during_a_regrouped_load_is_an_interrupt(tmp_path, monkeypatch):
    # (a tensor-parallel checkpoint into a model without it: rank 0 reads and regroups the parts)
    from torch.distributed.checkpoint import FileSystemReader

    from fmcore.train.parallel import SplitLinear

    def build(split: bool):
        model = torch.nn.Sequential(torch.nn.Linear(4, 12))
        if split:
            model[0] = SplitLinear(model[0], [4, 6, 2])
        return model, torch.optim.AdamW(model.parameters())

    path = checkpoint.save(tmp_path, 1, *build(True), {"step": 1})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(FileSystemReader, "read_data", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.load(path, *build(False))


def test_a_file_system_without_flock_runs_unguarded(tmp_path, monkeypatch):
    # (some NFS and Lustre mounts: flock raises ENOLCK; the run goes on as it did before the lock existed)
    import errno
    import fcntl

    from fmcore.train.resume import lock_held, lock_run_dir

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    fd = lock_run_dir(tmp_path / "run")
    try:
        assert (tmp_path / "run" / ".lock").read_text() == f"{os.getpid()}\n"
        assert not lock_held(tmp_path / "run")
    finally:
        os.close(fd)


def test_two_set_asides_within_one_second_take_two_dirs(tmp_path, monkeypatch):
    from fmcore.train.resume import set_aside_later_checkpoints

    monkeypatch.setattr(time, "strftime", lambda fmt: "20260101-000000")
    run = tmp_path / "run"
    for branch in (1, 2):
        for step in (2, 4):
            (run / "checkpoints" / f"step_0000000{step}").mkdir(parents=True, exist_ok=True)
        said = set_aside_later_checkpoints(run, run / "checkpoints" / "step_00000002", 2)
        aside = run / ("checkpoints-abandoned-20260101-000000" + ("" if branch == 1 else "-2"))
        assert said.endswith(f"1 later checkpoint(s) moved to {aside}") and (aside / "step_00000004").is_dir()


def test_a_checkpoint_without_its_resolved_model_is_checked_against_its_config(tmp_path):
    # (checkpoints written before the trainer recorded the resolved model: their config is resolved
    # with this run's vocabulary; one without a config at all is not checked, as before)
    from fmcore.train import models
    from fmcore.train.config import to_dict
    from fmcore.train.resume import check_same_layout, check_same_model

    saved = to_dict(load_config("tiny", ["--model.n_layers", "2"]))
    here = models.resolve(load_config("tiny").model, 1024, "cpu")
    with pytest.raises(ConfigError, match=r"was written for another model \(model.n_layers = 2 there, 4 here\)"):
        check_same_model(saved, here, 1024, tmp_path)
    check_same_model(to_dict(load_config("tiny")), here, 1024, tmp_path)
    check_same_model(None, here, 1024, tmp_path)
    check_same_layout(tmp_path, {}, load_config("tiny", ["--parallel.data", "zero1"]))


def test_out_of_memory_names_the_step_and_plan_memorys_ways_out(dataset, tmp_path, capsys, monkeypatch):
    # A CUDA out-of-memory error was torch's traceback (on every rank), naming no setting of the run. The
    # step's error comes with plan-memory's total for this run and for each setting that lowers it.
    from fmcore.train import trainer
    from fmcore.train.config import ModelConfig
    from fmcore.train.plan import Layout, plan

    real, calls = trainer.train_step, []

    def out_of_memory_in_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                         "of 79.19 GiB of which 1.06 GiB is free.\nOf the allocated memory ...")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", out_of_memory_in_step_2)
    args = ["tiny", *overrides(dataset, tmp_path / "run", "--train.steps", "4", "--model.dim", "64",
                                "--model.n_layers", "2", "--train.activation_checkpointing", "selective")]
    assert trainer.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("fmcore train: out of memory in train step 2: CUDA out of memory. Tried to allocate 2.00 GiB. "
                          "GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB is free.\n"), err
    assert "Of the allocated memory" not in err  # (torch's first line only)
    resolved = json.loads((tmp_path / "run" / "resolved.json").read_text())
    mcfg = ModelConfig(**resolved["model"])

    def mib(**kw):
        parts = plan(mcfg, Layout("none", 1, 1), precision=resolved["precision"], seq_len=64,
                     **{"batch_size": 8, "checkpointing": "selective", **kw})
        return f"{parts['total'] / 2**20:.1f} MiB"

    assert len({mib(), mib(checkpointing="full"), mib(batch_size=4)}) == 3
    assert f"plan-memory puts this run at {mib()} per GPU" in err and "activation checkpointing selective)" in err
    assert f"--train.activation_checkpointing full ({mib(checkpointing='full')})" in err
    assert (f"--train.batch_size 4 ({mib(batch_size=4)}; with --train.tokens_per_step 512 to keep the global batch"
            in err)
    assert "--parallel.data" not in err  # (one process)
    # The run dir is released: the run resumes (from its start: no checkpoint was written)
    monkeypatch.setattr(trainer, "train_step", real)
    assert trainer.main([*args, "--resume", "auto"]) == 0
