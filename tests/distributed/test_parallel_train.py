"""The trainer's parallel layouts on 2 CPU ranks (gloo) against 1 process with the same global batch.

For each of ddp, fsdp2, zero1 and tensor=2, with fmcore's ops and FusedAdamW (the defaults) and with
plain PyTorch's: 20 steps of a small GPT-2 give the same losses as one process (float tolerance: the
reductions run in another order); a checkpoint saved at step 10 on 2 ranks resumes on 2 ranks and
reproduces steps 11-20; for fsdp2 and zero1 it also loads in 1 process (resharding) and reproduces
them, tensor=2's loads in 1 process without tensor parallelism and 1 process's on 2 with it; the
Hugging Face export written at the end (gathered from the shards, tensor parallelism's split
projections fused again) holds one process's weights, and `fmcore export` of the final checkpoint in
this process writes the same weights (a bf16 run's fp32 masters, from zero1 and tensor=2). And fsdp2
with tensor=2 on 4 ranks (a 2-D mesh) against 1 process, its checkpoint resumed by fsdp2 alone on 2
ranks, fsdp2 with tensor=2, activation checkpointing (full, and selective) and torch.compile (of the
model, and of each block) against 1 process, zero1 and fsdp2 with 2 micro-batches per step (gradient
accumulation) against 1 process, and 1 process's checkpoint resumed on 2 ranks. fsdp2 under bf16
autocast: the dtypes and sizes of what it all-gathers (bf16 blocks) and reduce-scatters (fp32) in a
step, against plan-memory's bytes, its fp32 shards; its losses and checkpoints against 1 process's.
Hybrid sharding (parallel.replicate 2): on 4 ranks and with tensor=2 on 8 against 1 process, its
checkpoints resumed in its layout, by plain fsdp2 and in 1 process; its mesh's groups, and what it
sends in a step (the all-reduce over the replicas included) against plan-memory's bytes.
"""

from __future__ import annotations

import email
import json
import os
import shutil
import warnings
from collections import Counter
from pathlib import Path

import matplotlib
import pytest
import torch

from fmcore import data
from tests.distributed.launch import run_ranks

STEPS, SAVE_AT, B = 20, 10, 4  # B: sequences per data-parallel rank
MODES = {
    "ddp": ["--parallel.data", "ddp"],
    "fsdp2": ["--parallel.data", "fsdp2"],
    "zero1": ["--parallel.data", "zero1"],
    "tensor2": ["--parallel.tensor", "2"],
}
# fmcore's ops and optimizer are the defaults (model.ops and optim.impl "auto"; FusedAdamW where the
# layout allows it); "torch" swaps in SDPA & co. and torch.optim.AdamW.
OPS = {"fmcore": [], "torch": ["--model.ops", "torch", "--optim.impl", "torch"]}
# float32 on the CPU; 2 ranks sum gradients in another order than one process, and Adam's first
# steps amplify such differences, so losses agree to ~1e-5 relative, not bitwise.
RTOL, ATOL = 2e-4, 2e-5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    # Import once what every forked rank needs (they inherit it): matplotlib draws each run's loss plot.
    matplotlib.use("Agg")
    import matplotlib.pyplot as _pyplot  # noqa: F401
    out = tmp_path_factory.mktemp("data") / "email"
    return data.prepare([Path(email.__file__).parent], out, vocab_size=512, val_fraction=0.1, workers=1,
                        progress=False)


def overrides(dataset: Path, run: Path, batch: int, *extra: str) -> list[str]:
    return ["--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "4", "--model.max_seq_len", "64",
            "--train.seq_len", "32", "--train.batch_size", str(batch), "--train.steps", str(STEPS),
            "--train.device", "cpu", "--train.precision", "fp32", "--train.eval_batches", "1",
            "--train.eval_every", "0", "--data.dataset", str(dataset), "--data.threads", "1",
            "--schedule.warmup_steps", "5", "--log.run_dir", str(run), "--log.every", "1",
            "--log.progress", "none", "--log.tensorboard", "false", "--log.sample_tokens", "0",
            "--checkpoint.every", str(SAVE_AT), "--checkpoint.keep_last", "0", *extra]


def _train(rank: int, world: int, args: list[str]) -> None:
    from fmcore.train.config import load_config
    from fmcore.train.trainer import train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    train(load_config("tiny", args))


def run(world: int, args: list[str], tmp: Path, spawn: bool = False) -> None:
    run_ranks(_train, world, tmp, args=(args,), timeout=240, spawn=spawn)


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r and "step" in r}


def assert_losses_close(got: dict[int, float], want: dict[int, float], steps, rtol: float = RTOL) -> None:
    import torch

    steps = list(steps)
    assert all(s in got for s in steps), f"missing steps: {sorted(set(steps) - set(got))}"
    torch.testing.assert_close(torch.tensor([got[s] for s in steps], dtype=torch.float64),
                               torch.tensor([want[s] for s in steps], dtype=torch.float64), rtol=rtol, atol=ATOL)


def assert_exports_close(got_run: Path, want_run: Path) -> None:
    # The weights after 20 Adam steps differ by the losses' float noise (~1e-5 absolute); a tensor
    # gathered from the wrong shards or parts in the wrong order differs by the weights' own size.
    from safetensors.torch import load_file

    got, want = (load_file(run / "hf" / "model.safetensors") for run in (got_run, want_run))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=2e-4, msg=name)


def resume_from(src_run: Path, dst_run: Path) -> Path:
    """A copy of src_run's step-SAVE_AT checkpoint as the only checkpoint of a new run dir."""
    src = src_run / "checkpoints" / f"step_{SAVE_AT:08d}"
    dst = dst_run / "checkpoints" / src.name
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def references(dataset, tmp_path_factory) -> dict[tuple[str, int], Path]:
    """Run dirs of one process, parallel.data none, with each OPS, at batch B (tensor parallel's
    global batch) and 2B."""
    out = {}
    for ops in OPS:
        for batch in (B, 2 * B):
            tmp = tmp_path_factory.mktemp(f"ref-{ops}-{batch}")
            run(1, overrides(dataset, tmp / "run", batch, *OPS[ops]), tmp / "launch")
            out[ops, batch] = tmp / "run"
    return out


@pytest.fixture(scope="module", params=[(m, o) for m in MODES for o in OPS], ids="-".join)
def two_rank_run(request, dataset, tmp_path_factory):
    mode, ops = request.param
    tmp = tmp_path_factory.mktemp(f"{mode}-{ops}")
    run(2, overrides(dataset, tmp / "run", B, *MODES[mode], *OPS[ops]), tmp / "launch")
    return mode, ops, tmp


