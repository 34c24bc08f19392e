"""Export to Hugging Face: model.safetensors + config.json that GPT2LMHeadModel / LlamaForCausalLM load.

    export_hf(model, mcfg, "runs/tiny/hf")
    AutoModelForCausalLM.from_pretrained("runs/tiny/hf")   # same logits as model(x)

The weights map one to one, except that GPT-2's Conv1D layers store (in, out) matrices (transposed)
and Llama's fused projections are split into q/k/v and gate/up. A tied head is written once (as the
embedding), which is how transformers expects tied weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from fmcore.train.config import ModelConfig
from fmcore.train.parallel import full_state_dicts, split_part


def _gpt2(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> tuple[dict, dict]:
    def bias(name: str, n: int) -> torch.Tensor:  # HF's GPT-2 always has biases: zeros when we have none
        return sd[name] if name in sd else torch.zeros(n, dtype=sd["wte.weight"].dtype)

    d, f = cfg.dim, cfg.ffn_dim
    out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": sd["wpe.weight"],
           "transformer.ln_f.weight": sd["norm.weight"], "transformer.ln_f.bias": bias("norm.bias", d)}
    for i in range(cfg.n_layers):
        s, h = f"blocks.{i}.", f"transformer.h.{i}."
        out |= {
            h + "ln_1.weight": sd[s + "ln_1.weight"], h + "ln_1.bias": bias(s + "ln_1.bias", d),
            h + "attn.c_attn.weight": sd[s + "qkv.weight"].t(), h + "attn.c_attn.bias": bias(s + "qkv.bias", 3 * d),
            h + "attn.c_proj.weight": sd[s + "attn_out.weight"].t(), h + "attn.c_proj.bias": bias(s + "attn_out.bias", d),
            h + "ln_2.weight": sd[s + "ln_2.weight"], h + "ln_2.bias": bias(s + "ln_2.bias", d),
            h + "mlp.c_fc.weight": sd[s + "fc.weight"].t(), h + "mlp.c_fc.bias": bias(s + "fc.bias", f),
            h + "mlp.c_proj.weight": sd[s + "mlp_out.weight"].t(), h + "mlp.c_proj.bias": bias(s + "mlp_out.bias", d),
        }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len, "n_embd": d, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": f,
        "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0,
        "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    return out, config


def _llama(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> tuple[dict, dict]:
    hd = cfg.dim // cfg.n_heads
    q, kv, f = cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.ffn_dim
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(cfg.n_layers):
        s, h = f"blocks.{i}.", f"model.layers.{i}."
        wq, wk, wv = sd[s + "wqkv.weight"].split([q, kv, kv])
        gate, up = sd[s + "w_gate_up.weight"].split([f, f])
        out |= {
            h + "input_layernorm.weight": sd[s + "attn_norm.weight"],
            h + "self_attn.q_proj.weight": wq, h + "self_attn.k_proj.weight": wk, h + "self_attn.v_proj.weight": wv,
            h + "self_attn.o_proj.weight": sd[s + "wo.weight"],
            h + "post_attention_layernorm.weight": sd[s + "ffn_norm.weight"],
            h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
            h + "mlp.down_proj.weight": sd[s + "w_down.weight"],
        }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "intermediate_size": f, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": hd,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        # transformers >= 5 reads rope_parameters; older versions read rope_theta.
        "rope_theta": cfg.rope_base, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
    }
    return out, config


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
    if not cfg.vocab_size or not cfg.ffn_dim or not cfg.n_kv_heads:
        raise ValueError("export_hf needs the resolved model config (models.resolve(cfg.model, vocab_size, device), "
                         "the one build_model got): model.vocab_size, ffn_dim or n_kv_heads is still 0 (derive it)")
    sd, _ = full_state_dicts(model)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    sd = _fuse_split_linears({k: v.detach().cpu() for k, v in sd.items()})
    tensors, config = (_gpt2 if cfg.arch == "gpt2" else _llama)(sd, cfg)
    dtype = next(iter(tensors.values())).dtype
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
