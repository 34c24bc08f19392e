"""fmcore plan-memory: the memory model's arithmetic per layout, the CLI, and the communication
volumes quoted in docs/parallelism.md."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fmcore.train import models
from fmcore.train.config import load_config
from fmcore.train.plan import Layout, comm_bytes_per_step, main, plan


def mcfg(preset: str = "gpt2-124m"):
    """The preset's model as a GPU run resolves it (fmcore's ops), whatever this machine has."""
    return models.resolve(dataclasses.replace(load_config(preset, []).model, ops="fmcore"), None, "cuda")


def tp_sharded(m) -> int:
    """Parameters of m that parallel.apply_tensor_parallel shards, counted from the built model: the
    column-parallel projections (weights and biases) and the row-parallel projections' weights."""
    col = ("qkv.", "fc.", "wqkv.", "w_gate_up.")
    row = ("attn_out.weight", "mlp_out.weight", "wo.weight", "w_down.weight")
    with torch.device("meta"):
        model = models.build_model(m)
    return sum(p.numel() for n, p in model.named_parameters() if any(f".{c}" in n for c in col) or n.endswith(row))


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
    S = tp_sharded(m)  # embeddings, norms and the head stay replicated
    assert tp["params"] == 4 * (P - S + S / 2) and tp["activations"] < ddp["activations"]
    ckpt = plan(m, Layout("ddp", 8, 1), **{**kw, "checkpointing": True})
    assert ckpt["activations"] < ddp["activations"] / 4
    sel = plan(m, Layout("ddp", 8, 1), **{**kw, "checkpointing": "selective"})
    assert ckpt["activations"] < sel["activations"] < ddp["activations"]
    bf16 = plan(m, Layout("ddp", 8, 1), **{**kw, "precision": "bf16"})
    assert bf16["params"] == 2 * P and bf16["optimizer"] == 12 * P  # bf16 weights keep an fp32 master
    for parts in (ddp, zero, fsdp, tp, ckpt, sel, bf16):
        assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))


def test_cli_plans_each_checkpointing_mode(capsys):
    gib = {}
    for mode in ("none", "selective", "full", "2", "true"):
        assert main(["gpt2-124m", "--train.activation_checkpointing", mode]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("activations"))
        gib[mode] = float(line.split()[1])
    assert gib["full"] == gib["true"] < gib["2"] < gib["selective"] < gib["none"]


def test_checkpointing_ratios_in_the_docs():
    # docs/parallelism.md, plan.py's module doc and train.activation_checkpointing's docstring quote them
    from fmcore.train.plan import activation_bytes_per_token

    for preset, selective, full, selective_tp2 in (("gpt2-124m", 0.70, 0.24, 0.77), ("llama-1b", 0.68, 0.21, 0.76)):
        act = {mode: activation_bytes_per_token(mcfg(preset), "bf16-autocast", 1, mode)
               for mode in ("none", "selective", "full")}
        assert act["selective"] / act["none"] == pytest.approx(selective, abs=0.005), preset
        assert act["full"] / act["none"] == pytest.approx(full, abs=0.005), preset
        tp2 = {mode: activation_bytes_per_token(mcfg(preset), "bf16-autocast", 2, mode)
               for mode in ("none", "selective")}
        assert tp2["selective"] / tp2["none"] == pytest.approx(selective_tp2, abs=0.005), preset


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
    # fsdp2 gathers the root module (embeddings, head, final norm) once a step, the blocks twice: in fp32,
    # and under bf16 autocast with the blocks in bf16, ddp's bytes (the root's one fp32 gather is two bf16
    # ones' bytes). The docs' table, GPT-2 124M on 8 GPUs and Llama 1.1B on 64: fp32 | bf16-autocast | bf16.
    for m, gpus, want in ((m, 8, (1.17, 0.87, 0.58)), (llama, 64, (12.48, 8.66, 6.24))):
        got = [comm_bytes_per_step(models.param_count(m), Layout("fsdp2", gpus, 1), precision=precision, mcfg=m)
               for precision in ("fp32", "bf16-autocast", "bf16")]
        assert [g["data"] / 1e9 for g in got] == pytest.approx(want, abs=0.005)
        ddp = comm_bytes_per_step(models.param_count(m), Layout("ddp", gpus, 1), precision="bf16-autocast", mcfg=m)
        assert got[1]["data"] == pytest.approx(ddp["data"], rel=1e-12)
    tp = [comm_bytes_per_step(models.param_count(llama), Layout("fsdp2", 4, 2), precision=precision, mcfg=llama)
          for precision in ("fp32", "bf16-autocast", "bf16")]
    assert [g["data"] / 1e9 for g in tp] == pytest.approx((5.15, 3.69, 2.57), abs=0.005)
    # fsdp2 gathers and reduce-scatters per micro-batch, ddp reduces once a step: the presets on 8 GPUs
    # accumulate 4 (gpt2-124m) and 8 (llama-1b) micro-batches a step
    from fmcore.train.trainer import Env, grad_accumulation

    for preset, fsdp2, ddp in (("gpt2-124m", 3.49, 0.87), ("llama-1b", 61.6, 7.70)):
        accum, _ = grad_accumulation(load_config(preset, []), Env(0, 8, 0, torch.device("cpu")))
        assert accum == {"gpt2-124m": 4, "llama-1b": 8}[preset]
        m = mcfg(preset)
        P = models.param_count(m)
        got = {mode: comm_bytes_per_step(P, Layout(mode, 8, 1), precision="bf16-autocast", mcfg=m, accum=accum)
               for mode in ("fsdp2", "ddp")}
        assert (got["fsdp2"]["data"] / 1e9, got["ddp"]["data"] / 1e9) == pytest.approx((fsdp2, ddp), abs=0.005)


