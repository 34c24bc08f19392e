"""train.compile "blocks": each transformer block compiled on its own (the trainer's compile_model) trains
as eager does, with activation checkpointing inside each block's graph (selective's policy followed
there), and dynamo compiles one graph for all the blocks, however many; the config's values, old bools
included, and bad ones naming the key."""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
from torch._dynamo.backends.common import aot_autograd

from fmcore.train import models
from fmcore.train.config import ConfigError, ModelConfig, help_text, load_config, to_toml, validate
from fmcore.train.trainer import compile_model
from tests.util import COMPILE_RECOMPUTES_ATTENTION

GPT = ModelConfig(arch="gpt2", dim=64, n_layers=2, n_heads=4, max_seq_len=64)
LLAMA = ModelConfig(arch="llama", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, tie_embeddings=False)
V = 128


def build(base: ModelConfig, checkpointing: str = "none", n_layers: int | None = None,
          ops: str = "fmcore") -> models.CausalLM:
    cfg = dataclasses.replace(base, ops=ops, n_layers=n_layers or base.n_layers)
    model = models.build_model(models.resolve(cfg, vocab_size=V), seed=0)
    model.activation_checkpointing = checkpointing
    return model


def batches(n: int, B: int = 2, S: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randint(0, V, (B, S), generator=gen), torch.randint(0, V, (B, S), generator=gen)) for _ in range(n)]


def train_losses(model: models.CausalLM, steps: int = 3) -> list[torch.Tensor]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for x, y in batches(steps):
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


class GraphRecorder:
    """An aot_autograd backend keeping the forward and backward graphs it is given (run as they are)."""

    def __init__(self):
        self.forward, self.backward = [], []
        self.backend = aot_autograd(fw_compiler=self._keep(self.forward), bw_compiler=self._keep(self.backward),
                                    partition_fn=min_cut_rematerialization_partition)

    @staticmethod
    def _keep(into: list):
        def compiler(gm, _inputs):
            into.append(gm)
            return make_boxed_func(gm)
        return compiler


def targets(gm) -> collections.Counter:
    return collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("base, checkpointing", [
    (GPT, "none"), (GPT, "full"), (GPT, "selective"), (LLAMA, "none"), (LLAMA, "full"), (LLAMA, "selective"),
], ids=["gpt2", "gpt2-full", "gpt2-selective", "llama", "llama-full", "llama-selective"])
def test_compiled_blocks_train_as_eager(base, checkpointing, monkeypatch):
    # aot_eager: dynamo's capture, the checkpoint in it and autograd's partition, run op by op (the
    # inductor test below lowers one of them; each costs ~10 s cold on 2 cores).
    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: real_compile(self, backend="aot_eager"))
    torch._dynamo.reset()
    want = train_losses(build(base, checkpointing))
    model = build(base, checkpointing)
    compile_model(model, model, "blocks")
    got = train_losses(model)
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-5, atol=1e-6)


def test_compiled_blocks_with_inductor_train_as_eager():
    torch._dynamo.reset()
    want = train_losses(build(LLAMA, "selective"))
    model = build(LLAMA, "selective")
    compile_model(model, model, "blocks")
    got = train_losses(model)
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ops, graphs", [("fmcore", 2), ("torch", 1)])
def test_one_graph_for_every_block_whatever_the_depth(ops, graphs):
    # fmcore's first block gets no residual (None), the others the stream: two graphs on that path.
    compiled = {}
    for n_layers in (2, 4):
        torch._dynamo.reset()
        recorder = GraphRecorder()
        model = build(GPT, "none", n_layers, ops)
        for block in model.blocks:
            block.compile(backend=recorder.backend)
        x, y = batches(1)[0]
        model(x, y).backward()
        compiled[n_layers] = (len(recorder.forward), len(recorder.backward))
    assert compiled[2] == compiled[4] == (graphs, graphs)


@pytest.mark.parametrize("checkpointing", ["selective", "full"])
def test_checkpointing_is_inside_each_blocks_graph(checkpointing):
    """The backward graph of a compiled block recomputes what the mode says: the norms (selective), the
    attention forward too (full). An eager checkpoint around the compiled block instead saw inductor's
    out= matmuls, not the ops selective's policy names, and recomputed them."""
    fm = torch.ops.fmcore
    torch._dynamo.reset()
    recorder = GraphRecorder()
    model = build(GPT, checkpointing)
    for block in model.blocks:
        block.compile(backend=recorder.backend)
    x, y = batches(1)[0]
    model(x, y).backward()
    assert recorder.backward  # (the first block's graph and the second's, see above)
    for graph in recorder.backward:
        ops = targets(graph)
        assert ops[fm.add_norm_fwd.default] == 2, checkpointing
        assert ops[fm.flash_attn_fwd.default] == int(checkpointing == "full" and COMPILE_RECOMPUTES_ATTENTION), \
            checkpointing


# ---- the config

@pytest.mark.parametrize("value, mode", [
    ("true", "blocks"), ("false", "none"), ("yes", "blocks"), ("0", "none"), ("1", "blocks"),  # a bool's spellings
    ("none", "none"), ("model", "model"), ("blocks", "blocks"), ("Blocks", "blocks"),
])
def test_command_line_values(value, mode):
    assert load_config("tiny", ["--train.compile", value]).train.compile == mode


@pytest.mark.parametrize("toml, mode", [("true", "blocks"), ("false", "none"), ('"model"', "model"),
                                        ('"blocks"', "blocks")])
def test_toml_values_and_round_trip(tmp_path, toml, mode):
    path = tmp_path / "c.toml"
    path.write_text(f"[train]\ncompile = {toml}\n")
    cfg = load_config(str(path))
    assert cfg.train.compile == mode
    (tmp_path / "again.toml").write_text(to_toml(cfg))
    assert load_config(str(tmp_path / "again.toml")).train.compile == mode


@pytest.mark.parametrize("value", ["maybe", "", "2", "block", "model,blocks"])
def test_bad_values_name_the_key(value):
    with pytest.raises(ConfigError, match="train.compile: expected one of 'none', 'model', 'blocks', true or false"):
        load_config("tiny", [f"--train.compile={value}"])


def test_bad_toml_and_python_values_name_the_key(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\ncompile = 1\n")
    with pytest.raises(ConfigError, match="c.toml: train.compile: expected"):
        load_config(str(path))
    cfg = load_config("tiny")
    cfg.train.compile = "fast"  # set from Python, past the parser
    with pytest.raises(ConfigError, match="train.compile: expected"):
        validate(cfg)
    cfg.train.compile = True  # the bool it was: taken
    validate(cfg)


def test_help_lists_the_modes():
    text = help_text()
    assert "--train.compile (str, default 'none')" in text
    line = text[text.index("--train.compile"):].splitlines()[1]
    assert all(word in line for word in ('"none"', '"model"', '"blocks"', "true and false"))
