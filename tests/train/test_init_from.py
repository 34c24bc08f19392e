"""model.init_from: tiny GPT2LMHeadModel / LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM /
Qwen3ForCausalLM checkpoints written by transformers load into
fmcore's models with HF's logits (float64), export -> init_from round-trips every weight, what fmcore
cannot represent is refused by name, and `fmcore train --model.init_from` starts from HF's loss, on one
process and on two fsdp2 ranks."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fmcore.train import models
from fmcore.train.config import Config, ConfigError, ModelConfig, load_config
from fmcore.train.export import export_hf
from fmcore.train.init_from import configure, load_weights
from fmcore.train.metrics import read_metrics
from tests.distributed.launch import run_ranks

transformers = pytest.importorskip("transformers")

# Llama 3.1's scaling with original_max_position_embeddings 64 at head dim 16: wavelengths 6.3 (kept: < 64/4),
# 20 and 63 (blended) and longer (stretched), so each of its three regimes is exercised.
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CASES = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=200, n_embd=64, n_layer=2, n_head=4, n_positions=64),
    # GQA (6 query heads over 2 kv heads, head dim 16), untied head, Llama 3's rope_theta
    "llama-gqa": lambda: transformers.LlamaConfig(
        vocab_size=200, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "llama-tied-llama3": lambda: transformers.LlamaConfig(
        vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True, rope_parameters=LLAMA3),
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=None),
    # Qwen2's q/k/v biases: GQA (4 query heads over 2 kv heads), untied, Qwen2.5's rope_theta; and tied (Qwen2.5's
    # small sizes tie their head), one layer
    "qwen2-gqa": lambda: transformers.Qwen2Config(
        vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen2-tied": lambda: transformers.Qwen2Config(
        vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True),
    # Qwen3's q/k norms and heads of 24 (4 * 24 = 96 features, hidden 64: head_dim != hidden / heads)
    "qwen3": lambda: transformers.Qwen3Config(
        vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, max_position_embeddings=128, tie_word_embeddings=True),
}


def hf_checkpoint(path: Path, case: str, sharded: bool = False, seed: int = 0, **changes):
    """A random HF model of CASES[case] saved to path (in 4 KB shards when sharded); returns the model.
    Every weight is perturbed (biases and norm weights too) so a dropped or misplaced tensor shows."""
    config = CASES[case]()
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, **({"max_shard_size": "4KB"} if sharded else {}))
    return model


def fmcore_model(path: Path, ops: str = "torch", dtype=torch.float64):
    cfg = Config()
    cfg.model.init_from, cfg.model.ops = str(path), ops
    mcfg = models.resolve(configure(cfg).model)
    model = models.build_model(mcfg, seed=1)
    load_weights(model, mcfg, path)
    return model.to(dtype).eval(), mcfg


@pytest.mark.parametrize("ops", ["torch", "fmcore"])
@pytest.mark.parametrize("case,sharded", [("gpt2", False), ("gpt2", True), ("llama-gqa", False),
                                          ("llama-gqa", True), ("llama-tied-llama3", False), ("mistral", False),
                                          ("qwen2-gqa", False), ("qwen2-tied", False), ("qwen3", False)])
def test_logits_match_transformers_in_float64(tmp_path, case, sharded, ops):
    hf = hf_checkpoint(tmp_path, case, sharded).double()
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded
    ours, _ = fmcore_model(tmp_path, ops)
    x = torch.randint(0, 200, (2, 37))  # 37: not a power of two
    with torch.no_grad():
        got, want = ours(x).double(), hf(x).logits
    # fmcore's forward returns fp32 logits (computed here in float64): GPT-2 agrees to their rounding, one fp32
    # ulp. transformers' Llama, Mistral and Qwen compute RMSNorm (Qwen3's q/k norms too) and RoPE's angles in fp32
    # whatever the model's dtype:
    # up to 1.2e-6 of logits of size ~1 (measured; the same with either alone made float64). A misplaced weight
    # differs by the logits' size.
    tol = {"rtol": 2**-23, "atol": 1e-12} if case == "gpt2" else {"rtol": 4e-6, "atol": 4e-6}
    torch.testing.assert_close(got, want, **tol)
    assert want.abs().mean() > 0.1  # (logits of a real size: the tolerance means something)


def test_llama3_rope_frequencies_are_transformers(tmp_path):
    from fmcore.train.models.common import llama3_inv_freq

    hf = hf_checkpoint(tmp_path, "llama-tied-llama3")
    _, mcfg = fmcore_model(tmp_path)
    ours = llama3_inv_freq(mcfg.dim // mcfg.n_heads, mcfg.rope_base, mcfg.rope_scale_factor,
                           mcfg.rope_low_freq_factor, mcfg.rope_high_freq_factor, mcfg.rope_original_max_len)
    theirs = hf.model.rotary_emb.inv_freq.double()  # computed in fp32
    plain = 1.0 / mcfg.rope_base ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    assert (ours == plain).sum() == 1 and (ours == plain / 8).sum() == 5  # kept, blended twice, stretched
    torch.testing.assert_close(ours, theirs, rtol=2**-22, atol=0)


def perturbed(cfg: ModelConfig, seed: int = 3):
    model = models.build_model(models.resolve(cfg, vocab_size=200), seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("cfg", [
    ModelConfig(arch="gpt2", dim=64, n_layers=2, n_heads=4, max_seq_len=64, ops="torch"),
    ModelConfig(arch="gpt2", dim=64, n_layers=2, n_heads=4, max_seq_len=64, ops="torch", tie_embeddings=False),
    ModelConfig(arch="llama", dim=96, n_layers=2, n_heads=6, n_kv_heads=2, max_seq_len=64, ops="torch",
                tie_embeddings=False, rope_base=500000.0, norm_eps=1e-6),
    ModelConfig(arch="llama", dim=64, n_layers=2, n_heads=4, max_seq_len=256, ops="torch", rope_scaling="llama3",
                rope_scale_factor=32.0, rope_original_max_len=64),
    ModelConfig(arch="llama", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, ops="torch",
                tie_embeddings=False, qkv_bias=True, rope_base=1000000.0),
    ModelConfig(arch="llama", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=24, max_seq_len=64, ops="torch",
                qk_norm=True),
    # Qwen3 with attention_bias: its o_proj bias, which fmcore's model lacks, written as zeros and read back
    ModelConfig(arch="llama", dim=64, n_layers=2, n_heads=4, head_dim=8, max_seq_len=64, ops="torch", qk_norm=True,
                qkv_bias=True),
    # a sliding window: Mistral, and Qwen2 with it in every layer
    ModelConfig(arch="llama", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, ops="torch",
                sliding_window=5),
    ModelConfig(arch="llama", dim=64, n_layers=2, n_heads=4, max_seq_len=64, ops="torch", qkv_bias=True,
                sliding_window=7),
], ids=["gpt2", "gpt2-untied", "llama-gqa", "llama-tied-llama3", "qwen2-untied", "qwen3", "qwen3-bias", "mistral-window",
        "qwen2-window"])
def test_export_then_init_from_gives_the_same_model(tmp_path, cfg):
    mcfg = models.resolve(cfg, vocab_size=200)
    model = perturbed(mcfg)
    export_hf(model, mcfg, tmp_path)
    back, back_cfg = fmcore_model(tmp_path, dtype=torch.float32)
    same = {"ops", "init_std", "init_from"}
    assert dataclasses.replace(back_cfg, **{f: getattr(mcfg, f) for f in same}) == mcfg
    want, got = model.state_dict(), back.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_a_model_without_biases_comes_back_with_zero_biases(tmp_path):
    # HF's GPT-2 always has biases: the export writes zeros, which come back as a model with biases, the same function.
    mcfg = models.resolve(ModelConfig(arch="gpt2", dim=64, n_layers=1, n_heads=4, max_seq_len=64, ops="torch",
                                      bias=False), vocab_size=200)
    model = perturbed(mcfg).double()
    export_hf(model, mcfg, tmp_path)
    back, back_cfg = fmcore_model(tmp_path)
    assert back_cfg.bias and all(not p.any() for n, p in back.named_parameters() if n.endswith("bias"))
    x = torch.randint(0, 200, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=1e-12, atol=1e-12)


def edit_config(path: Path, **changes) -> None:
    file = path / "config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


@pytest.mark.parametrize("case,changes,match", [
    ("qwen3", {"architectures": ["Qwen3MoeForCausalLM"]},
     r"architectures \[\"Qwen3MoeForCausalLM\"\] is not supported"),
    ("qwen2-gqa", {"architectures": ["Qwen2MoeForCausalLM"]}, r"\[\"Qwen2MoeForCausalLM\"\] is not supported"),
    ("gpt2", {"architectures": ["GPT2Model"]}, "GPT2Model"),
    ("llama-gqa", {"head_dim": 15}, r"head_dim = 15 .*needs an even head dim, got 15"),
    # a head_dim is the model's, and must be the weights' too: q_proj holds 6 heads of 16
    ("llama-gqa", {"head_dim": 32}, r"q_proj.weight has shape \(96, 96\), expected \(192, 96\)"),
    ("llama-gqa", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     "rope_parameters .*rope_type 'yarn'"),
    ("llama-gqa", {"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     "rope_scaling .*rope_type 'dynamic'"),
    ("llama-tied-llama3", {"rope_parameters": {**LLAMA3, "factor": "8"}},
     r"rope_type 'llama3' needs positive numbers, got factor = \"8\""),
    # attention_bias: biases on q, k, v (and o_proj), which this checkpoint does not hold
    ("llama-gqa", {"attention_bias": True}, "missing tensors model.layers.0.self_attn.q_proj.bias"),
    ("llama-gqa", {"mlp_bias": True}, "mlp_bias = true"),
    ("llama-gqa", {"hidden_act": "gelu"}, 'hidden_act = "gelu" .*silu'),
    ("gpt2", {"activation_function": "relu"}, 'activation_function = "relu"'),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx = true"),
    # Qwen's window applies with use_sliding_window, to the layers from max_window_layers on (or layer_types'):
    # fmcore's model has one window for all of its layers
    ("qwen2-gqa", {"use_sliding_window": True, "sliding_window": 32, "max_window_layers": 1, "layer_types": None},
     r"use_sliding_window = true .*layers 1 attend within a sliding_window of 32 .*one window for all layers"),
    ("mistral", {"sliding_window": 0}, r"sliding_window = 0 .*expected a positive number"),
    ("llama-gqa", {"num_attention_heads": None}, "expected positive numbers, got num_attention_heads = null"),
])
def test_what_fmcore_cannot_represent_is_refused_by_its_key(tmp_path, case, changes, match):
    hf_checkpoint(tmp_path, case)
    edit_config(tmp_path, **changes)
    with pytest.raises(ConfigError, match=match):
        fmcore_model(tmp_path)


@pytest.mark.parametrize("changes", [
    {"sliding_window": 32},  # (use_sliding_window false: no layer slides)
    {"use_sliding_window": True, "sliding_window": 32, "max_window_layers": 1, "layer_types": None},  # from layer 1
    {"use_sliding_window": True, "sliding_window": 32},  # layer_types (as saved) names no sliding layer
], ids=["off", "from-layer-1", "layer-types"])
def test_a_qwen_window_no_layer_applies_is_no_refusal(tmp_path, changes):
    # transformers, reading the same config.json, gives fmcore's logits: it slides no layer either.
    hf_checkpoint(tmp_path, "qwen2-tied")
    edit_config(tmp_path, **changes)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    ours, _ = fmcore_model(tmp_path)
    x = torch.randint(0, 200, (1, 100))  # longer than the window
    with torch.no_grad():
        torch.testing.assert_close(ours(x).double(), hf(x).logits, rtol=4e-6, atol=4e-6)


@pytest.mark.parametrize("ops", ["torch", "fmcore"])
@pytest.mark.parametrize("case,changes", [
    ("mistral", {"sliding_window": 5}),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 6, "layer_types": ["sliding_attention"] * 2}),
    ("qwen2-gqa", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0, "layer_types": None}),
], ids=["mistral", "qwen3-layer-types", "qwen2-max-window-layers"])
def test_a_window_every_layer_applies_is_model_sliding_window(tmp_path, case, changes, ops):
    # Sequences longer than the window: a model attending to every earlier token differs by the logits' size.
    hf_checkpoint(tmp_path, case)
    edit_config(tmp_path, **changes)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    ours, mcfg = fmcore_model(tmp_path, ops)
    assert mcfg.sliding_window == changes["sliding_window"]
    x = torch.randint(0, 200, (2, 37))
    with torch.no_grad():
        got, want = ours(x).double(), hf(x).logits
    torch.testing.assert_close(got, want, rtol=4e-6, atol=4e-6)
    # (the same weights without the window: other logits)
    edit_config(tmp_path, sliding_window=None, **({} if case == "mistral" else
                                                  {"use_sliding_window": False, "layer_types": ["full_attention"] * 2}))
    unwindowed = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    with torch.no_grad():
        assert (unwindowed(x).logits - want).abs().max() > 1e-2


def test_a_qwen3_config_without_head_dim_has_transformers_default(tmp_path):
    from fmcore.train.init_from import model_shape

    config = CASES["qwen3"]().to_dict()
    del config["head_dim"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert model_shape(tmp_path)["head_dim"] == 128 == transformers.Qwen3Config(**config).head_dim


def test_an_o_proj_bias_loads_only_when_zero(tmp_path):
    # A Qwen3 with attention_bias (as export.py writes a model.qkv_bias + qk_norm model) has an o_proj bias,
    # which fmcore's model lacks: the same function only where it is zero.
    hf_checkpoint(tmp_path, "qwen3", attention_bias=True)
    with pytest.raises(ConfigError, match=r"tensor model.layers.0.self_attn.o_proj.bias is not zero: fmcore's llama "
                                          "has biases on q, k and v only"):
        fmcore_model(tmp_path)
    rewrite_weights(tmp_path, lambda t: t.update({k: torch.zeros_like(v) for k, v in t.items()
                                                  if k.endswith("o_proj.bias")}))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    ours, mcfg = fmcore_model(tmp_path)
    assert mcfg.qkv_bias and mcfg.qk_norm and mcfg.head_dim == 24
    x = torch.randint(0, 200, (2, 37))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).double(), hf(x).logits, rtol=4e-6, atol=4e-6)


def rewrite_weights(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path):
    hf_checkpoint(tmp_path, "llama-gqa")
    k = "model.layers.1.self_attn.k_proj.weight"
    rewrite_weights(tmp_path, lambda t: t.pop(k))
    with pytest.raises(ConfigError, match=f"missing tensors {k}$"):
        fmcore_model(tmp_path)
    rewrite_weights(tmp_path, lambda t: t.update({k: torch.zeros(16, 96),
                                                  "model.layers.1.extra.weight": torch.ones(2)}))
    with pytest.raises(ConfigError, match="unexpected tensors model.layers.1.extra.weight"):
        fmcore_model(tmp_path)
    rewrite_weights(tmp_path, lambda t: t.pop("model.layers.1.extra.weight"))
    with pytest.raises(ConfigError, match=rf"tensor {k} has shape \(16, 96\), expected \(32, 96\)"):
        fmcore_model(tmp_path)
    # HF's buffers, saved by older transformers, are no weights: ignored.
    rewrite_weights(tmp_path, lambda t: t.update({k: torch.zeros(32, 96),
                                                  "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    fmcore_model(tmp_path)


def test_a_base_model_checkpoint_loads_as_transformers_loads_it(tmp_path):
    # openai-community/gpt2's model.safetensors names its tensors as GPT2Model does ("h.0.attn.c_attn.weight", no
    # "transformer.") and holds the causal-mask buffers ("h.0.attn.bias") of the transformers it was saved by.
    hf = hf_checkpoint(tmp_path, "gpt2").double()
    rewrite_weights(tmp_path, lambda t: t.update({k.removeprefix("transformer."): t.pop(k) for k in list(t)}
                                                 | {f"h.{i}.attn.bias": torch.ones(1, 1, 64, 64) for i in range(2)}))
    ours, _ = fmcore_model(tmp_path)
    x = torch.randint(0, 200, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).double(), hf(x).logits, rtol=2**-23, atol=1e-12)
    rewrite_weights(tmp_path, lambda t: t.update({"h.1.attn.c_proj.weight": torch.ones(3, 64)}))
    with pytest.raises(ConfigError, match=r"tensor h.1.attn.c_proj.weight has shape \(3, 64\), expected \(64, 64\)"):
        fmcore_model(tmp_path)


def test_a_conflicting_explicit_field_is_an_error_a_presets_is_replaced(tmp_path):
    hf_checkpoint(tmp_path, "llama-gqa")
    init = ["--model.init_from", str(tmp_path)]
    with pytest.raises(ConfigError, match=r"model.dim = 128 in your config, 96 in config.json \(hidden_size\)"):
        load_config("tiny", [*init, "--model.dim", "128"])
    toml = tmp_path / "mine.toml"
    toml.write_text(f'[model]\ninit_from = "{tmp_path}"\nn_layers = 4\ntie_embeddings = false\n')
    with pytest.raises(ConfigError, match=r"model.n_layers = 4 in your config, 2 in config.json"):
        load_config(str(toml))
    # The tiny preset's gpt2 shape (dim 128, 4 layers...) gives way; the same value set explicitly, or 0 ("derive
    # it"), is no conflict.
    m = load_config("tiny", [*init, "--model.dim", "96", "--model.n_kv_heads", "0", "--train.seq_len", "128"]).model
    assert (m.arch, m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_dim, m.max_seq_len, m.rope_base, m.norm_eps,
            m.tie_embeddings, m.bias) == ("llama", 96, 2, 6, 2, 160, 128, 500000.0, 1e-5, False, False)
    with pytest.raises(ConfigError, match=r"train.seq_len \(256\) exceeds model.max_seq_len \(128\)"):
        load_config("tiny", [*init, "--train.seq_len", "256"])


def small_run(dataset: Path, run: Path, ckpt: Path, steps: int, *extra: str) -> list[str]:
    return ["--model.init_from", str(ckpt), "--data.dataset", str(dataset), "--log.run_dir", str(run),
            "--train.steps", str(steps), "--train.batch_size", "8", "--train.seq_len", "64", "--train.device", "cpu",
            "--train.precision", "fp32", "--train.threads", "1", "--data.threads", "1", "--optim.lr", "3e-3",
            "--schedule.warmup_steps", "2", "--log.every", "1", "--log.progress", "none", "--log.tensorboard", "false",
            "--log.sample_tokens", "0", "--train.eval_batches", "1", "--checkpoint.export_hf", "false", *extra]


def first_batch_loss(hf, cfg, dataset: Path, batch_size: int = 8) -> float:
    """HF's mean cross-entropy on the trainer's first batch (the loader as one process reads it)."""
    from fmcore.train.trainer import Env, make_loader

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch_size))
    with make_loader(cfg, dataset, Env(0, 1, 0, torch.device("cpu"))) as loader:
        batch = next(loader)
    with torch.no_grad():
        logits = hf.double()(batch.x).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.y.reshape(-1)).item()


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def test_train_starts_from_the_checkpoints_loss_and_learns(dataset, tmp_path, monkeypatch, capsys):
    from fmcore.train import init_from, trainer

    ckpt, run = tmp_path / "hf", tmp_path / "run"
    hf = hf_checkpoint(ckpt, "llama-gqa", vocab_size=1024)  # the dataset's vocabulary (its BPE's 1024)
    shutil.copyfile(trainer.dataset_tokenizer(dataset), ckpt / "tokenizer.json")  # (prepared with its tokenizer)
    cfg = load_config("tiny", small_run(dataset, run, ckpt, 30))
    assert trainer.main(["tiny", *small_run(dataset, run, ckpt, 30)]) == 0
    out = capsys.readouterr().out
    assert f"weights from {ckpt}" in out and "warning" not in out
    got = losses(run)
    assert got[1] == pytest.approx(first_batch_loss(hf, cfg, dataset), rel=1e-5)
    assert got[30] < got[1] - 0.5, f"loss fell only from {got[1]:.3f} to {got[30]:.3f}"
    saved = load_config(str(run / "config.toml"))  # the run's config shows where it started and the shape
    assert saved.model.init_from == str(ckpt) and saved.model.dim == 96 and saved.model.arch == "llama"
    # A resume loads its checkpoint, not init_from's weights.
    monkeypatch.setattr(init_from, "weights", lambda *a: pytest.fail("a resume read model.init_from"))
    assert trainer.main([str(run / "config.toml"), "--train.steps", "32", "--resume", "auto"]) == 0
    assert sorted(losses(run)) == list(range(1, 33))
    # The Hugging Face directory moved away: its config.json gone, the run resumes on the shape it recorded.
    ckpt.rename(tmp_path / "moved")
    capsys.readouterr()
    assert trainer.main([str(run / "config.toml"), "--train.steps", "34", "--resume", "auto"]) == 2
    assert "--model.init_from ''" in capsys.readouterr().err
    assert trainer.main([str(run / "config.toml"), "--train.steps", "34", "--resume", "auto",
                         "--model.init_from", ""]) == 0
    assert sorted(losses(run)) == list(range(1, 35))


def test_a_vocabulary_smaller_than_the_datasets_is_refused(dataset, tmp_path):
    from fmcore.train.trainer import train

    hf_checkpoint(tmp_path / "hf", "gpt2")  # vocab_size 200; the dataset's is 1024
    with pytest.raises(ConfigError, match=r"vocab_size \(200\) is smaller than the dataset's vocabulary \(1024\).*"
                                          "--tokenizer"):
        train(load_config("tiny", small_run(dataset, tmp_path / "run", tmp_path / "hf", 2)))


def test_a_dataset_tokenized_otherwise_is_warned_about(dataset, tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from fmcore.train.init_from import tokenizer_mismatch
    from fmcore.train.trainer import dataset_tokenizer

    ours = dataset_tokenizer(dataset)
    assert tokenizer_mismatch(tmp_path, ours) is None  # no tokenizer.json in the checkpoint: nothing to compare
    shutil.copyfile(ours, tmp_path / "tokenizer.json")
    assert tokenizer_mismatch(tmp_path, ours) is None
    Tokenizer(WordLevel({"a": 0, "b": 1}, unk_token="a")).save(str(tmp_path / "tokenizer.json"))
    assert "prepare the data with --tokenizer" in tokenizer_mismatch(tmp_path, ours)


def _train(rank: int, world: int, args: list[str]) -> None:
    from fmcore.train.trainer import train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    train(load_config("tiny", args))


def test_fsdp2_on_two_ranks_starts_from_the_checkpoint(dataset, tmp_path):
    # Each rank reads the checkpoint before fully_shard shards the model: the first loss (the mean over the two
    # ranks' halves of the batch) is one process's on the whole batch, and HF's.
    ckpt = tmp_path / "hf"
    hf = hf_checkpoint(ckpt, "gpt2", sharded=True, vocab_size=1024)
    one, two = tmp_path / "one", tmp_path / "two"
    run_ranks(_train, 1, tmp_path / "launch1", args=(small_run(dataset, one, ckpt, 2, "--train.batch_size", "8"),))
    run_ranks(_train, 2, tmp_path / "launch2", args=(small_run(dataset, two, ckpt, 2, "--train.batch_size", "4",
                                                               "--parallel.data", "fsdp2"),), timeout=240)
    want = first_batch_loss(hf, load_config("tiny", small_run(dataset, one, ckpt, 2)), dataset)
    assert losses(one)[1] == pytest.approx(want, rel=1e-5)
    assert losses(two)[1] == pytest.approx(losses(one)[1], rel=1e-6)
    # (the second step after the ranks' gradients were summed in another order: float noise, amplified by Adam)
    assert losses(two)[2] == pytest.approx(losses(one)[2], rel=2e-4)