def test_hybrid_sharding_divides_by_the_shard_group_and_all_reduces_across_replicas(capsys):
    # parallel.replicate r: fsdp2 over k = dp / r ranks (one node), each rank's gradient shard (P / k)
    # all-reduced over the r replicas. Llama 1.1B, 4 nodes x 8 GPUs: the state of fsdp2 over 8, the
    # shard group's gathers and reduce-scatters over 8, plus 2(r-1)/r * P/k * 4 bytes across nodes.
    m = mcfg("llama-1b")
    P = models.param_count(m)
    root = models.param_count(dataclasses.replace(m, n_layers=0))
    kw = dict(precision="bf16-autocast", batch_size=1, seq_len=16, checkpointing=False)
    hybrid, over8, over32 = (plan(m, layout, **kw) for layout in (Layout("fsdp2", 32, 1, 4), Layout("fsdp2", 8, 1),
                                                                     Layout("fsdp2", 32, 1)))
    assert hybrid["params"] == hybrid["grads"] == 4 * P / 8 and hybrid["optimizer"] == 8 * P / 8
    assert hybrid == over8 and hybrid["params"] == 4 * over32["params"]
    for precision, gathered in (("fp32", 4), ("bf16-autocast", 2), ("bf16", 2)):
        w = 2 if precision == "bf16" else 4
        got = comm_bytes_per_step(P, Layout("fsdp2", 32, 1, 4), precision=precision, mcfg=m, accum=3)
        shard_group = 7 / 8 * (2 * (P - root) * gathered + root * w + P * w)
        assert got["replicas"] == pytest.approx(3 * 2 * 3 / 4 * P / 8 * w, rel=1e-12), precision
        assert got["data"] == pytest.approx(3 * shard_group + got["replicas"], rel=1e-12), precision
    # docs/parallelism.md: 0.83 GB of Llama 1.1B's 8.53 GB under bf16 autocast cross the nodes (fsdp2 over
    # the 32 GPUs sends 8.53 GB too, in rings whose every hop waits for the inter-node ones)
    got = comm_bytes_per_step(P, Layout("fsdp2", 32, 1, 4), precision="bf16-autocast", mcfg=m)
    flat = comm_bytes_per_step(P, Layout("fsdp2", 32, 1), precision="bf16-autocast", mcfg=m)
    assert [got["data"] / 1e9, got["replicas"] / 1e9, flat["data"] / 1e9] == pytest.approx([8.53, 0.83, 8.53],
                                                                                        abs=0.005)
    # the CLI (the preset's 1M tokens a step on 32 GPUs: 2 micro-batches)
    assert main(["llama-1b", "--gpus", "32", "--parallel.data", "fsdp2", "--parallel.replicate", "4"]) == 0
    out = capsys.readouterr().out
    assert "parallel.data=fsdp2 x32 (4 replicas sharded over 8), parallel.tensor=1" in out
    assert "17.05 GB data-parallel (1.65 GB of it across the replicas), 0.00 GB tensor-parallel" in out
    assert main(["llama-1b", "--gpus", "12", "--parallel.data", "fsdp2", "--parallel.replicate", "8"]) == 2
    assert "parallel.replicate (8) must divide the data-parallel processes (12" in capsys.readouterr().out


