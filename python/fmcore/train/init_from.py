"""model.init_from: start from a Hugging Face checkpoint (continued pretraining of an open model).

    cfg = configure(cfg)                           # the model's shape from DIR/config.json
    mcfg = models.resolve(cfg.model, vocab_size)
    model = models.build_model(mcfg)
    load_weights(model, mcfg, cfg.model.init_from)  # DIR's safetensors weights, every tensor checked

A checkpoint is a directory with config.json and model.safetensors, or shards listed in
model.safetensors.index.json, as transformers' save_pretrained writes them, of a GPT2LMHeadModel,
LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM (a sliding window applied by
every layer or by none; Qwen2's q/k/v biases, Qwen3's q/k norms and head_dim, and the window are
model.qkv_bias, model.qk_norm, model.head_dim and model.sliding_window of fmcore's llama).
Only the safetensors package reads it: transformers is not needed. The names and layouts are
hf_map.py's, the table export.py writes with. Whatever fmcore's models would compute differently is
refused by its config.json key, never approximated.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn

from fmcore.train import models
from fmcore.train.config import Config, ConfigError, ModelConfig
from fmcore.train.hf_map import CONFIG_KEYS, tensor_map

# architecture -> (fmcore's model.arch, transformers' model_type)
SUPPORTED = {"GPT2LMHeadModel": ("gpt2", "gpt2"), "LlamaForCausalLM": ("llama", "llama"),
             "MistralForCausalLM": ("llama", "mistral"), "Qwen2ForCausalLM": ("llama", "qwen2"),
             "Qwen3ForCausalLM": ("llama", "qwen3")}
# transformers' defaults (its config classes') for the keys a config.json may leave out. The sizes
# (vocab_size, the hidden size, layers, heads, Llama's intermediate_size) are required instead.
DEFAULTS = {
    "gpt2": {"n_positions": 1024, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
             "tie_word_embeddings": True, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False},
    "llama": {"num_key_value_heads": None, "hidden_act": "silu", "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0, "attention_bias": False,
              "mlp_bias": False, "head_dim": None, "sliding_window": None},
    "mistral": {"num_key_value_heads": 8, "hidden_act": "silu", "max_position_embeddings": 4096 * 32,
                "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0, "attention_bias": False,
                "mlp_bias": False, "head_dim": None, "sliding_window": 4096},
    # (Qwen2's config has no attention_bias or mlp_bias: its q/k/v biases are always there, its MLP has none)
    "qwen2": {"num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": False, "rope_theta": 10000.0, "head_dim": None, "use_sliding_window": False,
              "sliding_window": 4096, "max_window_layers": 28, "layer_types": None},
    "qwen3": {"num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": False, "rope_theta": 10000.0, "attention_bias": False, "head_dim": 128,
              "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28, "layer_types": None},
}
REQUIRED = {"gpt2": ("vocab_size", "n_embd", "n_layer", "n_head"),
            "llama": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}
# (GPT-2's tanh GELU under its names in transformers; Llama's SiLU)
ACTIVATIONS = {"gpt2": ("activation_function", ("gelu_new", "gelu_pytorch_tanh")),
               "llama": ("hidden_act", ("silu", "swish"))}
NULLABLE = ("n_inner", "num_key_value_heads", "head_dim")
# Zero means "derive it": an explicit 0 asks for nothing the checkpoint could contradict.
DERIVED = ("vocab_size", "n_kv_heads", "head_dim", "ffn_dim")
LLAMA3_KEYS = {"rope_scale_factor": "factor", "rope_low_freq_factor": "low_freq_factor",
               "rope_high_freq_factor": "high_freq_factor", "rope_original_max_len": "original_max_position_embeddings"}


def read_hf_config(path: str | Path) -> dict:
    """DIR/config.json as a dict; ConfigError naming the file when it is missing or not JSON."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ConfigError(f"model.init_from: {file} not found (expected a Hugging Face checkpoint directory: "
                          "config.json and model.safetensors, as save_pretrained writes them; resuming a run after moving it? "
                          "--model.init_from '' resumes on the shape its config.toml records)")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"model.init_from: {file} is not JSON: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"model.init_from: {file} holds a {type(config).__name__}, expected an object")
    return config


