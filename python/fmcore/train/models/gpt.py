"""GPT-2: pre-LayerNorm blocks, GELU (tanh) MLP, learned absolute positions, head tied to the embedding
(unless cfg.tie_embeddings is false).

Shapes mirror Hugging Face's GPT2LMHeadModel so export.py maps the weights one to one (the fused qkv
projection is GPT-2's c_attn; HF stores its Conv1D weights transposed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fmcore.ops import bias_gelu
from fmcore.train.config import ModelConfig
from fmcore.train.models.base import CausalLM, PreNormBlock
from fmcore.train.models.common import DocMask, causal_attention_packed


class GPTBlock(PreNormBlock):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f = cfg.dim, cfg.ffn_dim
        # Heads on this rank (tensor parallelism divides n_heads; the head dim stays).
        self.n_heads, self.head_dim, self.ops = cfg.n_heads, d // cfg.n_heads, cfg.ops
        self.ln_1 = nn.LayerNorm(d, eps=cfg.norm_eps, bias=cfg.bias)
        self.qkv = nn.Linear(d, 3 * d, bias=cfg.bias)
        self.attn_out = nn.Linear(d, d, bias=cfg.bias)
        self.ln_2 = nn.LayerNorm(d, eps=cfg.norm_eps, bias=cfg.bias)
        self.fc = nn.Linear(d, f, bias=cfg.bias)
        self.mlp_out = nn.Linear(f, d, bias=cfg.bias)
        # fmcore: fc's bias is added inside the GELU, whose backward then also sums its gradient
        # (fmcore.ops.bias_gelu). Tensor parallelism turns this off (parallel.py): fc's sharding
        # hooks run in its own forward.
        self.fused_bias_gelu = cfg.ops == "fmcore"

    def pre_norms(self) -> tuple[nn.Module, nn.Module]:
        return self.ln_1, self.ln_2

    def _attention(self, x: torch.Tensor, positions: torch.Tensor | None, docs: DocMask | None) -> torch.Tensor:
        # positions: unused (GPT-2's positions are added to the embedding)
        B, S, _ = x.shape
        qkv = self.qkv(x).view(B, S, 3, self.n_heads, self.head_dim)  # attention reads it without a copy
        return self.attn_out(causal_attention_packed(qkv, self.ops, docs).reshape(B, S, self.n_heads * self.head_dim))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_bias_gelu:
            return self.mlp_out(bias_gelu(F.linear(x, self.fc.weight), self.fc.bias, approximate="tanh"))
        return self.mlp_out(F.gelu(self.fc(x), approximate="tanh"))


class GPT(CausalLM):
    residual_out_names = ("attn_out.weight", "mlp_out.weight")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg, self.ops = cfg, cfg.ops
        self.wte = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.blocks = nn.ModuleList(GPTBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=cfg.bias)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def embed(self, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        if positions is None:
            return self.wte(x) + self.wpe.weight[: x.shape[1]]
        return self.wte(x) + self.wpe(positions)

    def head_weight(self) -> torch.Tensor:
        return self.wte.weight if self.lm_head is None else self.lm_head.weight