def test_two_ranks_match_one_process(two_rank_run, references):
    mode, ops, tmp = two_rank_run
    global_batch = B if mode == "tensor2" else 2 * B  # a tensor-parallel pair reads one batch
    assert_losses_close(losses(tmp / "run"), losses(references[ops, global_batch]), range(1, STEPS + 1))
    assert_exports_close(tmp / "run", references[ops, global_batch])


def test_resume_on_two_ranks(two_rank_run, dataset):
    mode, ops, tmp = two_rank_run
    ckpt = resume_from(tmp / "run", tmp / "resumed")
    run(2, overrides(dataset, tmp / "resumed", B, *MODES[mode], *OPS[ops], "--checkpoint.resume", str(ckpt)),
        tmp / "launch-resume")
    assert_losses_close(losses(tmp / "resumed"), losses(tmp / "run"), range(SAVE_AT + 1, STEPS + 1))


def test_load_on_one_process(two_rank_run, dataset):
    mode, ops, tmp = two_rank_run
    if mode not in ("fsdp2", "zero1"):
        pytest.skip("resharding to another world size is for fsdp2 and zero1")
    ckpt = resume_from(tmp / "run", tmp / "one")
    # one process with the same global batch and the same layout (a 1-rank group), from 2 ranks' shards
    run(1, overrides(dataset, tmp / "one", 2 * B, *MODES[mode], *OPS[ops], "--checkpoint.resume", str(ckpt)),
        tmp / "launch-one")
    assert_losses_close(losses(tmp / "one"), losses(tmp / "run"), range(SAVE_AT + 1, STEPS + 1))


def test_fmcore_export_reads_the_checkpoint_in_one_process(two_rank_run):
    # `fmcore export` of the 2 ranks' final checkpoint, in this process (no process group): the weights
    # the end of the run exported (gathered from the shards, the split projections fused), exactly.
    from safetensors.torch import load_file

    from fmcore.__main__ import main

    _, _, tmp = two_rank_run
    assert main(["export", str(tmp / "run"), "--out", str(tmp / "exported")]) == 0
    got, want = (load_file(tmp / d / "model.safetensors") for d in ("exported", "run/hf"))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("mode", ["zero1", "tensor2"])
def test_fmcore_export_of_a_bf16_run_writes_its_fp32_master_weights(mode, dataset, tmp_path):
    # zero1 keeps the masters in its flat buckets, tensor parallelism in the split projections' parts; in
    # one process they are cut or regrouped into FusedAdamW's. Rounded to bf16 they are the parameters the
    # run exported at its end; some of them are not bf16 values themselves.
    from safetensors.torch import load_file

    from fmcore.__main__ import main

    llama = ["--model.arch", "llama", "--model.tie_embeddings", "false"]
    run(2, overrides(dataset, tmp_path / "run", B, *MODES[mode], *llama, "--train.precision", "bf16",
                     "--train.steps", "6"), tmp_path / "launch")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "exported")]) == 0
    masters, bf16 = (load_file(tmp_path / d / "model.safetensors") for d in ("exported", "run/hf"))
    assert masters.keys() == bf16.keys() and {t.dtype for t in masters.values()} == {torch.float32}
    for name in bf16:
        assert torch.equal(masters[name].bfloat16(), bf16[name]), name
    assert any(not torch.equal(masters[name], bf16[name].float()) for name in bf16)


def test_a_tensor_parallel_checkpoint_resumes_without_tensor_parallelism_and_back(two_rank_run, dataset, references):
    # A tensor-parallel checkpoint names the split projections ("blocks.0.qkv.parts.0.weight"), which
    # DCP cannot map onto one fused tensor: "does not fit this model and optimizer: Missing key", and
    # then a ConfigError. checkpoint.load regroups them on rank 0. The way back starts on more
    # processes than wrote the checkpoint (the second takes rank 0's loader state).
    mode, ops, tmp = two_rank_run
    if mode != "tensor2":
        pytest.skip("tensor parallelism's checkpoints")
    ckpt = resume_from(tmp / "run", tmp / "untensored")
    run(1, overrides(dataset, tmp / "untensored", B, *OPS[ops], "--checkpoint.resume", str(ckpt)),
        tmp / "launch-untensored")
    assert_losses_close(losses(tmp / "untensored"), losses(tmp / "run"), range(SAVE_AT + 1, STEPS + 1))
    ckpt = resume_from(references[ops, B], tmp / "tensored")
    run(2, overrides(dataset, tmp / "tensored", B, *MODES[mode], *OPS[ops], "--checkpoint.resume", str(ckpt)),
        tmp / "launch-tensored")
    assert_losses_close(losses(tmp / "tensored"), losses(references[ops, B]), range(SAVE_AT + 1, STEPS + 1))
    # Rank 0 reads such a checkpoint alone: when it fails, the other rank must raise too, not wait.
    ckpt = resume_from(tmp / "run", tmp / "damaged")
    next(ckpt.glob("*.distcp")).unlink()
    args = overrides(dataset, tmp / "damaged", B, "--parallel.data", "ddp", *OPS[ops], "--checkpoint.resume", str(ckpt))
    messages = run_ranks(_train_expecting_an_error, 2, tmp / "launch-damaged", args=(args,), timeout=120)
    assert all("is damaged (a file of it is missing" in m for m in messages) and "(read on rank 0)" in messages[1], messages


def test_a_checkpoint_resumes_on_more_processes(dataset, references, tmp_path):
    # The loader's state is the next global sample, which it reshards to any world size; the ranks a
    # checkpoint has no extra_rank<r>.pt for take rank 0's (they were refused: "resume it on at most 1").
    for mode in ("ddp", "fsdp2"):
        ckpt = resume_from(references["fmcore", 2 * B], tmp_path / mode)
        run(2, overrides(dataset, tmp_path / mode, B, *MODES[mode], "--checkpoint.resume", str(ckpt)),
            tmp_path / f"launch-{mode}")
        assert_losses_close(losses(tmp_path / mode), losses(references["fmcore", 2 * B]), range(SAVE_AT + 1, STEPS + 1))