def test_cli_prints_the_plan_and_the_measured_peak(tmp_path, capsys):
    assert main(["gpt2-124m", "--gpus", "8", "--parallel.data", "zero1"]) == 0
    out = capsys.readouterr().out
    assert "parallel.data=zero1 x8" in out and "optimizer" in out and "measured" not in out
    # and the bytes sent, docs/parallelism.md's (fsdp2's per micro-batch: the preset's 4 on 8 GPUs)
    assert "sent per GPU per optimizer step (4 micro-batches; ring collectives): 0.87 GB data-parallel, 0.00 GB" in out
    assert main(["gpt2-124m", "--gpus", "8", "--parallel.data", "fsdp2"]) == 0
    assert "3.49 GB data-parallel" in capsys.readouterr().out
    # (a tokens_per_step 6 GPUs cannot make: refused as `fmcore train` refuses it)
    assert main(["gpt2-124m", "--gpus", "6", "--parallel.data", "ddp"]) == 2
    assert "train.tokens_per_step (524288) must be a multiple" in capsys.readouterr().out
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


@pytest.mark.parametrize("preset", ["gpt2-124m", "llama-1b", "llama-1b-qwen"])
def test_tensor_parallel_keeps_embeddings_head_and_norms_whole(preset):
    # What one tensor-parallel rank holds, counted from the model's own parameters: the projections
    # parallel.apply_tensor_parallel shards (column-parallel weights and biases, row-parallel weights)
    # are split t ways, everything else (embeddings, head, norms, row-parallel biases) is replicated.
    # (llama-1b-qwen: with Qwen's q/k/v biases (sharded), q/k norms (replicated) and heads of 128, not 64)
    qwen = dict(qkv_bias=True, qk_norm=True, head_dim=128) if preset.endswith("-qwen") else {}
    m = dataclasses.replace(mcfg(preset.removesuffix("-qwen")), n_layers=2, **qwen)  # a model that builds fast
    sharded, P = tp_sharded(m), models.param_count(m)
    kw = dict(precision="bf16-autocast", batch_size=1, seq_len=16, checkpointing=False)
    for t in (2, 4):
        parts = plan(m, Layout("none", 1, t), **kw)
        held = P - sharded + sharded / t
        assert parts["params"] == parts["grads"] == 4 * held and parts["optimizer"] == 8 * held


def test_zero1_counts_its_shard_buffers():
    # ZeroAdamW keeps, besides the flat gradient buckets, its shard's reduced gradient and the buffer
    # it all-gathers the updated parameters from: two shard-sized tensors in the weights' dtype.
    m = mcfg()
    P = models.param_count(m)
    kw = dict(batch_size=1, seq_len=16, checkpointing=False)
    for precision, w in (("bf16-autocast", 4), ("bf16", 2)):
        zero = plan(m, Layout("zero1", 8, 1), precision=precision, **kw)
        assert zero["comm"] == P * w + 2 * P / 8 * w