def model_shape(path: str | Path) -> dict:
    """The ModelConfig fields DIR/config.json determines (resolved: n_kv_heads and ffn_dim filled in),
    or ConfigError naming the config.json key fmcore's models cannot represent."""
    config = read_hf_config(path)
    file = Path(path) / "config.json"
    archs = config.get("architectures")
    if archs is None:  # (a hand-written config.json may name the model_type alone)
        by_type = {model_type: name for name, (_, model_type) in SUPPORTED.items()}
        archs = [by_type.get(config.get("model_type"), f"model_type {config.get('model_type')!r}")]
    name = archs[0] if isinstance(archs, list) and len(archs) == 1 else None
    if name not in SUPPORTED:
        raise ConfigError(f"model.init_from: {file}: architectures {json.dumps(archs)} is not supported (fmcore's "
                          f"models load {', '.join(SUPPORTED)})")
    arch, model_type = SUPPORTED[name]
    missing = [k for k in REQUIRED[arch] if k not in config]
    if missing:
        raise ConfigError(f"model.init_from: {file} has no {', '.join(missing)}")
    c = DEFAULTS[model_type] | config

    def refuse(key: str, why: str) -> ConfigError:
        return ConfigError(f"model.init_from: {file}: {key} = {json.dumps(c.get(key))} is not supported: {why}")

    keys = CONFIG_KEYS[arch]
    sizes = [keys[f] for f in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len")
             if f in keys] + ["head_dim"]
    # (None: transformers derives it; the sizes without a default are required above)
    bad = [f"{k} = {json.dumps(c[k])}" for k in sizes if k in c and not (c[k] is None and k in NULLABLE)
           and not (type(c[k]) is int and c[k] > 0)]
    bad += [f"{k} = {json.dumps(c[k])}" for k in ("layer_norm_epsilon", "rms_norm_eps", "rope_theta")
            if k in c and not (type(c[k]) in (int, float) and 0 < c[k] < math.inf)]
    if bad:
        raise ConfigError(f"model.init_from: {file}: expected positive numbers, got {', '.join(bad)}")
    act_key, acts = ACTIVATIONS[arch]
    if c[act_key] not in acts:
        raise refuse(act_key, f"fmcore's {arch} uses {acts[0]}")
    shape = {field: c[key] for field, key in keys.items() if key in c}
    shape["arch"] = arch
    if arch == "gpt2":
        if not c["scale_attn_weights"]:
            raise refuse("scale_attn_weights", "fmcore's attention scales scores by 1/sqrt(head dim)")
        if c["scale_attn_by_inverse_layer_idx"]:
            raise refuse("scale_attn_by_inverse_layer_idx", "fmcore's attention scales every layer alike")
        shape |= {"ffn_dim": c["n_inner"] or 4 * c["n_embd"], "n_kv_heads": c["n_head"], "bias": True}
    else:
        heads = c["num_attention_heads"]
        # (transformers' head_dim: config.json's, else hidden_size // num_attention_heads; Qwen3's default 128)
        head_dim = c["head_dim"] or c["hidden_size"] // heads
        if head_dim % 2:
            raise refuse("head_dim", f"RoPE rotates pairs of features: fmcore's llama needs an even head dim, "
                                     f"got {head_dim}")
        if c.get("mlp_bias"):
            raise refuse("mlp_bias", "fmcore's llama has no biases in its MLP")
        # Qwen2's q/k/v always have biases; attention_bias (Llama, Mistral, Qwen3) puts them on o_proj too, which
        # fmcore's model lacks: load_weights accepts that bias only when it is zero (as export.py writes it).
        qkv_bias = model_type == "qwen2" or bool(c.get("attention_bias"))
        shape |= {"n_kv_heads": c["num_key_value_heads"] or heads, "head_dim": head_dim, "bias": False,
                  "qkv_bias": qkv_bias, "qk_norm": model_type == "qwen3"}
        shape["sliding_window"] = _sliding_window(c, model_type, refuse)
        shape |= _rope(c, refuse)
    for field in ("norm_eps", "rope_base", "rope_scale_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
        if field in shape:
            shape[field] = float(shape[field])
    return shape


def _sliding_window(c: dict, model_type: str, refuse) -> int:
    """model.sliding_window: the window every layer applies, or 0 where none is shorter than the context.
    Mistral's applies to every layer; Qwen's only with use_sliding_window, to the layers layer_types
    names "sliding_attention" (by default those from max_window_layers on): some layers but not all
    is refused, as fmcore's model has one window for all."""
    window, longest = c["sliding_window"], c["max_position_embeddings"]
    if window is None or window >= longest:
        return 0
    if type(window) is not int or window < 1:
        raise refuse("sliding_window", "expected a positive number of positions")
    if model_type not in ("qwen2", "qwen3"):
        return window
    if not c["use_sliding_window"]:
        return 0
    types = c["layer_types"] or ["sliding_attention" if i >= c["max_window_layers"] else "full_attention"
                                 for i in range(c["num_hidden_layers"])]
    sliding = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
    if sliding and len(sliding) < len(types):
        raise refuse("use_sliding_window", f"layers {_names([str(i) for i in sliding])} attend within a "
                                           f"sliding_window of {window} positions, the others to every earlier "
                                           "position, and fmcore's model has one window for all layers")
    return window if sliding else 0


def _rope(c: dict, refuse) -> dict:
    """rope_base and the rope_scaling fields from transformers >= 5's rope_parameters (theta and
    scaling in one dict) or older versions' rope_theta and rope_scaling."""
    rope = {**(c.get("rope_scaling") or {}), **(c.get("rope_parameters") or {})}
    key = "rope_parameters" if c.get("rope_parameters") else "rope_scaling"
    kind = rope.get("rope_type", rope.get("type", "default"))
    out = {"rope_base": rope.get("rope_theta", c["rope_theta"])}
    if rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) != 1.0:
        raise refuse("partial_rotary_factor", "fmcore rotates the whole head")
    if kind == "default":
        return out | {"rope_scaling": "none"}
    if kind != "llama3":
        raise refuse(key, f"rope_type {kind!r}: fmcore implements 'default' and 'llama3'")
    missing = [k for k in LLAMA3_KEYS.values() if k not in rope]
    if missing:
        raise refuse(key, f"rope_type 'llama3' needs {', '.join(missing)}")
    bad = [f"{k} = {json.dumps(rope[k])}" for k in LLAMA3_KEYS.values()
           if not (type(rope[k]) in (int, float) and 0 < rope[k] < math.inf)]
    if bad:
        raise refuse(key, f"rope_type 'llama3' needs positive numbers, got {', '.join(bad)}")
    out |= {"rope_scaling": "llama3"} | {field: rope[k] for field, k in LLAMA3_KEYS.items()}
    if isinstance(out["rope_original_max_len"], float) and out["rope_original_max_len"].is_integer():
        out["rope_original_max_len"] = int(out["rope_original_max_len"])  # (an int field: 8192.0 in some files)
    return out