def test_hybrid_sharding_on_four_ranks(dataset, references, tmp_path):
    # parallel.replicate 2: 2 replicas of fsdp2 over 2 ranks each (HSDP), every one of the 4 data-parallel
    # ranks reading B/2 sequences of the global batch 2B. The gradients' placements are (Replicate,
    # Shard): the global norm sums their squares over the shard dim alone (over both, it doubled).
    hybrid = ["--parallel.data", "fsdp2", "--parallel.replicate", "2"]
    run(4, overrides(dataset, tmp_path / "run", B // 2, *hybrid), tmp_path / "launch")
    want = references["fmcore", 2 * B]
    assert_losses_close(losses(tmp_path / "run"), losses(want), range(1, STEPS + 1))
    assert_losses_close(records(tmp_path / "run", "grad_norm"), records(want, "grad_norm"), range(1, STEPS + 1))
    assert_exports_close(tmp_path / "run", want)
    # its checkpoint (DTensor shards, replicated over the replicas) resumed in the same layout, by plain
    # fsdp2 on 2 ranks and in 1 process (resharded)
    ckpt = resume_from(tmp_path / "run", tmp_path / "resumed")
    run(4, overrides(dataset, tmp_path / "resumed", B // 2, *hybrid, "--checkpoint.resume", str(ckpt)),
        tmp_path / "launch-resumed")
    assert_losses_close(losses(tmp_path / "resumed"), losses(tmp_path / "run"), range(SAVE_AT + 1, STEPS + 1))
    ckpt = resume_from(tmp_path / "run", tmp_path / "fsdp2")
    run(2, overrides(dataset, tmp_path / "fsdp2", B, *MODES["fsdp2"], "--checkpoint.resume", str(ckpt)),
        tmp_path / "launch-fsdp2")
    assert_losses_close(losses(tmp_path / "fsdp2"), losses(tmp_path / "run"), range(SAVE_AT + 1, STEPS + 1))
    ckpt = resume_from(tmp_path / "run", tmp_path / "one")
    run(1, overrides(dataset, tmp_path / "one", 2 * B, "--checkpoint.resume", str(ckpt)), tmp_path / "launch-one")
    assert_losses_close(losses(tmp_path / "one"), losses(tmp_path / "run"), range(SAVE_AT + 1, STEPS + 1))
    # and one process's checkpoint resumed by hybrid sharding on 4 ranks
    ckpt = resume_from(want, tmp_path / "from-one")
    run(4, overrides(dataset, tmp_path / "from-one", B // 2, *hybrid, "--checkpoint.resume", str(ckpt)),
        tmp_path / "launch-from-one")
    assert_losses_close(losses(tmp_path / "from-one"), losses(want), range(SAVE_AT + 1, STEPS + 1))
    # `fmcore export` of its final checkpoint in this process: the weights its run exported, exactly
    from safetensors.torch import load_file

    from fmcore.__main__ import main

    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "exported")]) == 0
    got, want = (load_file(tmp_path / d / "model.safetensors") for d in ("exported", "run/hf"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_hybrid_sharding_with_tensor2_on_eight_ranks(dataset, references, tmp_path):
    # a 3-D mesh (dp_replicate 2, dp_shard 2, tp 2): each tensor-parallel pair reads B/2 sequences of the
    # global batch 2B; the column-parallel weights' placements (Replicate, _StridedShard, Shard) sum their
    # squares over the shard and tp dims
    run(8, overrides(dataset, tmp_path / "run", B // 2, "--parallel.data", "fsdp2", "--parallel.replicate", "2",
                     "--parallel.tensor", "2"), tmp_path / "launch")
    want = references["fmcore", 2 * B]
    assert_losses_close(losses(tmp_path / "run"), losses(want), range(1, STEPS + 1))
    assert_losses_close(records(tmp_path / "run", "grad_norm"), records(want, "grad_norm"), range(1, STEPS + 1))
    assert_exports_close(tmp_path / "run", want)
    # its checkpoint resumed by fsdp2 with tensor 2 on 4 ranks (a 2-D mesh)
    ckpt = resume_from(tmp_path / "run", tmp_path / "fsdp2")
    run(4, overrides(dataset, tmp_path / "fsdp2", B, "--parallel.data", "fsdp2", "--parallel.tensor", "2",
                     "--checkpoint.resume", str(ckpt)), tmp_path / "launch-fsdp2")
    assert_losses_close(losses(tmp_path / "fsdp2"), losses(tmp_path / "run"), range(SAVE_AT + 1, STEPS + 1))


def test_fsdp2_with_tensor2_on_four_ranks(dataset, references, tmp_path):
    # dp=2 x tp=2: each tensor-parallel pair reads one data-parallel shard of the global batch 2B.
    run(4, overrides(dataset, tmp_path / "run", B, "--parallel.data", "fsdp2", "--parallel.tensor", "2"),
        tmp_path / "launch")
    assert_losses_close(losses(tmp_path / "run"), losses(references["fmcore", 2 * B]), range(1, STEPS + 1))
    # The global norm: the column-parallel weights' squares were summed over tp alone (their dp placement,
    # a _StridedShard, is not is_shard()), and each dp rank logged and clipped by a norm 1-2% low.
    assert_losses_close(records(tmp_path / "run", "grad_norm"), records(references["fmcore", 2 * B], "grad_norm"),
                        range(1, STEPS + 1))
    assert_exports_close(tmp_path / "run", references["fmcore", 2 * B])
    # its checkpoint (2-D shards of the split projections) resumed by fsdp2 alone on 2 ranks
    ckpt = resume_from(tmp_path / "run", tmp_path / "fsdp2")
    run(2, overrides(dataset, tmp_path / "fsdp2", B, "--parallel.data", "fsdp2", "--checkpoint.resume", str(ckpt)),
        tmp_path / "launch-fsdp2")
    assert_losses_close(losses(tmp_path / "fsdp2"), losses(tmp_path / "run"), range(SAVE_AT + 1, STEPS + 1))


@pytest.mark.parametrize("checkpointing, compiling", [("true", "model"), ("selective", "model"),
                                                     ("selective", "blocks")])
def test_fsdp2_with_tensor2_checkpointing_and_compile(dataset, references, tmp_path, checkpointing, compiling):
    # fmcore's blocks return the MLP's row-parallel output itself (the add is in the next norm's
    # kernel): leaving a checkpointed FSDP2 block under torch.compile with its all-reduce not waited
    # for, it broke the first backward (AttributeError '_local_tensor' in torch's Redistribute).
    # Selective checkpointing: its policy's tags reach the compiled graph of DTensor ops and collectives.
    # Compiled per block: each block's graph holds its tensor-parallel layers and its checkpoint, FSDP2's
    # hooks (all-gather, reduce-scatter) run around it.
    # Spawned: ranks forked from a pytest process that had trained in-process (test_trainer's compiled
    # sweeps, under pytest -n 2) inherited its autograd and compile state and failed to compile
    # (RecursionError in the joint graph's tracing, or autograd's "threading with fork" error).
    run(2, overrides(dataset, tmp_path / "run", B, "--parallel.data", "fsdp2", "--parallel.tensor", "2",
                     "--train.activation_checkpointing", checkpointing, "--train.compile", compiling),
        tmp_path / "launch", spawn=True)
    assert_losses_close(losses(tmp_path / "run"), losses(references["fmcore", B]), range(1, STEPS + 1))


def _train_expecting_an_error(rank: int, world: int, args: list[str]) -> str:
    """The message of the ConfigError (or CheckpointError) this rank's run raises."""
    from fmcore.train.checkpoint import CheckpointError
    from fmcore.train.config import ConfigError

    try:
        _train(rank, world, args)
    except (ConfigError, CheckpointError) as e:
        return str(e)
    return "trained"


def test_a_config_error_found_on_rank_0_reaches_every_rank(dataset, references, tmp_path):
    # Rank 0 alone chooses the run dir. A reference run's dir holds checkpoints, so reusing it without
    # --resume is an error; the other rank must get it too, not a broken broadcast when rank 0 exits.
    args = overrides(dataset, references["fmcore", B], B, "--parallel.data", "ddp")
    messages = run_ranks(_train_expecting_an_error, 2, tmp_path, args=(args,), timeout=60)
    assert all("already holds checkpoints" in m for m in messages), messages


def _mesh_groups(rank: int, world: int, args: list[str]) -> dict[str, tuple[list[int], float]]:
    """{mesh dim: (the ranks of this rank's group, its timeout in seconds)} of the trainer's mesh."""
    import torch.distributed as dist

    from fmcore.train import parallel
    from fmcore.train.config import load_config

    m = parallel.mesh(load_config("tiny", args), torch.device("cpu"))
    groups = {name: m[name].get_group() for name in m.mesh_dim_names}
    timeout = {name: g._get_backend(torch.device("cpu")).options._timeout for name, g in groups.items()}
    return {name: (dist.get_process_group_ranks(g), timeout[name].total_seconds()) for name, g in groups.items()}


def test_hybrid_sharding_shards_within_consecutive_ranks_and_replicates_across(tmp_path):
    # 8 ranks, tensor 2, replicate 2: dp rank = rank // 2 (tp innermost); dp ranks 0-1 (ranks 0-3: one
    # node of 4 GPUs) shard the model, and replicate it with dp ranks 2-3 (ranks 4-7). Every group waits
    # parallel.timeout_s (torch's own mesh made them with its default: gloo 30 minutes).
    args = ["--parallel.data", "fsdp2", "--parallel.replicate", "2", "--parallel.tensor", "2",
            "--parallel.timeout_s", "7"]
    for rank, got in enumerate(run_ranks(_mesh_groups, 8, tmp_path, args=(args,), timeout=60)):
        node, tp_rank, shard = rank // 4, rank % 2, rank // 2 % 2
        assert got == {"dp_replicate": ([tp_rank + 2 * shard, 4 + tp_rank + 2 * shard], 7),
                       "dp_shard": ([4 * node + tp_rank, 4 * node + tp_rank + 2], 7),
                       "tp": ([rank - tp_rank, rank - tp_rank + 1], 7)}, (rank, got)


def test_hybrid_sharding_refuses_what_it_cannot_run():
    from fmcore.train.config import ConfigError, load_config
    from fmcore.train.parallel import check_layout

    with pytest.raises(ConfigError, match=r"parallel.replicate: expected > 0, got 0"):
        load_config("tiny", ["--parallel.data", "fsdp2", "--parallel.replicate", "0"])
    for mode in ("none", "ddp", "zero1"):
        with pytest.raises(ConfigError, match=f"parallel.replicate 2 \\(hybrid sharding\\) needs parallel.data "
                                              f"'fsdp2', got '{mode}'"):
            load_config("tiny", ["--parallel.data", mode, "--parallel.replicate", "2"])
    check_layout("fsdp2", 1, 8, "fp32", 4)  # 4 replicas of 2
    with pytest.raises(ConfigError, match=r"parallel.replicate \(4\) must divide the data-parallel processes \(6"):
        check_layout("fsdp2", 1, 6, "fp32", 4)
    check_layout("fsdp2", 2, 8, "fp32", 2)  # with tensor parallelism: 2 replicas x 2 shards x 2 tensor ranks
    with pytest.raises(ConfigError, match=r"parallel.replicate \(4\) must divide the data-parallel processes \(2: "
                                          r"4 processes / parallel.tensor 2\)"):
        check_layout("fsdp2", 2, 4, "fp32", 4)


def test_ddp_and_zero1_refuse_tensor_parallelism(dataset, tmp_path):
    from fmcore.train.config import ConfigError, load_config
    from fmcore.train.parallel import apply_parallelism

    for mode in ("ddp", "zero1"):
        cfg = load_config("tiny", ["--parallel.data", mode, "--parallel.tensor", "2"])
        with pytest.raises(ConfigError, match=f"'{mode}' with parallel.tensor > 1 is not supported"):
            apply_parallelism(torch.nn.Linear(2, 2), cfg, "fp32", torch.device("cpu"), lambda model: None)


@pytest.mark.parametrize("mode", ["zero1", "fsdp2"])
def test_gradient_accumulation_matches_one_process(mode, dataset, references, tmp_path):
    # 2 ranks x 2 micro-batches of B/2 sequences: the global batch 2B. The trainer wraps zero1's first
    # micro-batch's backward in ZeroAdamW.no_sync(); the second one's reduce-scatters run in its backward.
    # fsdp2 reduce-scatters both, accumulating each rank's gradient shards.
    run(2, overrides(dataset, tmp_path / "run", B // 2, *MODES[mode], "--train.tokens_per_step", str(2 * B * 32)),
        tmp_path / "launch")
    assert_losses_close(losses(tmp_path / "run"), losses(references["fmcore", 2 * B]), range(1, STEPS + 1))


def _train_in_the_callers_group(rank: int, world: int, args: list[str]) -> None:
    from fmcore.train.config import load_config
    from fmcore.train.trainer import train

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        os.environ.pop(name, None)
    train(load_config("tiny", args))


def test_train_in_the_callers_process_group_without_launcher_variables(dataset, references, tmp_path):
    # train() called from code that made its own 2-rank group, without torchrun's RANK / WORLD_SIZE:
    # each rank ran as rank 0 of 1 (both locked the run dir: "in use by another fmcore train").
    run_ranks(_train_in_the_callers_group, 2, tmp_path / "launch",
              args=(overrides(dataset, tmp_path / "run", B, "--parallel.data", "ddp"),), timeout=120)
    assert_losses_close(losses(tmp_path / "run"), losses(references["fmcore", 2 * B]), range(1, STEPS + 1))


def test_a_zero1_checkpoint_resumes_in_another_layout_and_back(two_rank_run, dataset, references):
    # zero1's checkpoint holds flat optimizer buckets, the other layouts' one entry per parameter: DCP's
    # "does not fit this model and optimizer: Missing key ...", then a ConfigError. checkpoint.load converts
    # (fmcore.train.relayout) with the buckets' layout the zero1 run records.
    mode, ops, tmp = two_rank_run
    if mode != "zero1":
        pytest.skip("zero1's checkpoints")
    ckpt = resume_from(tmp / "run", tmp / "ddp")
    run(2, overrides(dataset, tmp / "ddp", B, *MODES["ddp"], *OPS[ops], "--checkpoint.resume", str(ckpt)),
        tmp / "launch-ddp")
    assert_losses_close(losses(tmp / "ddp"), losses(tmp / "run"), range(SAVE_AT + 1, STEPS + 1))
    ckpt = resume_from(references[ops, 2 * B], tmp / "from-one")
    run(2, overrides(dataset, tmp / "from-one", B, *MODES[mode], *OPS[ops], "--checkpoint.resume", str(ckpt)),
        tmp / "launch-from-one")
    assert_losses_close(losses(tmp / "from-one"), losses(references[ops, 2 * B]), range(SAVE_AT + 1, STEPS + 1))
    # zero1 with other param groups (its buckets laid out otherwise): refused before, as "another parallel
    # layout (optim.decay_norms_biases = False there, True here ...)". Decaying the norms' weights for
    # a few steps moves the losses less than the tolerance; exp_avg 1.5x too large, 4e-3 relative.
    ckpt = resume_from(tmp / "run", tmp / "decay")
    run(2, overrides(dataset, tmp / "decay", B, *MODES[mode], *OPS[ops], "--checkpoint.resume", str(ckpt),
                     "--optim.decay_norms_biases", "true"), tmp / "launch-decay")
    assert_losses_close(losses(tmp / "decay"), losses(tmp / "run"), range(SAVE_AT + 1, STEPS + 1))


def _train_fp16_from_a_high_scale(rank: int, world: int, args: list[str]) -> None:
    """_train with the loss scaler starting at 2**24: its first steps overflow (the scale halves each)."""
    init = torch.amp.GradScaler.__init__

    def high(self, *a, **k):
        init(self, *a, **{"init_scale": 2.0**24, **k})

    torch.amp.GradScaler.__init__ = high
    _train(rank, world, args)


def records(run_dir: Path, key: str) -> dict:
    return {r["step"]: r[key] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if key in r and "step" in r}


@pytest.mark.parametrize("ops", OPS)
def test_tensor_parallel_fp16_with_an_overflow_streak_matches_one_process(ops, dataset, tmp_path):
    # torch's GradScaler unscaled a device's gradients in one call, tensor parallelism's DTensor shards
    # beside its plain embedding and norm gradients: "got mixed torch.Tensor and DTensor" at the first
    # step (parallel.GradScaler unscales each kind apart). A tensor-parallel pair reads one process's
    # batch, so it overflows on the same steps: the skipped steps and the losses are one process's.
    args = ["--train.precision", "fp16", *OPS[ops]]
    run_ranks(_train_fp16_from_a_high_scale, 1, tmp_path / "launch-one",
              args=(overrides(dataset, tmp_path / "one", B, *args),), timeout=240)
    run_ranks(_train_fp16_from_a_high_scale, 2, tmp_path / "launch",
              args=(overrides(dataset, tmp_path / "run", B, "--parallel.tensor", "2", *args),), timeout=240)
    skipped, want = records(tmp_path / "run", "skipped"), records(tmp_path / "one", "skipped")
    assert want[STEPS] > 2 and skipped == want, (skipped, want)
    # (the losses only: fp16's rounding in another order flips some near-zero gradients' Adam updates)
    assert_losses_close(losses(tmp_path / "run"), losses(tmp_path / "one"), range(1, STEPS + 1))


def _train_with_an_inf_in_one_shard(rank: int, world: int, args: list[str]) -> tuple[float, float]:
    """_train where, at the 5th step, rank 1 finds an inf in its shard of a tensor-parallel gradient (an
    fp16 weight gradient that overflowed in one rank's GEMM alone); returns this rank's final loss scale
    and the sum of its tensor-parallel replicated parameters (embeddings, norms: equal on every tp rank)."""
    from torch.distributed.tensor import DTensor, Shard

    unscale, seen = torch.amp.GradScaler.unscale_, {"steps": 0}

    def unscale_(self, optimizer):
        seen["steps"] += 1
        seen["scaler"], seen["optimizer"] = self, optimizer
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if isinstance(p.grad, DTensor)]
        sharded = [g for g in grads if g.device_mesh.ndim == 2 and isinstance(g.placements[1], Shard)]
        if seen["steps"] == 5 and rank == 1:
            sharded[0]._local_tensor.view(-1)[0] = float("inf")
        return unscale(self, optimizer)

    torch.amp.GradScaler.unscale_ = unscale_
    _train(rank, world, args)
    replicated = [p for g in seen["optimizer"].param_groups for p in g["params"] if p.device_mesh.ndim == 1]
    return seen["scaler"].get_scale(), sum(p._local_tensor.double().sum().item() for p in replicated)


def test_an_fp16_overflow_in_one_tensor_parallel_shard_skips_the_step_on_every_rank(dataset, tmp_path):
    # With decay_embeddings the first gradient GradScaler checked was the embedding's (fsdp2's 1-D dp
    # mesh, replicated over tp): torch's DTensor handler reduced the inf flag of every gradient over that
    # gradient's mesh alone, so the rank without the inf stepped (zero gradients after the clip, but
    # momentum and decay) and kept its scale: the tp ranks' embeddings and loss scales drifted apart.
    args = overrides(dataset, tmp_path / "run", B, "--parallel.data", "fsdp2", "--parallel.tensor", "2",
                     "--train.precision", "fp16", "--optim.decay_embeddings", "true")
    (scale0, sum0), (scale1, sum1) = run_ranks(_train_with_an_inf_in_one_shard, 2, tmp_path / "launch",
                                               args=(args,), timeout=240)
    assert scale0 == scale1 and sum0 == sum1, ((scale0, sum0), (scale1, sum1))
    assert records(tmp_path / "run", "skipped")[STEPS] == 1


def _ddp_buffers_body(rank: int, world: int) -> bool:
    from torch.distributed.device_mesh import init_device_mesh

    from fmcore.train import models, parallel
    from fmcore.train.config import load_config

    cfg = load_config("tiny", ["--model.arch", "llama", "--model.dim", "64", "--model.n_layers", "1",
                               "--model.n_heads", "4", "--model.max_seq_len", "32", "--train.seq_len", "32"])
    model = models.build_model(models.resolve(cfg.model, 64, torch.device("cpu")), seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ddp = parallel.apply_ddp(model, init_device_mesh("cpu", (world,), mesh_dim_names=("dp",)), torch.device("cpu"))
    # (torch 2.14 deprecated broadcast_buffers, with a FutureWarning from every rank of every ddp run)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    assert any(True for _ in model.buffers())  # RoPE's tables
    # DDP broadcast them from rank 0 before every forward (tables every rank computes alike), which
    # also split a compiled model's graph ("Dynamo does not know how to trace _broadcast_coalesced").
    return not ddp.will_sync_module_buffers()


def test_ddp_does_not_broadcast_the_rope_tables_each_step(tmp_path):
    assert all(run_ranks(_ddp_buffers_body, 2, tmp_path, timeout=60))


def test_llama_tensor_parallel_with_grouped_query_attention(dataset, tmp_path):
    # Llama's blocks split wqkv into parts of unequal size (4 query heads, 2 key and value heads each)
    # and w_gate_up into two: against one process, its checkpoint resumed without tensor parallelism,
    # and a zero1 checkpoint (flat buckets of the fused projections) resumed with it.
    llama = ["--model.arch", "llama", "--model.n_kv_heads", "2"]
    run(1, overrides(dataset, tmp_path / "one", B, *llama), tmp_path / "launch-one")
    run(2, overrides(dataset, tmp_path / "run", B, *llama, "--parallel.tensor", "2"), tmp_path / "launch")
    assert_losses_close(losses(tmp_path / "run"), losses(tmp_path / "one"), range(1, STEPS + 1))
    assert_exports_close(tmp_path / "run", tmp_path / "one")
    ckpt = resume_from(tmp_path / "run", tmp_path / "untensored")
    run(1, overrides(dataset, tmp_path / "untensored", B, *llama, "--checkpoint.resume", str(ckpt)),
        tmp_path / "launch-untensored")
    assert_losses_close(losses(tmp_path / "untensored"), losses(tmp_path / "run"), range(SAVE_AT + 1, STEPS + 1))
    # zero1 on 2 ranks of B/2 sequences reads the global batch a tensor-parallel pair reads
    run(2, overrides(dataset, tmp_path / "zero1", B // 2, *llama, "--parallel.data", "zero1"),
        tmp_path / "launch-zero1")
    ckpt = resume_from(tmp_path / "zero1", tmp_path / "from-zero1")
    run(2, overrides(dataset, tmp_path / "from-zero1", B, *llama, "--parallel.tensor", "2", "--checkpoint.resume",
                     str(ckpt)), tmp_path / "launch-from-zero1")
    assert_losses_close(losses(tmp_path / "from-zero1"), losses(tmp_path / "zero1"), range(SAVE_AT + 1, STEPS + 1))


def test_qwen_tensor_parallel_matches_one_process(dataset, tmp_path):
    # Qwen's attention on 2 tensor-parallel ranks: the q/k/v biases shard with their columns, the q/k norms
    # (replicated, over heads of 24: 4 * 24 != dim 64) normalise each rank's heads, their gradients summed
    # over the ranks (else each rank's replica stepped on its own heads' partial gradient: the exported norms
    # were rank 0's, off one process's by more than float noise). The export fuses the split biases back.
    # (fmcore's ops: the torch path's q/k norms differ only in the kernel, test_models compares them)
    qwen = ["--model.arch", "llama", "--model.n_kv_heads", "2", "--model.head_dim", "24", "--model.qkv_bias", "true",
            "--model.qk_norm", "true", "--train.steps", "6", "--checkpoint.every", "0"]
    run(1, overrides(dataset, tmp_path / "one", B, *qwen), tmp_path / "launch-one")
    run(2, overrides(dataset, tmp_path / "run", B, *qwen, "--parallel.tensor", "2"), tmp_path / "launch")
    assert_losses_close(losses(tmp_path / "run"), losses(tmp_path / "one"), range(1, 7))
    assert_exports_close(tmp_path / "run", tmp_path / "one")
    config = json.loads((tmp_path / "run" / "hf" / "config.json").read_text())
    assert (config["architectures"], config["head_dim"], config["attention_bias"]) == (["Qwen3ForCausalLM"], 24, True)


def test_the_global_norm_of_plain_gradients_clips_them_by_torchs_rule():
    # (no process group: plain gradients are replicated, nothing to reduce)
    from fmcore.train.parallel import SplitLinear, clip_grad_norm_

    a, b, unused = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
    assert clip_grad_norm_([a, b, unused], float("inf")).item() == 5.0
    assert a.grad.tolist() == [3.0, 0.0]  # an infinite max_norm clips nothing
    assert clip_grad_norm_([a, b], 1.0).item() == 5.0
    torch.testing.assert_close(torch.cat([a.grad, b.grad]), torch.tensor([0.6, 0.0, 0.0, 0.8]))
    assert clip_grad_norm_([unused], 1.0).item() == 0.0  # no gradient at all
    with pytest.raises(ValueError, match=r"parts \[2, 2\] do not add up to 5 outputs"):
        SplitLinear(torch.nn.Linear(3, 5), [2, 2])


@pytest.mark.parametrize("two_rank_run", [("zero1", "fmcore")], indirect=True, ids="-".join)
def test_async_checkpoints_on_two_ranks_equal_sync_ones(two_rank_run, dataset):
    # checkpoint.async_save: the writes and the rename in a background thread, its collectives on a gloo
    # group of their own beside training's; the same files (ZeroAdamW's DTensor buckets, each rank's
    # extra state) as a synchronous save's, and the same steps after a resume.
    from tests.train.test_async_checkpoint import assert_same, contents

    mode, ops, tmp = two_rank_run
    run(2, overrides(dataset, tmp / "async", B, *MODES[mode], *OPS[ops], "--checkpoint.async_save", "true"),
        tmp / "launch-async")
    assert losses(tmp / "async") == losses(tmp / "run")
    for step in (SAVE_AT, STEPS):
        a, b = (tmp / name / "checkpoints" / f"step_{step:08d}" for name in ("async", "run"))
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        assert_same(contents(a, tmp), contents(b, tmp), f"step {step}")
        for rank in range(2):
            extra_a, extra_b = (torch.load(d / f"extra_rank{rank}.pt", weights_only=False) for d in (a, b))
            for key in ("step", "tokens", "loader", "log_window", "zero1_buckets"):
                assert extra_a[key] == extra_b[key], (step, rank, key)
    ckpt = resume_from(tmp / "async", tmp / "async-resumed")
    run(2, overrides(dataset, tmp / "async-resumed", B, *MODES[mode], *OPS[ops], "--checkpoint.resume", str(ckpt),
                     "--checkpoint.async_save", "true"), tmp / "launch-async-resumed")
    want = losses(tmp / "run")
    assert losses(tmp / "async-resumed") == {s: want[s] for s in range(SAVE_AT + 1, STEPS + 1)}  # bitwise


def _fsdp2_bf16_autocast_step(rank: int, world: int, args: list[str], accum: int = 1) -> dict:
    """One training step (trainer.train_step, of accum micro-batches) of fsdp2 under bf16 autocast, built
    as the trainer builds it: what FSDP2 sent (each all-gather's and reduce-scatter's input dtype and
    size, and under hybrid sharding each all-reduce over the replicas), the dtypes each block saw in its
    forward (its parameters, and the residual stream entering it), whether every parameter held its
    gradient shard when the last micro-batch began, the dtypes of the sharded parameters, their
    gradients and AdamW's state after the step, and the parameters' placements and sizes."""
    import torch.distributed as dist

    from fmcore.train import trainer
    from fmcore.train.config import load_config
    from fmcore.train.parallel import forget_mesh, mesh

    env = trainer.Env(rank, world, rank, torch.device("cpu"))
    cfg = load_config("tiny", args)
    model, mcfg = trainer.build_model(cfg, 128, env, "bf16-autocast")
    dims = mesh(cfg, env.device).mesh_dim_names
    replicas = mesh(cfg, env.device)["dp_replicate"].get_group() if "dp_replicate" in dims else None
    optimizer = trainer.build_optimizer(model, cfg, trainer.optimizer_impl(cfg, mcfg), "bf16-autocast", env.device)
    sent, seen = [], []

    def spy(kind, collective):
        def call(*args, **kwargs):
            sent.append((kind, kwargs.get("input", args[1] if len(args) > 1 else None)))
            return collective(*args, **kwargs)
        return call

    for block in model.blocks:  # (runs after FSDP2's pre-forward hook, which all-gathers the block)
        block.register_forward_pre_hook(lambda block, args: seen.append(
            ({p.dtype for p in block.parameters()}, args[1].dtype if args[1] is not None else args[0].dtype)))
    # FSDP2's collectives (output, input, ...): torch 2.14's *_single, 2.11's all_gather_into_tensor and
    # reduce_scatter_tensor
    names = (("all_gather_single", "reduce_scatter_single") if hasattr(dist, "all_gather_single")
             else ("all_gather_into_tensor", "reduce_scatter_tensor"))
    real = [getattr(dist, name) for name in names]
    for name, kind, collective in zip(names, ("gather", "scatter"), real):
        setattr(dist, name, spy(kind, collective))
    all_reduce = dist.all_reduce

    def spy_replicas(tensor, *args, **kwargs):  # (the others: the global norm's and the loss's)
        if replicas is not None and kwargs.get("group") is replicas:
            sent.append(("replicas", tensor))
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = spy_replicas
    sharded_grads, grads = [], {}
    batches = iter(range(accum))

    def next_batch():
        micro = next(batches)
        sharded_grads.append(all(p.grad is not None for p in model.parameters()))
        x = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(accum * rank + micro))
        return x, x

    # (the gradients' dtypes as the step reads them: train_step zeroes them after it)
    optimizer.register_step_pre_hook(lambda *_: grads.update({id(p): p.grad.dtype for p in model.parameters()}))
    opts = trainer.StepOptions(trainer.optimizer_impl(cfg, mcfg), "bf16-autocast", env.device, 1.0, world,
                               global_norm=True)
    try:
        trainer.train_step(model, optimizer, next_batch, accum, opts)
    finally:
        for name, collective in zip(names, real):
            setattr(dist, name, collective)
        dist.all_reduce = all_reduce
    forget_mesh()
    root = sum(p.to_local().numel() for n, p in model.named_parameters() if not n.startswith("blocks."))
    return {"ops": model.ops, "sent": [(kind, t.dtype, t.numel()) for kind, t in sent], "seen": seen,
            "params": {p.dtype for p in model.parameters()}, "grads": set(grads.values()),
            "sharded_grads": sharded_grads,
            "state": {v.dtype for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()},
            "block_shards": sum(p.to_local().numel() for p in model.blocks.parameters()),
            "root_shards": root, "n_blocks": len(model.blocks), "mcfg": mcfg,
            "numel": sum(p.numel() for p in model.parameters()),  # (a DTensor's: the whole parameter's)
            "placements": {tuple(p.placements) for p in model.parameters()}}


@pytest.mark.parametrize("world, layout, accum", [(2, ["--parallel.data", "fsdp2"], 1),
                                                  (2, ["--parallel.data", "fsdp2", "--optim.impl", "torch"], 1),
                                                  (4, ["--parallel.data", "fsdp2", "--parallel.tensor", "2"], 1),
                                                  (2, ["--parallel.data", "fsdp2"], 2),
                                                  (4, ["--parallel.data", "fsdp2", "--parallel.replicate", "2"], 2)],
                         ids=["fused-adamw", "torch-adamw", "tensor2", "accumulation", "hybrid"])
def test_fsdp2_under_bf16_autocast_gathers_bf16_and_keeps_fp32_shards(world, layout, accum, tmp_path):
    from torch.distributed.tensor import Replicate, Shard

    from fmcore.train import models
    from fmcore.train.plan import Layout, comm_bytes_per_step

    # every layout here shards each parameter over 2 ranks: fsdp2 on 2, fsdp2 x tensor 2 on 4 (2 x 2),
    # and hybrid sharding on 4, 2 replicas of 2 (each gradient shard then all-reduced over the replicas)
    tp = 2 if "--parallel.tensor" in layout else 1
    replicate = 2 if "--parallel.replicate" in layout else 1
    planned = Layout("fsdp2", world // tp, tp, replicate)

    # FSDP2 without a MixedPrecisionPolicy all-gathered the fp32 parameters (which autocast then cast to
    # bf16 in each matmul), twice per step: 2x the bytes of bf16 all-gathers.
    args = ["--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "4", "--model.max_seq_len", "32",
            "--train.seq_len", "32", "--train.device", "cpu", *layout]
    for got in run_ranks(_fsdp2_bf16_autocast_step, world, tmp_path, args=(args, accum), timeout=120):
        assert got["ops"] == "fmcore"
        L, sent = got["n_blocks"], got["sent"]
        gathers = [(dtype, n) for kind, dtype, n in sent if kind == "gather"]
        # per micro-batch, each block gathered in bf16 before its forward and again before its backward, the
        # root once in fp32
        assert Counter(d for d, _ in gathers) == {torch.bfloat16: 2 * L * accum, torch.float32: accum}, gathers
        # what this rank sends: its shards of the blocks (2 bytes, twice) and of the root (4 bytes, once)
        # (the shapes divide by the 2 data-parallel ranks: no padding)
        assert sum(n for d, n in gathers if d == torch.bfloat16) == 2 * got["block_shards"] * accum
        assert sum(n for d, n in gathers if d == torch.float32) == got["root_shards"] * accum
        # fp32 gradients, reduce-scattered after every micro-batch: each rank accumulates its shards, never
        # the whole model's gradients (FSDP2 without gradient sync keeps those until the last micro-batch)
        assert [d for kind, d, _ in sent if kind == "scatter"] == [torch.float32] * (L + 1) * accum
        assert got["sharded_grads"] == [False] + [True] * (accum - 1)
        # hybrid: each rank's fp32 gradient shards all-reduced over the replicas, after every micro-batch
        replicas = [(d, n) for kind, d, n in sent if kind == "replicas"]
        if replicate > 1:
            assert [d for d, _ in replicas] == [torch.float32] * (L + 1) * accum, replicas
            assert sum(n for _, n in replicas) == (got["block_shards"] + got["root_shards"]) * accum
            assert got["placements"] == {(Replicate(), Shard(0))}
        else:
            assert replicas == []
        if tp == 1:  # (each rank holds half of every parameter)
            assert 2 * (got["block_shards"] + got["root_shards"]) == got["numel"]
        # plan-memory's bytes per step: over 2 ranks a ring all-gather sends its input, a reduce-scatter
        # half of it, an all-reduce (over 2 replicas) its input
        ring = sum(n * d.itemsize * (0.5 if kind == "scatter" else 1) for kind, d, n in sent)
        m = got["mcfg"]
        assert ring == comm_bytes_per_step(models.param_count(m), planned, precision="bf16-autocast", mcfg=m,
                                           accum=accum)["data"]
        # the blocks computed with bf16 parameters on the fp32 residual stream (FSDP2's default casts
        # the block's floating-point inputs too)
        assert got["seen"] == [({torch.bfloat16}, torch.float32)] * L * accum, got["seen"]
        assert got["params"] == got["grads"] == got["state"] == {torch.float32}


def test_fsdp2_under_bf16_autocast_matches_one_process_and_swaps_checkpoints_with_it(dataset, tmp_path):
    # bf16 all-gathers change what the blocks' norms compute with (bf16-rounded weights) and round all
    # block gradients to bf16 before the fp32 reduction (the matmuls' already were, under autocast):
    # not bitwise one process's. At this size the losses moved by about 1e-4 absolute (2e-5 relative),
    # within the fp32 layouts' tolerance (RTOL: reductions in another order, which Adam's first steps
    # amplify). The exported weights moved by up to 4e-4 (5e-4 here, 2e-4 for the fp32 layouts; the
    # weights are ~0.1) but for the key bias, whose gradient is zero but for rounding (it adds the same
    # q.b_k to every score of a query), which Adam turns into steps of the learning rate's size in
    # directions the rounding picks (it moved by its own size). The checkpoints hold the fp32 shards
    # either way: one written under the policy resumes in one process without it, one process's under it.
    from safetensors.torch import load_file

    bf16 = ["--train.precision", "bf16-autocast"]
    run(1, overrides(dataset, tmp_path / "one", 2 * B, *bf16), tmp_path / "launch-one")
    run(2, overrides(dataset, tmp_path / "run", B, *MODES["fsdp2"], *bf16), tmp_path / "launch")
    assert_losses_close(losses(tmp_path / "run"), losses(tmp_path / "one"), range(1, STEPS + 1))
    got, want = (load_file(tmp_path / name / "hf" / "model.safetensors") for name in ("run", "one"))
    assert got.keys() == want.keys() and {t.dtype for t in got.values()} == {torch.float32}
    for name in want:
        g, w = got[name], want[name]
        if name.endswith("attn.c_attn.bias"):  # (q, k, v: the query's and value's parts)
            g, w = g.view(3, -1)[[0, 2]], w.view(3, -1)[[0, 2]]
        torch.testing.assert_close(g, w, rtol=0, atol=5e-4, msg=name)
    ckpt = resume_from(tmp_path / "run", tmp_path / "unsharded")
    run(1, overrides(dataset, tmp_path / "unsharded", 2 * B, *bf16, "--checkpoint.resume", str(ckpt)),
        tmp_path / "launch-unsharded")
    assert_losses_close(losses(tmp_path / "unsharded"), losses(tmp_path / "run"), range(SAVE_AT + 1, STEPS + 1))
    ckpt = resume_from(tmp_path / "one", tmp_path / "sharded")
    run(2, overrides(dataset, tmp_path / "sharded", B, *MODES["fsdp2"], *bf16, "--checkpoint.resume", str(ckpt)),
        tmp_path / "launch-sharded")
    assert_losses_close(losses(tmp_path / "sharded"), losses(tmp_path / "one"), range(SAVE_AT + 1, STEPS + 1))
    # with selective checkpointing and each block compiled (FSDP2's hooks and casts around the graphs)
    run(2, overrides(dataset, tmp_path / "compiled", B, *MODES["fsdp2"], *bf16, "--train.activation_checkpointing",
                     "selective", "--train.compile", "blocks"), tmp_path / "launch-compiled")
    assert_losses_close(losses(tmp_path / "compiled"), losses(tmp_path / "one"), range(1, STEPS + 1))
    # `fmcore export` of its final checkpoint in this process: the fp32 weights its run exported
    from fmcore.__main__ import main

    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "exported")]) == 0
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    assert exported.keys() == got.keys() and all(torch.equal(exported[k], got[k]) for k in got)
