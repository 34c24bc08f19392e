"""The one table between fmcore's models and Hugging Face's GPT2LMHeadModel / LlamaForCausalLM /
Qwen2ForCausalLM / Qwen3ForCausalLM: the config fields and every tensor's name, shape and layout.
export.py writes with it, init_from.py reads with it, so the two directions cannot drift apart.

    for row in tensor_map(mcfg):          # mcfg: a resolved ModelConfig
        row.ours                          # "blocks.0.wqkv.weight"
        row.theirs                        # (("model.layers.0.self_attn.q_proj.weight", (512, 512)), k..., v...)
        hf = row.to_hf(sd[row.ours])      # {HF name: tensor}
        sd[row.ours] = row.from_hf([hf[name] for name, _ in row.theirs])

An fmcore tensor is its HF tensors concatenated along dim 0 (Llama's q/k/v and gate/up are one fused
projection each in fmcore, and Qwen2's q/k/v biases one bias), each transposed first where HF stores
a Conv1D (GPT-2's (in, out) matrices). HF's GPT-2 always has biases: a model.bias false model is
written with zeros there, as is Qwen3's o_proj bias (a Qwen3 with attention_bias has one, fmcore's
model none). A tied head is HF's embedding alone (transformers ties lm_head.weight to it, and
save_pretrained drops it).

The llama-style models are four HF architectures, told apart by model.qkv_bias and model.qk_norm
(hf_model_type): Llama (neither), Qwen2 (q/k/v biases), Qwen3 (q/k norms, and with qkv_bias its
attention_bias, whose o_proj bias fmcore's model lacks: written as zeros).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fmcore.train.config import ModelConfig

# ModelConfig field -> config.json key, per model_type. (Llama's rope_theta sits in rope_parameters in
# transformers >= 5; init_from.py reads either place, export.py writes both.)
CONFIG_KEYS = {
    "gpt2": {"vocab_size": "vocab_size", "dim": "n_embd", "n_layers": "n_layer", "n_heads": "n_head",
             "ffn_dim": "n_inner", "max_seq_len": "n_positions", "norm_eps": "layer_norm_epsilon",
             "tie_embeddings": "tie_word_embeddings"},
    "llama": {"vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
              "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "ffn_dim": "intermediate_size",
              "max_seq_len": "max_position_embeddings", "norm_eps": "rms_norm_eps",
              "tie_embeddings": "tie_word_embeddings", "rope_base": "rope_theta", "head_dim": "head_dim"},
}
# transformers' model_type -> its causal LM class
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def hf_model_type(cfg: ModelConfig) -> str:
    """The transformers model_type that computes what cfg's model does: gpt2, llama, mistral (a llama with
    a sliding window), qwen2 (q/k/v biases) or qwen3 (q/k norms; both with the window in every layer)."""
    if cfg.arch == "gpt2":
        return "gpt2"
    return "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "mistral" if cfg.sliding_window else "llama"


@dataclass(frozen=True)
class TensorMap:
    """One fmcore tensor and the HF tensors it is made of."""

    ours: str  # fmcore state dict key
    theirs: tuple[tuple[str, tuple[int, ...]], ...]  # (HF key, HF shape) of each part, in concatenation order
    conv1d: bool = False  # HF stores each part transposed (GPT-2's Conv1D)
    bias: bool = False  # a GPT-2 bias: absent from fmcore's model when model.bias is false

    def to_hf(self, t: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """{HF key: tensor} from fmcore's tensor; None (a bias the model does not have): zeros of dtype."""
        if t is None:
            return {name: torch.zeros(shape, dtype=dtype) for name, shape in self.theirs}
        sizes = [shape[-1] if self.conv1d else shape[0] for _, shape in self.theirs]
        parts = t.split(sizes) if len(sizes) > 1 else [t]
        return {name: part.t() if self.conv1d else part for (name, _), part in zip(self.theirs, parts)}

    def from_hf(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """fmcore's tensor from its HF parts (in self.theirs' order, shapes checked by the caller)."""
        parts = [p.t() if self.conv1d else p for p in parts]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def tensor_map(cfg: ModelConfig) -> list[TensorMap]:
    """Every tensor of the model cfg describes (resolved: models.resolve), in state dict order."""
    return _gpt2(cfg) if cfg.arch == "gpt2" else _llama(cfg)


def _gpt2(cfg: ModelConfig) -> list[TensorMap]:
    d, f, V = cfg.dim, cfg.ffn_dim, cfg.vocab_size

    def bias(ours: str, theirs: str, n: int) -> TensorMap:
        return TensorMap(ours, ((theirs, (n,)),), bias=True)

    def conv1d(ours: str, theirs: str, n_in: int, n_out: int) -> TensorMap:
        return TensorMap(ours, ((theirs, (n_in, n_out)),), conv1d=True)

    rows = [TensorMap("wte.weight", (("transformer.wte.weight", (V, d)),)),
            TensorMap("wpe.weight", (("transformer.wpe.weight", (cfg.max_seq_len, d)),))]
    for i in range(cfg.n_layers):
        s, h = f"blocks.{i}.", f"transformer.h.{i}."
        rows += [
            TensorMap(s + "ln_1.weight", ((h + "ln_1.weight", (d,)),)), bias(s + "ln_1.bias", h + "ln_1.bias", d),
            conv1d(s + "qkv.weight", h + "attn.c_attn.weight", d, 3 * d),
            bias(s + "qkv.bias", h + "attn.c_attn.bias", 3 * d),
            conv1d(s + "attn_out.weight", h + "attn.c_proj.weight", d, d),
            bias(s + "attn_out.bias", h + "attn.c_proj.bias", d),
            TensorMap(s + "ln_2.weight", ((h + "ln_2.weight", (d,)),)), bias(s + "ln_2.bias", h + "ln_2.bias", d),
            conv1d(s + "fc.weight", h + "mlp.c_fc.weight", d, f), bias(s + "fc.bias", h + "mlp.c_fc.bias", f),
            conv1d(s + "mlp_out.weight", h + "mlp.c_proj.weight", f, d),
            bias(s + "mlp_out.bias", h + "mlp.c_proj.bias", d),
        ]
    rows += [TensorMap("norm.weight", (("transformer.ln_f.weight", (d,)),)),
             bias("norm.bias", "transformer.ln_f.bias", d)]
    if not cfg.tie_embeddings:
        rows.append(TensorMap("lm_head.weight", (("lm_head.weight", (V, d)),)))
    return rows


def _llama(cfg: ModelConfig) -> list[TensorMap]:
    d, f, V = cfg.dim, cfg.ffn_dim, cfg.vocab_size
    hd = cfg.head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    rows = [TensorMap("tok_embeddings.weight", (("model.embed_tokens.weight", (V, d)),))]
    for i in range(cfg.n_layers):
        s, h = f"blocks.{i}.", f"model.layers.{i}."
        a, m = h + "self_attn.", h + "mlp."
        rows += [
            TensorMap(s + "attn_norm.weight", ((h + "input_layernorm.weight", (d,)),)),
            TensorMap(s + "wqkv.weight", ((a + "q_proj.weight", (q, d)), (a + "k_proj.weight", (kv, d)),
                                          (a + "v_proj.weight", (kv, d)))),
        ]
        if cfg.qkv_bias:
            rows.append(TensorMap(s + "wqkv.bias", ((a + "q_proj.bias", (q,)), (a + "k_proj.bias", (kv,)),
                                                    (a + "v_proj.bias", (kv,)))))
        if cfg.qk_norm:
            rows += [TensorMap(s + "q_norm.weight", ((a + "q_norm.weight", (hd,)),)),
                     TensorMap(s + "k_norm.weight", ((a + "k_norm.weight", (hd,)),))]
        rows.append(TensorMap(s + "wo.weight", ((a + "o_proj.weight", (d, q)),)))
        if cfg.qkv_bias and cfg.qk_norm:  # Qwen3's attention_bias: o_proj's too (bias=True: zeros, not ours)
            rows.append(TensorMap(s + "wo.bias", ((a + "o_proj.bias", (d,)),), bias=True))
        rows += [
            TensorMap(s + "ffn_norm.weight", ((h + "post_attention_layernorm.weight", (d,)),)),
            TensorMap(s + "w_gate_up.weight", ((m + "gate_proj.weight", (f, d)), (m + "up_proj.weight", (f, d)))),
            TensorMap(s + "w_down.weight", ((m + "down_proj.weight", (d, f)),)),
        ]
    rows.append(TensorMap("norm.weight", (("model.norm.weight", (d,)),)))
    if not cfg.tie_embeddings:
        rows.append(TensorMap("lm_head.weight", (("lm_head.weight", (V, d)),)))
    return rows
