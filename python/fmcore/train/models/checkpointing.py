"""Activation checkpointing of the blocks (train.activation_checkpointing): which blocks the backward
recomputes, and selective checkpointing's per-op policy.

    block.checkpointing = block_mode("selective", i)  # CausalLM.activation_checkpointing, for block i
    h, residual = run_block(block._stream, block.checkpointing, h, residual, positions, docs)  # its forward

"full" keeps a block's inputs and recomputes all of it in the backward. "selective" (torchtitan's
per-op selective checkpointing) keeps the outputs of the ops that are expensive to recompute (the
matmuls, attention) and recomputes the cheap ones between them (norms, RoPE, GELU /
SwiGLU, residual adds, casts), which are memory-bound: their recompute costs memory traffic, no
matmul FLOPs, where "full" repeats the block's forward (a third more FLOPs). The policy sees ops
below autograd, in the dispatcher: F.linear arrives as aten mm/addmm (aten.linear itself never
does: it decomposes above), fmcore's attention as fmcore::flash_attn_fwd, and under torch.compile
the same ops, in its graph (where the partitioner follows the policy's tags).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts


def _overloads(namespace: str, names: tuple[str, ...]) -> set:
    """The .default overloads of the ops that exist in this build (an SDPA backend may not)."""
    ns = getattr(torch.ops, namespace)
    found = set()
    for name in names:
        try:
            found.add(getattr(ns, name).default)
        except AttributeError:
            pass
    return found


@functools.cache
def saved_ops() -> frozenset:
    """The ops whose outputs selective checkpointing keeps for the backward (all others recompute)."""
    matmuls = ("mm", "addmm", "bmm", "baddbmm")  # (bmm: SDPA's math fallback keeps its S x S scores, as "none" does)
    sdpa = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
            "_scaled_dot_product_fused_attention_overrideable")
    fmcore = (
        # out and lse: the backward reads both, and recomputing them is a second attention forward
        # (O(S^2) work, the most expensive op per byte of output in the block).
        "flash_attn_fwd",
        # Outside the blocks today (the loss follows the final norm), so never inside a checkpoint; kept
        # should a caller checkpoint the head: the op's forward already computed the gradients of hidden
        # and weight (the model's largest matmul, twice), and recomputing it would do all of it again.
        "linear_cross_entropy",
        # Also outside the blocks: its outputs are 3 floats per row, recomputing it reads all (N, V) logits.
        "cross_entropy_fwd",
        # Not kept, recomputed: add_norm_fwd, rope, bias_gelu and swiglu read and write a few bytes per
        # flop (memory-bound), and their outputs (d or ffn per token) are what selective sets out not
        # to store; the matmul outputs they read are kept, so their recompute needs nothing else.
    )
    # Not kept: tensor parallelism's all-reduces. Without sequence parallelism their outputs are whole
    # (tokens, dim) tensors on every rank, beside the partial sums the row-parallel matmuls keep: kept,
    # they made selective keep as much as "none" at parallel.tensor 2 (GPT-2 124M, bf16; plan.py).
    # The recompute sends the attention projection's all-reduce again instead, once per block, as
    # "full" does (the recompute stops before the MLP's: the backward reads nothing after it).
    return frozenset(_overloads("aten", matmuls + sdpa) | _overloads("fmcore", fmcore))


def _selective_policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    # A function of the op alone: torch before 2.14 asks again during the recompute and must get the
    # same answer (no counters, unlike torchtitan's every-other-matmul policy).
    return CheckpointPolicy.MUST_SAVE if func in saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


# A fresh (forward, recompute) pair of dispatch modes, with its own cache, for each checkpointed call.
_selective_contexts = functools.partial(create_selective_checkpoint_contexts, _selective_policy)


def block_mode(mode: str, index: int) -> str:
    """"none", "full" or "selective" for block ``index`` under a normalised mode (config.checkpointing_mode):
    "N" checkpoints blocks 0, N, 2N, ... fully and leaves the rest alone."""
    if mode.isdigit():
        return "full" if index % int(mode) == 0 else "none"
    return mode


def run_block(fn, mode: str, *args):
    """fn(*args) (a block's computation), its activations stored ("none"), or recomputed in the
    backward, all ("full") or the cheap ops ("selective")."""
    if mode == "full":
        return checkpoint(fn, *args, use_reentrant=False)
    if mode == "selective":
        return checkpoint(fn, *args, use_reentrant=False, context_fn=_selective_contexts)
    return fn(*args)