def configure(cfg: Config) -> Config:
    """cfg with the model's shape from model.init_from's config.json (cfg itself without init_from).
    A shape field the user set (cfg.explicit: their TOML file or command line) to another value is a
    ConfigError naming it and both values; a preset's value or a default is replaced."""
    m = cfg.model
    if not m.init_from:
        return cfg
    shape = model_shape(m.init_from)
    keys = CONFIG_KEYS[shape["arch"]] | {f: f"rope_scaling.{k}" for f, k in LLAMA3_KEYS.items()} | {
        "arch": "architectures", "bias": "architectures", "qkv_bias": "architectures, attention_bias",
        "qk_norm": "architectures", "rope_scaling": "rope_scaling.rope_type"}
    conflicts = [f"model.{f} = {getattr(m, f)!r} in your config, {v!r} in config.json ({keys.get(f, f)})"
                 for f, v in shape.items()
                 if f"model.{f}" in cfg.explicit and getattr(m, f) != v and not (f in DERIVED and getattr(m, f) == 0)]
    if conflicts:
        raise ConfigError(f"model.init_from {m.init_from} sets the model's shape, and your TOML file or command line "
                          f"sets another: {'; '.join(conflicts)}. Leave those out (or set the checkpoint's values)")
    out = dataclasses.replace(cfg, model=dataclasses.replace(m, **shape))
    out.explicit = cfg.explicit
    return out


# ---- weights

def _tensor_files(path: Path) -> dict[str, Path]:
    """{HF tensor name: the safetensors file holding it}: model.safetensors, or the shards
    model.safetensors.index.json lists."""
    from safetensors import safe_open

    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"model.init_from: {index} has no weight_map ({e})") from None
        files = {name: path / file for name, file in weight_map.items()}
        absent = sorted({str(f) for f in files.values() if not f.is_file()})
        if absent:
            raise ConfigError(f"model.init_from: {index} lists shards that are missing: {', '.join(absent)}")
        return files
    raise ConfigError(f"model.init_from: {path} has neither model.safetensors nor model.safetensors.index.json "
                      "(fmcore reads safetensors only: save the model with transformers' save_pretrained)")


def _base_model_names(files: dict[str, Path], cfg: ModelConfig) -> dict[str, tuple[Path, str]]:
    """{the causal LM's tensor name: (file, the name stored there)}. A checkpoint saved from the base model
    (GPT2Model, LlamaModel) names its tensors without the LM's prefix ("h.0.attn.c_attn.weight" for
    "transformer.h.0.attn.c_attn.weight": openai-community/gpt2 does), which transformers puts back."""
    prefix = "transformer." if cfg.arch == "gpt2" else "model."
    if any(name.startswith(prefix) for name in files):
        return {name: (file, name) for name, file in files.items()}
    return {(name if name == "lm_head.weight" else prefix + name): (file, name) for name, file in files.items()}


