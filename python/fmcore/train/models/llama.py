"""Llama: pre-RMSNorm blocks, SwiGLU MLP, rotary positions, grouped-query attention, no biases; the
head is tied to the embedding unless cfg.tie_embeddings is false (the llama-1b preset unties it).
The Qwen family is this model with its options: cfg.qkv_bias (Qwen2: biases on q, k and v),
cfg.qk_norm (Qwen3: RMSNorm of each head of q and k before RoPE) and cfg.head_dim (Qwen3's heads of
128 need not make up dim).

q, k and v come from one fused projection and gate/up from another (one matmul each); export.py
splits them into Hugging Face's q_proj/k_proj/v_proj and gate_proj/up_proj. RoPE is rotate-half
(GPT-NeoX/Llama), which is what LlamaForCausalLM applies to the same layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fmcore.ops import swiglu
from fmcore.train.config import ModelConfig
from fmcore.train.models.base import CausalLM, PreNormBlock
from fmcore.train.models.common import DocMask, HeadNorm, apply_rope, causal_attention, rope_tables


class LlamaBlock(PreNormBlock):
    def __init__(self, cfg: ModelConfig, rope: "Rope"):
        super().__init__()
        d, f = cfg.dim, cfg.ffn_dim
        # Heads on this rank (tensor parallelism divides hq and hk; the head dim stays).
        self.hq, self.hk, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # rope in a list: the shared tables are not this block's submodule
        self.ops, self.rope, self.window = cfg.ops, [rope], cfg.sliding_window
        self.attn_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.wqkv = nn.Linear(d, (self.hq + 2 * self.hk) * self.hd, bias=cfg.qkv_bias)
        self.q_norm = HeadNorm(self.hd, cfg.norm_eps, cfg.ops) if cfg.qk_norm else None
        self.k_norm = HeadNorm(self.hd, cfg.norm_eps, cfg.ops) if cfg.qk_norm else None
        self.wo = nn.Linear(self.hq * self.hd, d, bias=False)
        self.ffn_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.w_gate_up = nn.Linear(d, 2 * f, bias=False)
        self.w_down = nn.Linear(f, d, bias=False)

    def pre_norms(self) -> tuple[nn.Module, nn.Module]:
        return self.attn_norm, self.ffn_norm

    def _attention(self, x: torch.Tensor, positions: torch.Tensor | None, docs: DocMask | None) -> torch.Tensor:
        B, S, _ = x.shape
        qkv = self.wqkv(x).view(B, S, self.hq + 2 * self.hk, self.hd)
        q, k, v = qkv.split([self.hq, self.hk, self.hk], dim=2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = self.rope[0].tables(S, positions)
        q, k = apply_rope(q, k, cos, sin, self.ops)
        return self.wo(causal_attention(q, k, v, self.ops, docs, self.window).reshape(B, S, self.hq * self.hd))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.w_gate_up(x)  # (..., 2F): gate, then up (per rank: SplitLinear keeps the order)
        if self.ops == "fmcore":
            return self.w_down(swiglu(gate_up))  # its backward writes gate_up's gradient whole
        gate, up = gate_up.chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


class Rope(nn.Module):
    """fp32 cos/sin tables (max_seq_len, head_dim/2); not in the state dict (a function of the config)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        cos, sin = self._tables()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, llama3 = self.cfg, None
        if cfg.rope_scaling == "llama3":
            llama3 = (cfg.rope_scale_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                      cfg.rope_original_max_len)
        return rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base, llama3)

    def reset_buffers(self) -> None:
        """The tables again, computed on the CPU and copied to the buffers' device (after to_empty)."""
        for buffer, table in zip((self.cos, self.sin), self._tables(), strict=True):
            buffer.copy_(table)

    def tables(self, S: int, positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if positions is None:
            return self.cos[:S], self.sin[:S]
        return self.cos[positions], self.sin[positions]


class Llama(CausalLM):
    residual_out_names = ("wo.weight", "w_down.weight")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg, self.ops = cfg, cfg.ops
        self.rope = Rope(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(LlamaBlock(cfg, self.rope) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def embed(self, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        return self.tok_embeddings(x)

    def head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.lm_head is None else self.lm_head.weight

    def reset_buffers(self) -> None:
        self.rope.reset_buffers()