@pytest.mark.parametrize("args,why", [
    (["--gpus", "-2"], "--gpus: expected"),
    # (-50304 was planned as given: tiny as a -5.6M-parameter model of -0.021 GiB of params)
    (["--data.dataset", "/absent", "--vocab-size", "-50304"], "--vocab-size: expected a vocabulary >= 1, got -50304"),
    (["--data.dataset", "/absent", "--vocab-size", "0"], "--vocab-size: expected a vocabulary >= 1, got 0"),
    (["--gpus", "8"], "but parallel.data is 'none'"),
    (["--gpus", "4", "--parallel.tensor", "2"], "2 data-parallel replicas"),
    (["--gpus", "2", "--parallel.data", "ddp", "--parallel.tensor", "2"], "with parallel.tensor > 1"),
    (["--gpus", "2", "--parallel.data", "zero1", "--train.precision", "fp16"], "does not support train.precision"),
    (["--model.ops", "torch", "--train.precision", "bf16"], "needs optim.impl 'fmcore'"),
    # tensor parallelism keeps whole heads: the trainer refused these after building the model
    (["--gpus", "4", "--parallel.tensor", "4"], "parallel.tensor 4 must divide model.n_heads (2)"),
    (["--gpus", "2", "--parallel.tensor", "2", "--model.arch", "llama", "--model.n_heads", "4", "--model.n_kv_heads",
      "1"], "parallel.tensor 2 must divide model.n_heads (4), model.n_kv_heads (1)"),
])
def test_cli_refuses_what_the_trainer_refuses(capsys, args, why):
    assert main(["tiny", *args]) == 2
    assert why in capsys.readouterr().out


@pytest.mark.parametrize("preset", ["gpt2-124m", "llama-1b"])
def test_fsdp2_gathers_the_root_module_and_two_blocks(preset):
    # fully_shard(model) groups what is outside the blocks (embeddings, head, final norm); FSDP2 keeps
    # that group gathered from the forward's start to the backward's end, plus one block and the next.
    m = dataclasses.replace(mcfg(preset), n_layers=2, tie_embeddings=False)
    with torch.device("meta"):
        model = models.build_model(m)
    root = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("blocks."))
    block = sum(p.numel() for p in model.blocks[0].parameters())
    for precision, gathered in (("fp32", 4), ("bf16-autocast", 2), ("bf16", 2)):
        # (under bf16 autocast the blocks are gathered in bf16, the root module in fp32: parallel.apply_fsdp2)
        parts = plan(m, Layout("fsdp2", 8, 1), precision=precision, batch_size=1, seq_len=16, checkpointing=False)
        assert parts["comm"] == (2 if precision == "bf16" else 4) * root + gathered * 2 * block, precision


def test_tensor_parallel_replicas_without_data_parallelism_are_refused():
    # 4 processes, parallel.tensor 2, parallel.data 'none': two tensor-parallel replicas, each reading
    # its own data, whose gradients nothing averaged: they drifted apart silently. The trainer checks
    # at its start with the function plan-memory uses.
    from fmcore.train.config import ConfigError
    from fmcore.train.parallel import check_layout

    check_layout("none", 2, 2, "fp32", 1)  # one replica
    with pytest.raises(ConfigError, match=r"parallel.tensor 2: 2 data-parallel replicas\) but parallel.data is 'none'"):
        check_layout("none", 2, 4, "fp32", 1)


def test_cli_plans_the_embedded_corpus_vocabulary(capsys):
    # The tiny preset trains on the embedded corpus (data.dataset empty), whose BPE has 4096 tokens:
    # the plan took the --vocab-size fallback (50304), a model 5x the one `fmcore train tiny` builds.
    assert main(["tiny"]) == 0
    params = models.param_count(models.resolve(dataclasses.replace(load_config("tiny", []).model, ops="fmcore"),
                                               4096, "cpu"))
    assert f"tiny: gpt2 {params / 1e6:.1f}M params," in capsys.readouterr().out


def test_cli_plans_a_named_datasets_vocabulary(tmp_path, capsys):
    # model.vocab_size 0 takes the dataset's: read from its manifest where this machine has it, else
    # --vocab-size (a plan made away from the data)
    import numpy as np

    from fmcore.data import write_dataset

    dataset = write_dataset(tmp_path / "ds", {"train": [np.arange(100)]}, vocab_size=700)
    tiny = dataclasses.replace(load_config("tiny", []).model, ops="fmcore")
    for where, vocab in ((dataset, 700), (tmp_path / "absent", 50304)):
        assert main(["tiny", "--data.dataset", str(where)]) == 0
        params = models.param_count(models.resolve(tiny, vocab, "cpu"))
        assert f"tiny: gpt2 {params / 1e6:.1f}M params," in capsys.readouterr().out, where


