"""The model zoo: GPT-2 and Llama (Qwen2 and Qwen3 too, with its qkv_bias, qk_norm and head_dim), their
exact parameter counts and FLOPs per token.

    mcfg = resolve(cfg.model, vocab_size=8192, device="cpu")   # fills the derived fields
    model = build_model(mcfg, seed=0)                           # on the CPU ("meta": shapes only)
    n = param_count(mcfg)                                       # == sum(p.numel() for p in model.parameters())
    flops = flops_per_token(mcfg, seq_len=1024)                 # for MFU
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from fmcore._info import kernels_missing_on
from fmcore.train.config import ConfigError, ModelConfig
from fmcore.train.models.base import CausalLM
from fmcore.train.models.gpt import GPT
from fmcore.train.models.llama import Llama
from fmcore.train.models.materialize import fill, materialize


def resolve(cfg: ModelConfig, vocab_size: int | None = None, device: str | torch.device = "cpu") -> ModelConfig:
    """A copy of cfg with every "0 = derive it" field filled in and ops="auto" decided for device.

    vocab_size is the dataset's; the model's must hold it (0 takes it, rounded up to a multiple of 64)."""
    cfg = dataclasses.replace(cfg)
    if cfg.vocab_size == 0:
        if not vocab_size:
            raise ConfigError("model.vocab_size is 0 (take the dataset's) but no dataset vocabulary is known")
        cfg.vocab_size = -(-vocab_size // 64) * 64
    elif vocab_size and cfg.vocab_size < vocab_size and cfg.init_from:
        raise ConfigError(f"model.init_from {cfg.init_from}: the checkpoint's vocab_size ({cfg.vocab_size}) is smaller "
                          f"than the dataset's vocabulary ({vocab_size}): prepare the dataset with the checkpoint's "
                          "tokenizer (fmcore prepare ... --tokenizer its tokenizer.json)")
    elif vocab_size and cfg.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.vocab_size}) is smaller than the dataset's vocabulary ({vocab_size})")
    cfg.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
    cfg.head_dim = cfg.head_dim or cfg.dim // cfg.n_heads
    if cfg.ffn_dim == 0:
        cfg.ffn_dim = 4 * cfg.dim if cfg.arch == "gpt2" else -(-(8 * cfg.dim // 3) // 256) * 256
    if cfg.arch == "llama":
        cfg.bias = False
    if cfg.ops == "auto":
        missing = kernels_missing_on(device)
        if missing:
            warnings.warn(f"model.ops='auto' chose torch's ops: {missing}", stacklevel=2)
        cfg.ops = "torch" if missing else "fmcore"
    return cfg


def build_model(cfg: ModelConfig, seed: int = 0, device: str | torch.device | None = None) -> CausalLM:
    """The model with seed's initial weights (CausalLM.initial_weights: the same whatever the device,
    ops path or parallel layout) on device (None: torch's default device, the CPU unless set, "meta"
    inside ``with torch.device("meta")``); on "meta", shapes and dtypes only: the trainer shards such
    a model before materialize gives each rank its shards."""
    if cfg.ops == "auto" or not cfg.vocab_size or not cfg.ffn_dim or not cfg.n_kv_heads or not cfg.head_dim:
        raise ValueError("build_model needs a resolved config: call models.resolve(cfg, vocab_size, device) first")
    device = torch.get_default_device() if device is None else torch.device(device)
    with torch.device("meta"):  # (the constructors' own initialisation would be drawn, then overwritten)
        model = (GPT if cfg.arch == "gpt2" else Llama)(cfg)
    if device.type != "meta":
        materialize(model, device, model.initial_weights(seed))
    return model


def param_count(cfg: ModelConfig) -> int:
    """Exact number of parameters of build_model(cfg) (tied weights counted once)."""
    d, f, V, L = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.n_layers
    head = 0 if cfg.tie_embeddings else V * d
    if cfg.arch == "gpt2":
        b = 1 if cfg.bias else 0
        norm = d * (1 + b)
        block = 2 * norm + (3 * d * d + 3 * d * b) + (d * d + d * b) + (d * f + f * b) + (f * d + d * b)
        return V * d + cfg.max_seq_len * d + L * block + norm + head
    hd = cfg.head_dim or d // cfg.n_heads
    qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * hd
    attention = d * qkv + qkv * cfg.qkv_bias + 2 * hd * cfg.qk_norm + cfg.n_heads * hd * d
    block = 2 * d + attention + d * 2 * f + f * d
    return V * d + L * block + d + head


def matmul_param_count(cfg: ModelConfig) -> int:
    """N in the 6N rule: parameters minus the lookup tables that do no matmul (GPT-2's position table;
    the input embedding when the head is untied). A tied embedding counts once, as the head. Norm
    weights and biases stay in, as nanoGPT counts them: they do no matmul either (6N is 6 of them per
    token above torch's FlopCounterMode: under 0.1% of the gpt2 and llama presets' FLOPs, 0.7% of tiny's)."""
    n = param_count(cfg)
    if cfg.arch == "gpt2":
        n -= cfg.max_seq_len * cfg.dim
    if not cfg.tie_embeddings:
        n -= cfg.vocab_size * cfg.dim
    return n


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token, forward + backward: 6N + 12 L H Q T (PaLM's convention, as nanoGPT:
    N matmul parameters, L layers, H query heads, Q head dim, T sequence length; the attention term
    counts the full S x S scores, causal masking notwithstanding). With a sliding window W shorter
    than T, a token's keys are at most W, so T becomes W there (the band's full width, in the same
    spirit: the triangle the window's first tokens miss is not subtracted)."""
    head_dim = cfg.head_dim or cfg.dim // cfg.n_heads  # (Qwen3's: n_heads * head_dim need not be dim)
    keys = min(seq_len, cfg.sliding_window) if cfg.sliding_window else seq_len
    return 6 * matmul_param_count(cfg) + 12 * cfg.n_layers * cfg.n_heads * head_dim * keys


__all__ = ["CausalLM", "GPT", "Llama", "build_model", "fill", "flops_per_token", "materialize", "matmul_param_count",
           "param_count", "resolve"]
