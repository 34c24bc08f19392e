"""Export to Hugging Face: model.safetensors + config.json that GPT2LMHeadModel / LlamaForCausalLM /
Qwen2ForCausalLM (model.qkv_bias) / Qwen3ForCausalLM (model.qk_norm) load.

    export_hf(model, mcfg, "runs/tiny/hf")
    AutoModelForCausalLM.from_pretrained("runs/tiny/hf")   # same logits as model(x)

The names, shapes and layouts come from hf_map.py, the table model.init_from reads such a directory
back with (init_from.py): GPT-2's Conv1D layers store (in, out) matrices (transposed), Llama's fused
projections (and fused q/k/v bias) are split into q/k/v and gate/up, and a tied head is written once
(as the embedding), which is how transformers expects tied weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from fmcore.train.config import ModelConfig
from fmcore.train.hf_map import ARCHITECTURES, CONFIG_KEYS, hf_model_type, tensor_map
from fmcore.train.parallel import full_state_dicts, split_part


def _hf_config(cfg: ModelConfig) -> dict:
    """config.json's model keys (CONFIG_KEYS, the table init_from.py reads back) and what fmcore's models
    fix: GPT-2's tanh GELU, no dropout (fmcore trains without), Llama's SiLU, no MLP biases, RoPE, and
    model.sliding_window in every layer (Mistral's; Qwen's from layer 0) or in none."""
    model_type = hf_model_type(cfg)
    config = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
              **{key: getattr(cfg, field) for field, key in CONFIG_KEYS[cfg.arch].items()},
              "initializer_range": cfg.init_std}
    if cfg.arch == "gpt2":
        return config | {"activation_function": "gelu_new", "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    rope = {"rope_type": "default", "rope_theta": cfg.rope_base}
    config["hidden_act"] = "silu"
    window = cfg.sliding_window or None
    if model_type in ("llama", "mistral"):
        config |= {"attention_bias": False, "mlp_bias": False}
        if model_type == "mistral":
            config["sliding_window"] = window
    else:  # (Qwen2's q/k/v biases are fixed; Qwen3's attention_bias puts zeros on o_proj, see hf_map)
        layer = "sliding_attention" if window else "full_attention"
        config |= {"use_sliding_window": bool(window), "sliding_window": window,
                   "max_window_layers": 0 if window else cfg.n_layers, "layer_types": [layer] * cfg.n_layers}
        if model_type == "qwen3":
            config["attention_bias"] = cfg.qkv_bias
    if cfg.rope_scaling == "llama3":
        scaling = {"rope_type": "llama3", "factor": cfg.rope_scale_factor,
                   "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                   "original_max_position_embeddings": cfg.rope_original_max_len}
        rope = scaling | {"rope_theta": cfg.rope_base}
        config["rope_scaling"] = scaling
    # transformers >= 5 reads rope_parameters; older versions read rope_theta and rope_scaling.
    return config | {"rope_parameters": rope}


def _fuse_split_linears(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensor parallelism's SplitLinear parts (``qkv.parts.0.weight``, ``qkv.parts.1.weight``...)
    concatenated back into the fused layer's tensors (``qkv.weight``), in part order."""
    out, parts = {}, {}
    for name, t in sd.items():
        part = split_part(name)
        if part is None:
            out[name] = t
            continue
        fused, index = part
        parts.setdefault(fused, {})[index] = t
    for name, by_index in parts.items():
        out[name] = torch.cat([by_index[i] for i in range(len(by_index))])
    return out


def hf_state_dict(model: torch.nn.Module, cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(HF-named full state dict on the CPU, HF config dict), or None on the ranks other than 0 of a
    process group. Every rank must call it: the full state dict of a sharded model (fsdp2, tensor
    parallel) is gathered, and torch hands it to rank 0 only."""
    # Every rank checks (before the collective): an unresolved config would write vocab_size 0 and
    # n_inner 0 into config.json (GPT-2), which transformers cannot load.
    if not cfg.vocab_size or not cfg.ffn_dim or not cfg.n_kv_heads or not cfg.head_dim:
        raise ValueError("export_hf needs the resolved model config (models.resolve(cfg.model, vocab_size, device), "
                         "the one build_model got): model.vocab_size, ffn_dim, n_kv_heads or head_dim is still 0 "
                         "(derive it)")
    sd, _ = full_state_dicts(model)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    sd = _fuse_split_linears({k: v.detach().cpu() for k, v in sd.items()})
    dtype = next(iter(sd.values())).dtype
    tensors = {}
    for row in tensor_map(cfg):
        tensors |= row.to_hf(sd.get(row.ours), dtype)  # (a bias the model lacks: zeros)
    config = _hf_config(cfg)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    return {k: v.contiguous() for k, v in tensors.items()}, config


def export_hf(model: torch.nn.Module, cfg: ModelConfig, out_dir: str | Path, *, tokenizer: Path | None = None,
              eos_id: int | None = None, bos_id: int | None = None) -> Path:
    """Write out_dir/model.safetensors and config.json (and tokenizer.json when given). With several
    processes every rank must call this (the full state dict is gathered); rank 0 writes. eos_id, bos_id:
    the dataset's (its manifest's tokenizer.eos_id and bos_id; no bos_id: the EOS starts a document too)."""
    from safetensors.torch import save_file

    state = hf_state_dict(model, cfg)
    out = Path(out_dir)
    if state is None:
        return out
    tensors, config = state
    # The dataset's end-of-document token (None if unknown) and the token in front of each document: a Llama
    # tokenizer's <s>, else the EOS (GPT-2's <|endoftext|> does both).
    config["eos_token_id"] = eos_id
    config["bos_token_id"] = eos_id if bos_id is None else bos_id
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None and Path(tokenizer).is_file():
        shutil.copyfile(tokenizer, out / "tokenizer.json")
    return out