def test_torch_ops_plan_the_logits_and_their_gradient():
    # (fmcore's linear cross-entropy never holds the (tokens, vocabulary) logits; torch's path holds them in
    # fp32, and their gradient)
    m = mcfg()
    fmcore, torch_ops = (plan(dataclasses.replace(m, ops=ops), Layout("none", 1, 1), precision="bf16-autocast",
                              batch_size=8, seq_len=1024, checkpointing=False) for ops in ("fmcore", "torch"))
    assert torch_ops["activations"] - fmcore["activations"] == 2 * 8 * 1024 * m.vocab_size * 4
    assert comm_bytes_per_step(1000, Layout("none", 1, 1)) == {"data": 0.0, "replicas": 0.0, "tensor": 0.0,
                                                               "total": 0.0}


def test_out_of_memory_advice_plans_each_way_out():
    # What the trainer appends to an out-of-memory error: plan() of the run, and of each setting that lowers it.
    from fmcore.train.plan import out_of_memory_advice

    cfg = load_config("llama-1b", ["--parallel.data", "ddp"])
    m = mcfg("llama-1b")

    def gib(data="ddp", batch_size=8, checkpointing="none", part="total"):
        parts = plan(m, Layout(data, 8, 1), precision="bf16-autocast", batch_size=batch_size, seq_len=2048,
                     checkpointing=checkpointing)
        return f"{parts[part] / 2**30:.1f} GiB"

    assert out_of_memory_advice(m, cfg, 8, "bf16-autocast").splitlines() == [
        f"plan-memory puts this run at {gib()} per GPU (activations {gib(part='activations')}, micro-batches of 8 x "
        "2048, activation checkpointing none); to lower it:",
        f"  --train.activation_checkpointing selective ({gib(checkpointing='selective')}), full "
        f"({gib(checkpointing='full')})",
        f"  --train.batch_size 4 ({gib(batch_size=4)}; train.tokens_per_step (1048576) keeps the global batch, in more "
        "micro-batches)",
        f"  --parallel.data zero1 ({gib(data='zero1')}) or fsdp2 ({gib(data='fsdp2')})"]
    assert gib() == "44.9 GiB" and gib(data="fsdp2") == "27.1 GiB"
    # full checkpointing, one sequence a micro-batch, fsdp2: nothing left to suggest but the model's size
    cfg = load_config("llama-1b", ["--parallel.data", "fsdp2", "--train.activation_checkpointing", "full",
                                   "--train.batch_size", "1"])
    advice = out_of_memory_advice(m, cfg, 8, "bf16-autocast")
    assert "\n" not in advice and advice.endswith("what lowers it now is a shorter train.seq_len, or more GPUs (fsdp2 "
                                                  "divides the model's state by them) or --parallel.tensor N")
    # hybrid sharding: the plan of its shard groups, and of fsdp2 over every GPU
    cfg = load_config("llama-1b", ["--parallel.data", "fsdp2", "--parallel.replicate", "2",
                                   "--train.activation_checkpointing", "full", "--train.batch_size", "1"])
    hybrid, flat = (plan(m, Layout("fsdp2", 8, 1, r), precision="bf16-autocast", batch_size=1, seq_len=2048,
                         checkpointing="full")["total"] / 2**30 for r in (2, 1))
    first, *ways = out_of_memory_advice(m, cfg, 8, "bf16-autocast").splitlines()
    assert first.startswith(f"plan-memory puts this run at {hybrid:.1f} GiB per GPU") and first.endswith("to lower it:")
    assert ways == [f"  --parallel.replicate 1 ({flat:.1f} GiB: fsdp2 over all 8 data-parallel GPUs, its all-gathers "
                    "across the nodes)"]
    assert hybrid > flat
