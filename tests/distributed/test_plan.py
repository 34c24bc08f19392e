"""fmcore plan-memory: the memory model's arithmetic per layout, the CLI, and the communication
volumes quoted in docs/parallelism.md."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fmcore.train import models
from fmcore.train.config import load_config
from fmcore.train.plan import Layout, comm_bytes_per_step, main, plan


def mcfg(preset: str = "gpt2-124m"):
    """The preset's model as a GPU run resolves it (fmcore's ops), whatever this machine has."""
    return models.resolve(dataclasses.replace(load_config(preset, []).model, ops="fmcore"), None, "cuda")


def test_layouts_divide_what_they_shard():
    m = mcfg()
    P = models.param_count(m)
    kw = dict(precision="bf16-autocast", batch_size=4, seq_len=256, checkpointing=False)
    ddp = plan(m, Layout("ddp", 8, 1), **kw)
    zero = plan(m, Layout("zero1", 8, 1), **kw)
    fsdp = plan(m, Layout("fsdp2", 8, 1), **kw)
    assert ddp["params"] == ddp["grads"] == 4 * P and ddp["optimizer"] == 8 * P
    assert zero["params"] == 4 * P and zero["optimizer"] == 12 * P / 8  # moments + fp32 master, sharded
    assert fsdp["params"] == 4 * P / 8 and fsdp["grads"] == 4 * P / 8 and fsdp["optimizer"] == 8 * P / 8
    assert ddp["activations"] == zero["activations"] == fsdp["activations"]
    tp = plan(m, Layout("ddp", 4, 2), **kw)
    assert tp["params"] == 2 * P and tp["activations"] < ddp["activations"]
    ckpt = plan(m, Layout("ddp", 8, 1), **{**kw, "checkpointing": True})
    assert ckpt["activations"] < ddp["activations"] / 4
    bf16 = plan(m, Layout("ddp", 8, 1), **{**kw, "precision": "bf16"})
    assert bf16["params"] == 2 * P and bf16["optimizer"] == 12 * P  # bf16 weights keep an fp32 master
    for parts in (ddp, zero, fsdp, tp, ckpt, bf16):
        assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))


def test_comm_volumes_in_the_docs():
    m = mcfg()
    P = models.param_count(m)
    ddp = comm_bytes_per_step(P, Layout("ddp", 8, 1))
    assert ddp["data"] / 1e9 == pytest.approx(0.87, abs=0.005)  # docs/parallelism.md, GPT-2 124M, 8 GPUs
    assert comm_bytes_per_step(P, Layout("zero1", 8, 1))["data"] == pytest.approx(ddp["data"])
    assert comm_bytes_per_step(P, Layout("fsdp2", 8, 1))["data"] == pytest.approx(1.5 * ddp["data"])
    tp = comm_bytes_per_step(P, Layout("fsdp2", 4, 2), tokens_per_dp_rank=524288 // 4, mcfg=m)
    assert tp["tensor"] / 1e9 == pytest.approx(9.7, abs=0.05)
    llama = mcfg("llama-1b")
    assert comm_bytes_per_step(models.param_count(llama), Layout("ddp", 64, 1))["data"] / 1e9 == pytest.approx(
        8.66, abs=0.005)


def test_cli_prints_the_plan_and_the_measured_peak(tmp_path, capsys):
    assert main(["gpt2-124m", "--gpus", "8", "--parallel.data", "zero1"]) == 0
    out = capsys.readouterr().out
    assert "parallel.data=zero1 x8" in out and "optimizer" in out and "measured" not in out
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "loss": 5.0, "mem_mib": 1000.0}, {"step": 2, "eval_loss": 4.0},
        {"step": 3, "loss": 4.5, "mem_mib": 3072.0}]) + "\n")
    assert main(["gpt2-124m", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert "measured" in out and "3.000 GiB" in out
    assert main(["gpt2-124m", "--gpus", "3", "--parallel.tensor", "2"]) == 2
    assert main(["gpt2-124m", "--parallel.data", "nope"]) == 2


def _fake_run(run, *, device: str, precision: str, world_size: int) -> None:
    """A run dir as `fmcore train` leaves it: the config asked for, what it resolved to, metrics."""
    from fmcore.train.config import to_toml

    run.mkdir()
    cfg = load_config("tiny", ["--parallel.data", "fsdp2"])  # device, precision, ops, vocabulary "auto"
    (run / "config.toml").write_text(to_toml(cfg))
    model = dataclasses.asdict(models.resolve(dataclasses.replace(cfg.model, ops="fmcore"), 1000, device))
    (run / "resolved.json").write_text(json.dumps({"model": model, "precision": precision, "device": device,
                                                   "world_size": world_size}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0, "mem_mib": 2048.0}) + "\n")


def test_cli_plans_a_run_as_it_ran(tmp_path, capsys):
    # Without CONFIG, --run plans the run's config with its "auto" fields as they resolved there: the
    # world size, the precision, the ops, the vocabulary (the dataset's 1024, not the 50304 default).
    _fake_run(tmp_path / "gpu", device="cuda:0", precision="bf16", world_size=8)
    assert main(["--run", str(tmp_path / "gpu")]) == 0
    out = capsys.readouterr().out
    params = models.param_count(models.resolve(dataclasses.replace(load_config("tiny", []).model, ops="fmcore"),
                                               1024, "cuda"))
    assert f"tiny: gpt2 {params / 1e6:.1f}M params, precision bf16," in out and "parallel.data=fsdp2 x8" in out
    assert "ops=fmcore" in out and "peak of the run" in out
    # Overrides still apply (their values are not taken for CONFIG), and --gpus wins over the run's.
    assert main(["--run", str(tmp_path / "gpu"), "--train.precision", "fp32", "--gpus", "2"]) == 0
    assert "precision fp32," in (out := capsys.readouterr().out) and "x2," in out
    # A CPU run's peak is the process's RSS: printed, but not as a ratio to the plan.
    _fake_run(tmp_path / "cpu", device="cpu", precision="fp32", world_size=1)
    assert main(["--run", str(tmp_path / "cpu")]) == 0
    out = capsys.readouterr().out
    assert "precision fp32," in out and "not comparable" in out and "x the plan" not in out
    assert main(["--run", str(tmp_path / "missing")]) == 2
    assert "holds no metrics.jsonl" in capsys.readouterr().out
