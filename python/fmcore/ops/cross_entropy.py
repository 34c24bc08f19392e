"""Softmax cross-entropy with fp32 math, z-loss and an in-place backward.

``cross_entropy(logits, target)`` is ``F.cross_entropy`` for (N, V) or (B, S, V) logits and class
targets: same reductions, ignore_index and label smoothing, plus PaLM's z-loss. The forward reads the
logits once and keeps only the per-row max and log-sum-exp (fp32, 8 bytes a row); the backward reads them
again and writes the gradient, into a new tensor or, with ``inplace_backward=True``, over the logits
themselves (0 bytes extra). The kernels are documented in csrc/kernels/cross_entropy.h.
"""

from __future__ import annotations

import torch

_REDUCTIONS = ("none", "mean", "sum")


def _check_common(target: torch.Tensor, reduction: str, lead_shape: torch.Size, lead_name: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"expected reduction 'none', 'mean' or 'sum', got {reduction!r}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"expected target to be a Tensor, got {type(target).__name__}")
    if target.shape != lead_shape:
        raise ValueError(f"expected target of shape {tuple(lead_shape)} (the leading dims of {lead_name}), "
                         f"got {tuple(target.shape)}")


def _reduce(loss_rows: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str,
            out_dtype: torch.dtype) -> torch.Tensor:
    """F.cross_entropy's reductions of the per-row losses (0 at ignored rows)."""
    if reduction == "none":
        loss = loss_rows.view(target.shape)
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:  # mean over the non-ignored rows; 0/0 = nan when every target is ignored, as torch
        loss = loss_rows.sum() / (target != ignore_index).sum()
    return loss.to(out_dtype)


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    z_loss: float = 0.0,
    inplace_backward: bool = False,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of logits (N, V) or (B, S, V) against class targets (N,) or (B, S).

    Matches ``F.cross_entropy(logits.view(-1, V), target.view(-1), ignore_index=...,
    label_smoothing=..., reduction=...)``: the loss has the logits' dtype, "mean" divides by the
    number of non-ignored targets (nan when all are ignored, as torch), "none" has target's shape.

    Args:
        logits: float32, bfloat16 or float16 (float64 too on the CPU); the last dim must be
            contiguous. Math is fp32 whatever the dtype, with a stable log-sum-exp (logits of
            magnitude 1e4 are fine).
        target: int64 or int32 class indices in [0, V), or ignore_index.
        label_smoothing: as torch: (1 - eps) * nll + eps * (mean over classes of -log p).
        z_loss: adds z_loss * lse**2 to each non-ignored row's loss (PaLM), before the reduction.
        inplace_backward: the backward writes the gradient over the logits buffer instead of a new
            (N, V) tensor. The logits are garbage after backward: do not read them, and do not use
            this when another op saved the logits for its own backward.
        return_lse: also return the per-row log-sum-exp (fp32, target's shape, 0 at ignored rows,
            detached), e.g. to log the z-loss term ``z_loss * (lse[target != ignore_index] ** 2).mean()``.

    Raises ValueError naming the argument for bad dtypes/shapes/options, RuntimeError for mixed
    devices, and ValueError for a target outside [0, V) that is not ignore_index. That check costs
    one 8-byte device-to-host read per call, after the forward kernel (a stream synchronisation:
    the host waits for the forward to finish before it queues the backward); nothing else. It is
    skipped while a CUDA graph is captured, where the kernel still never indexes with a bad target.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"expected logits to be a Tensor, got {type(logits).__name__}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"expected logits of shape (N, V) or (B, S, V), got {tuple(logits.shape)}")
    _check_common(target, reduction, logits.shape[:-1], "logits")
    vocab = logits.shape[-1]
    loss_rows, stats = torch.ops.fmcore.cross_entropy_fwd(
        logits.reshape(-1, vocab), target.reshape(-1), ignore_index, label_smoothing, z_loss, inplace_backward)
    loss = _reduce(loss_rows, target, ignore_index, reduction, logits.dtype)
    if return_lse:
        return loss, stats.detach().sum(-1).view(target.shape)
    return loss


@torch.library.register_fake("fmcore::cross_entropy_fwd")
def _cross_entropy_fwd_fake(logits, target, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                            inplace_backward=False):
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.new_empty((logits.shape[0],), dtype=acc), logits.new_empty((logits.shape[0], 2), dtype=acc)


@torch.library.register_fake("fmcore::cross_entropy_bwd")
def _cross_entropy_bwd_fake(logits, target, stats, grad_loss, ignore_index=-100, label_smoothing=0.0,
                            z_loss=0.0):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("fmcore::cross_entropy_bwd_")
def _cross_entropy_bwd_inplace_fake(logits, target, stats, grad_loss, ignore_index=-100,
                                    label_smoothing=0.0, z_loss=0.0):
    return None


@torch.library.register_fake("fmcore::cross_entropy_fwd_bwd_")
def _cross_entropy_fwd_bwd_fake(logits, target, grad_scale, ignore_index=-100, label_smoothing=0.0,
                                z_loss=0.0):
    return _cross_entropy_fwd_fake(logits, target)


def _setup_context(ctx, inputs, output):
    logits, target, ignore_index, label_smoothing, z_loss, inplace_backward = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.options = (ignore_index, label_smoothing, z_loss)
    ctx.inplace_backward = inplace_backward


def _backward(ctx, grad_loss, grad_stats):
    # grad_stats is ignored: the public function returns lse detached.
    logits, target, stats = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None, None
    if ctx.inplace_backward:
        torch.ops.fmcore.cross_entropy_bwd_(logits, target, stats, grad_loss, *ctx.options)
        grad = logits
    else:
        grad = torch.ops.fmcore.cross_entropy_bwd(logits, target, stats, grad_loss, *ctx.options)
    return grad, None, None, None, None, None


torch.library.register_autograd("fmcore::cross_entropy_fwd", _backward, setup_context=_setup_context)
