"""The trainer builds the model on the meta device, lays it out there, and each rank then allocates and
fills its own shards (fmcore.train.models.materialize). On 4 CPU ranks (gloo): every layout starts from
the weights one process starts from, bit for bit (train.seed's draws and model.init_from's checkpoint,
through tensor parallelism's split projections and fsdp2's strided shards of them), and building an
fsdp2 model never holds the whole model on a rank (the old build drew it whole on every rank, then
sharded it: a model that fits 64 GPUs sharded did not fit one GPU's start)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.launch import run_ranks

SMALL = ["--model.arch", "llama", "--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "4",
         "--model.n_kv_heads", "2", "--model.max_seq_len", "32", "--train.seq_len", "32", "--train.device", "cpu"]
# (world size, arguments)
LAYOUTS = {"none": (1, []), "tensor2": (2, ["--parallel.tensor", "2"]),
           "ddp": (4, ["--parallel.data", "ddp"]), "zero1": (4, ["--parallel.data", "zero1"]),
           "fsdp2": (4, ["--parallel.data", "fsdp2"]),
           "fsdp2-tensor2": (4, ["--parallel.data", "fsdp2", "--parallel.tensor", "2"]),
           "hsdp": (4, ["--parallel.data", "fsdp2", "--parallel.replicate", "2"])}


def _whole_weights(rank: int, world: int, args: list[str], precision: str) -> tuple[dict, dict]:
    """({layout: the full state dict (fused projections whole again) the trainer's build starts from} on
    rank 0, {layout: the normal values this rank drew}) for every layout of LAYOUTS that world ranks
    hold. The draws come in chunks of 256 values, so that a rank draws only part of a sharded matrix."""
    from fmcore.train import trainer
    from fmcore.train.config import load_config
    from fmcore.train.export import _fuse_split_linears
    from fmcore.train.models import base
    from fmcore.train.parallel import forget_mesh, full_state_dicts

    base.CHUNK_VALUES = 256  # (this forked rank's own module)
    draw_rows, drawn = base._draw_rows, []

    def counted(rows, *a):
        drawn.append(rows.numel())  # (list.append is atomic: the chunks are drawn on several threads)
        draw_rows(rows, *a)

    base._draw_rows = counted
    env = trainer.Env(rank, world, rank, torch.device("cpu"))
    out, draws = {}, {}
    for layout, (ranks, extra) in LAYOUTS.items():
        if ranks != world:
            continue
        drawn.clear()
        cfg = load_config("tiny", [*args, *extra])
        model, _ = trainer.build_model(cfg, 128, env, precision)
        draws[layout] = sum(drawn)
        sd = full_state_dicts(model)[0] if world > 1 else {k: v.clone() for k, v in model.state_dict().items()}
        if rank == 0:
            out[layout] = _fuse_split_linears({k.removeprefix("module."): v for k, v in sd.items()})
        forget_mesh()
    return out, draws


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_layout_starts_from_the_one_process_weights(precision, tmp_path):
    args = [*SMALL, "--train.seed", "5"]
    (whole, one_draws), = run_ranks(_whole_weights, 1, tmp_path / "one", args=(args, precision))
    one, all_values = whole["none"], one_draws["none"]
    assert {p.dtype for p in one.values()} == {torch.float32 if precision == "fp32" else torch.bfloat16}
    assert all_values == sum(v.numel() for v in one.values() if v.dim() == 2)
    for world in (2, 4):
        ranks = run_ranks(_whole_weights, world, tmp_path / f"{world}", args=(args, precision))
        for layout, sd in ranks[0][0].items():
            assert sd.keys() == one.keys(), layout
            for name, value in one.items():
                assert torch.equal(sd[name], value), (layout, name)
        # each rank drew the rows its shards hold: fsdp2's quarter of every matrix (rounded up to whole
        # chunks), HSDP's half; tensor parallelism's rows of wqkv and w_gate_up, all of wo's and w_down's
        # (it shards their columns); the layouts with whole copies drew everything
        for layout, share in {"fsdp2": 0.3, "fsdp2-tensor2": 0.4, "hsdp": 0.55, "tensor2": 0.8,
                              "ddp": 1.0, "zero1": 1.0}.items():
            for _, draws in ranks:
                if layout in draws:
                    assert draws[layout] <= share * all_values, (layout, draws[layout], all_values)
                    assert share < 1 or draws[layout] == all_values, layout
    # train.seed chooses them; the residual projections' smaller std and unit norms are drawn as documented
    other = run_ranks(_whole_weights, 1, tmp_path / "other", args=([*SMALL, "--train.seed", "6"], precision))[0][0]
    assert not torch.equal(other["none"]["tok_embeddings.weight"], one["tok_embeddings.weight"])
    assert torch.equal(one["blocks.0.attn_norm.weight"], torch.ones(64, dtype=one["blocks.0.attn_norm.weight"].dtype))
    std = {k: one[k].float().std().item() for k in ("blocks.0.wqkv.weight", "blocks.0.wo.weight")}
    assert std["blocks.0.wqkv.weight"] == pytest.approx(0.02, rel=0.05)
    assert std["blocks.0.wo.weight"] == pytest.approx(0.02 / 2, rel=0.1)  # 0.02 / sqrt(2 * 2 layers)


def test_every_layout_starts_from_the_init_from_checkpoint(tmp_path):
    from tests.train.test_init_from import hf_checkpoint

    # Qwen2's q/k/v biases: the fused wqkv bias is split and sharded with its weight
    hf = hf_checkpoint(tmp_path / "hf", "qwen2-gqa").state_dict()
    args = ["--model.init_from", str(tmp_path / "hf"), "--train.seq_len", "32", "--train.device", "cpu"]
    one = run_ranks(_whole_weights, 1, tmp_path / "one", args=(args, "fp32"))[0][0]["none"]
    assert torch.equal(one["tok_embeddings.weight"], hf["model.embed_tokens.weight"])
    for world in (2, 4):
        for layout, sd in run_ranks(_whole_weights, world, tmp_path / f"{world}", args=(args, "fp32"))[0][0].items():
            for name, value in one.items():
                assert torch.equal(sd[name], value), (layout, name)


def _build_peak(rank: int, world: int, data: str) -> tuple[int, int]:
    """(the peak bytes of the tensors trainer.build_model allocates on this rank, the whole model's bytes)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from fmcore.train import models, trainer
    from fmcore.train.config import load_config
    from fmcore.train.parallel import forget_mesh

    env = trainer.Env(rank, world, rank, torch.device("cpu"))
    cfg = load_config("tiny", [*SMALL, "--model.n_layers", "8", "--model.dim", "128", "--parallel.data", data])
    with MemTracker() as tracker:
        model, mcfg = trainer.build_model(cfg, 128, env, "fp32")
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    forget_mesh()
    return peak, models.param_count(mcfg) * 4


def test_an_fsdp2_build_never_holds_the_whole_model(tmp_path):
    pytest.importorskip("torch.distributed._tools.mem_tracker", reason="torch's MemTracker (a private tool)")
    for peak, whole in run_ranks(_build_peak, 4, tmp_path / "fsdp2", args=("fsdp2",)):
        # a quarter of the model, and the parameter being filled drawn whole on the CPU (the largest,
        # a block's w_gate_up, is 7% of this model)
        assert peak < 0.5 * whole, (peak, whole)
    for peak, whole in run_ranks(_build_peak, 2, tmp_path / "ddp", args=("ddp",)):
        assert peak >= whole  # (ddp keeps a whole copy on every rank: the tracker sees it)