def _ignored(name: str, cfg: ModelConfig) -> bool:
    """HF tensors that are no weights of the model: GPT-2's causal-mask buffers, RoPE inverse frequencies
    (both saved by older transformers), and a tied head saved beside its embedding (transformers ties it)."""
    return (name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))
            or (cfg.tie_embeddings and name == "lm_head.weight"))


def _zero_only(name: str, cfg: ModelConfig) -> bool:
    """An HF tensor fmcore's model has no parameter for, loaded only when it is zero (the same function
    then): the o_proj bias of an attention_bias checkpoint (Llama, Mistral, Qwen3; export.py writes
    Qwen3's as zeros), whose q/k/v biases are model.qkv_bias."""
    return cfg.arch == "llama" and cfg.qkv_bias and name.endswith(".self_attn.o_proj.bias")


def _names(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def load_weights(model: nn.Module, cfg: ModelConfig, path: str | Path) -> None:
    """Copy DIR's weights into model (built from the resolved cfg), each cast to its parameter's dtype."""
    models.fill(model, weights(model, cfg, path))


def weights(model: nn.Module, cfg: ModelConfig, path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) of DIR's weights for model's parameters (models.fill and materialize take
    them), read one at a time. Checked now, before any is read: every tensor's shape; missing and
    unexpected tensors are a ConfigError naming them."""
    from safetensors import safe_open

    path = Path(path)
    files = _base_model_names(_tensor_files(path), cfg)
    ours = {name for name, _ in model.named_parameters()}
    rows = [row for row in tensor_map(cfg) if row.ours in ours]  # (GPT-2 biases of a model without: none here)
    if {row.ours for row in rows} != ours:
        raise RuntimeError(f"hf_map has no row for {sorted(ours - {r.ours for r in rows})}: it is out of date")
    wanted = {name: shape for row in rows for name, shape in row.theirs}
    missing = [name for name in wanted if name not in files]
    zeros = [name for name in files if _zero_only(name, cfg)]
    unexpected = [stored for name, (_, stored) in files.items()
                  if name not in wanted and not _ignored(name, cfg) and name not in zeros]
    if missing or unexpected:
        raise ConfigError(f"model.init_from: {path} does not hold the model its config.json describes: "
                          + "; ".join(f"{what} tensors {_names(names)}" for what, names
                                      in (("missing", missing), ("unexpected", unexpected)) if names))
    with ExitStack() as stack:  # (the files close here on a refusal)
        handles = {file: stack.enter_context(safe_open(str(file), framework="pt"))
                   for file in sorted(set(files[name][0] for name in [*wanted, *zeros]))}

        def read(name: str, shape_only: bool = False):
            file, stored = files[name]
            return handles[file].get_slice(stored).get_shape() if shape_only else handles[file].get_tensor(stored)

        for name, shape in [*wanted.items(), *((name, (cfg.dim,)) for name in zeros)]:
            got = tuple(read(name, shape_only=True))
            if got != shape:
                raise ConfigError(f"model.init_from: {files[name][0]}: tensor {files[name][1]} has shape {got}, "
                                  f"expected {shape} (from config.json)")
        for name in zeros:
            if read(name).any():
                raise ConfigError(f"model.init_from: {files[name][0]}: tensor {files[name][1]} is not zero: fmcore's "
                                  "llama has biases on q, k and v only (attention_bias = true puts one on o_proj)")
        opened = stack.pop_all()  # (else open until the weights have been read)

    def each_row() -> Iterator[tuple[str, torch.Tensor]]:
        with opened:
            for row in rows:
                yield row.ours, row.from_hf([read(name) for name, _ in row.theirs])

    return each_row()


def tokenizer_mismatch(path: Path, dataset_tokenizer: Path | None) -> str | None:
    """Why the dataset's token ids may not be the checkpoint's (the vocabularies of DIR/tokenizer.json and
    the dataset's tokenizer differ), or None when they agree or either tokenizer.json is absent. A dataset
    prepared with another tokenizer whose vocabulary fits in the model's trains, on ids that mean other
    tokens to it: the pretrained weights are then little more than a random init."""
    theirs = path / "tokenizer.json"
    if dataset_tokenizer is None or not dataset_tokenizer.is_file() or not theirs.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        same = Tokenizer.from_file(str(theirs)).get_vocab() == Tokenizer.from_file(str(dataset_tokenizer)).get_vocab()
    except Exception:  # noqa: BLE001  (tokenizers raises a bare Exception; an unreadable one is not ours to judge)
        return None
    if same:
        return None
    return (f"the dataset was tokenized with {dataset_tokenizer}, whose vocabulary is not {theirs}'s: the model reads "
            f"its token ids as other tokens (prepare the data with --tokenizer {theirs})")
