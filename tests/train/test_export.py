"""Hugging Face export: transformers loads the safetensors + config.json and gives the same logits."""

import json

import pytest
import torch

from fmcore.train import models
from fmcore.train.config import ModelConfig
from fmcore.train.export import export_hf

transformers = pytest.importorskip("transformers")

CASES = {
    "gpt2": ModelConfig(arch="gpt2", dim=64, n_layers=2, n_heads=4, max_seq_len=64, ops="torch"),
    "gpt2-nobias-untied": ModelConfig(arch="gpt2", dim=64, n_layers=2, n_heads=4, max_seq_len=64, ops="torch",
                                      bias=False, tie_embeddings=False),
    "llama-gqa": ModelConfig(arch="llama", dim=96, n_layers=2, n_heads=6, n_kv_heads=2, max_seq_len=64,
                             ops="torch", tie_embeddings=False, rope_base=500000.0, norm_eps=1e-6),
    "llama-tied": ModelConfig(arch="llama", dim=64, n_layers=2, n_heads=4, max_seq_len=64, ops="torch"),
    # Llama 3.2's RoPE scaling; original_max_len 64 at head dim 16 puts frequencies in all three of its regimes
    "llama-llama3": ModelConfig(arch="llama", dim=64, n_layers=2, n_heads=4, max_seq_len=256, ops="torch",
                                rope_scaling="llama3", rope_scale_factor=32.0, rope_original_max_len=64),
    # Qwen2: q/k/v biases, GQA, tied (as its small sizes)
    "qwen2": ModelConfig(arch="llama", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, ops="torch",
                         qkv_bias=True, rope_base=1000000.0, norm_eps=1e-6),
    # Qwen3: q/k norms, heads of 24 (4 * 24 features, dim 64), untied; and with biases (attention_bias: zeros on
    # o_proj)
    "qwen3": ModelConfig(arch="llama", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=24, max_seq_len=64,
                         ops="torch", qk_norm=True, tie_embeddings=False),
    "qwen3-bias": ModelConfig(arch="llama", dim=64, n_layers=2, n_heads=4, head_dim=8, max_seq_len=64, ops="torch",
                              qk_norm=True, qkv_bias=True),
    # a sliding window in every layer, shorter than the 37 tokens below: Mistral's, and Qwen3's
    "mistral-window": ModelConfig(arch="llama", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                                  ops="torch", sliding_window=6),
    "qwen3-window": ModelConfig(arch="llama", dim=64, n_layers=2, n_heads=4, head_dim=16, max_seq_len=64, ops="torch",
                                qk_norm=True, sliding_window=9),
}
EXPECTED = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@pytest.mark.parametrize("name", CASES)
def test_transformers_loads_the_export_with_equal_logits(tmp_path, name):
    cfg = models.resolve(CASES[name], vocab_size=200)
    model = models.build_model(cfg, seed=3).eval()
    with torch.no_grad():  # random biases and norm weights so a dropped or misplaced one shows
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    export_hf(model, cfg, tmp_path, eos_id=5)
    expected = EXPECTED[name.split("-")[0]]
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [expected]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == expected
    assert sum(p.numel() for p in hf.parameters()) >= models.param_count(cfg)
    x = torch.randint(0, 200, (2, 37))  # 37: not a power of two
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits.float()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_an_unresolved_config_is_refused(tmp_path):
    # cfg.model as loaded still says 0 for the derived fields: GPT-2's config.json would get vocab_size 0
    # and n_inner 0, which transformers cannot load.
    for name in ("gpt2", "llama-gqa"):
        cfg = models.resolve(CASES[name], vocab_size=200)
        with pytest.raises(ValueError, match="needs the resolved model config"):
            export_hf(models.build_model(cfg), CASES[name], tmp_path / name)
        assert not (tmp_path / name).exists()


def test_the_datasets_bos_token_is_the_configs(tmp_path):
    # A dataset prepared with a Llama tokenizer.json starts every document with <s> (its manifest's bos_id); the
    # config said the EOS, which GPT-2's tokenizer uses for both.
    cfg = models.resolve(CASES["llama-tied"], vocab_size=200)
    model = models.build_model(cfg)
    for bos_id, want in [(None, 5), (1, 1)]:
        export_hf(model, cfg, tmp_path, eos_id=5, bos_id=bos_id)
        config = json.loads((tmp_path / "config.json").read_text())
        assert (config["eos_token_id"], config["bos_token_id"]) == (5, want)
