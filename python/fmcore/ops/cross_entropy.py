"""Softmax cross-entropy with fp32 math, z-loss and an in-place backward.

``cross_entropy(logits, target)`` is ``F.cross_entropy`` for (N, V) or (B, S, V) logits and class
targets: same reductions, ignore_index and label smoothing, plus PaLM's z-loss. The forward reads the
logits once and keeps only the per-row max and log-sum-exp (fp32, 8 bytes a row); the backward reads
them again and writes the gradient into a new tensor. With ``inplace_backward=True`` the gradient
goes over the logits themselves (0 bytes extra) and, for mean/sum in eager mode, is written by the
forward's own kernel, so the logits cross HBM once each way. The kernels are documented in
csrc/kernels/cross_entropy.h.
"""

from __future__ import annotations

import torch

from fmcore.ops._common import (autocast_dtype, expect_tensors, first_order_only, func_transformable,
                                grad_transform_active, is_batched, refuse_tangents, register_fake)

_REDUCTIONS = ("none", "mean", "sum")


def _check_common(target: torch.Tensor, reduction: str, lead_shape: torch.Size, lead_name: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"expected reduction 'none', 'mean' or 'sum', got {reduction!r}")
    expect_tensors(target=target)
    if target.shape != lead_shape:
        raise ValueError(f"expected target of shape {tuple(lead_shape)} (the leading dims of {lead_name}), "
                         f"got {tuple(target.shape)}")


def _counted(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """target != ignore_index, without ignore_index wrapping into an int32 target's range (where
    torch would compare it): the kernels compare in int64, so 2**32 ignores nothing, not index 0."""
    if target.dtype == torch.int32 and not -2**31 <= ignore_index < 2**31:
        return torch.ones_like(target, dtype=torch.bool)
    return target != ignore_index


def _reduce(loss_rows: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str,
            out_dtype: torch.dtype) -> torch.Tensor:
    """F.cross_entropy's reductions of the per-row losses (0 at ignored rows)."""
    if reduction == "none":
        loss = loss_rows.view(target.shape)
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:  # mean over the non-ignored rows; 0/0 = nan when every target is ignored, as torch
        loss = loss_rows.sum() / _counted(target, ignore_index).sum()
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
    label_smoothing=..., reduction=...)``: the loss has the logits' dtype (float32 under autocast,
    as torch's), "mean" divides by the number of non-ignored targets (nan when all are ignored, as
    torch), "none" has target's shape.

    Args:
        logits: float32, bfloat16 or float16 (float64 too on the CPU); the last dim must be
            contiguous. Math is fp32 whatever the dtype (fp64 for float64 logits), with a stable
            log-sum-exp (logits of magnitude 1e4 are fine).
        target: int64 or int32 class indices in [0, V), or ignore_index. Rows whose target is
            ignore_index are not read: their loss and gradient are exactly 0 even where their logits
            hold NaN or inf (torch's gradient there is NaN: its log_softmax backward multiplies the
            row's zero gradient by NaN). So are rows whose grad_output is exactly 0 (reduction "none").
        label_smoothing: as torch: (1 - eps) * nll + eps * (mean over classes of -log p).
        z_loss: adds z_loss * lse**2 to each non-ignored row's loss (PaLM), before the reduction.
        inplace_backward: the gradient goes over the logits buffer instead of a new (N, V) tensor.
            With reduction mean/sum in eager mode the forward already writes it there, in the same
            kernel that computes the loss (the logits are read once and written once in all), and
            the backward only scales it by grad_output in place, skipping rows whose factor is
            exactly 1 (so after ``loss.backward()`` it moves no data). Otherwise (reduction "none",
            torch.compile) the backward computes it over the logits. Either way: the logits are
            garbage after the call (forward) or the backward, do not read them, do not use this
            when another op saved the logits for its own backward, and run backward once. For leaf
            logits, ``.grad`` shares the logits' storage. Under torch.func's transforms (vmap, grad)
            the gradient is computed out of place, as with False.
        return_lse: also return the per-row log-sum-exp (fp32, float64 for float64 logits; target's
            shape, 0 at ignored rows, detached), e.g. to log the z-loss term
            ``z_loss * (lse[target != ignore_index] ** 2).mean()``.

    Raises ValueError naming the argument for bad dtypes/shapes/options, RuntimeError for mixed
    devices, and ValueError for a target outside [0, V) that is not ignore_index. That check costs
    one small launch that reads the N targets and an 8-byte copy to pinned memory, both queued
    before the loss kernel; the host then waits for that copy, not for the loss kernel (already
    queued behind it, so the GPU does not go idle). The host does wait for the work queued before
    the call: it cannot run ahead of the GPU past a cross_entropy call. The error comes after the
    loss kernel was queued (with inplace_backward it overwrites the logits all the same). The check
    is skipped while a CUDA graph is captured, where the kernel still never indexes with a bad target.
    """
    expect_tensors(logits=logits)
    refuse_tangents("cross_entropy", logits)
    if logits.dim() not in (2, 3):
        raise ValueError(f"expected logits of shape (N, V) or (B, S, V), got {tuple(logits.shape)}")
    _check_common(target, reduction, logits.shape[:-1], "logits")
    vocab = logits.shape[-1]
    x, t = logits.reshape(-1, vocab), target.reshape(-1)
    # Autocast runs F.cross_entropy in fp32 (CPU and CUDA): its loss is fp32 for bf16/fp16 logits.
    out_dtype = logits.dtype if autocast_dtype(logits) is None else torch.float32
    # Under torch.func's gradient transforms: the op's autograd in the form they accept, and no
    # gradient written over logits (the tensor the transform wraps is the caller's).
    func = grad_transform_active()
    # Under torch.func.vmap (autograd outside it) the op runs once per sample, each call saving a view
    # of the one logits buffer: the first sample's backward written over its view bumped the version
    # the others saved, and the backward raised "modified by an inplace operation". Batched logits
    # are computed out of place, as under the gradient transforms.
    if inplace_backward and (func or is_batched(logits)):
        inplace_backward = False
    if (inplace_backward and reduction != "none" and torch.is_grad_enabled() and logits.requires_grad
            and not torch.compiler.is_compiling()):
        loss, stats = _FusedInplace.apply(x, t, ignore_index, label_smoothing, z_loss, reduction == "mean")
        loss = loss.to(out_dtype)
    else:
        fwd = _cross_entropy_fwd_func if func else torch.ops.fmcore.cross_entropy_fwd
        loss_rows, stats = fwd(x, t, ignore_index, label_smoothing, z_loss, inplace_backward)
        loss = _reduce(loss_rows, target, ignore_index, reduction, out_dtype)
    if return_lse:
        return loss, stats.detach().sum(-1).view(target.shape)
    return loss


class _FusedInplace(torch.autograd.Function):
    """inplace_backward for reduction mean/sum in eager mode: one kernel computes the loss and
    writes d(loss)/d(logits) over the logits; the backward multiplies by grad_output in place."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, label_smoothing, z_loss, mean):
        n = logits.shape[0]
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        counted = _counted(target, ignore_index)
        if mean:
            count = counted.sum().to(acc)
            # inf when every target is ignored: ignored rows get 0 without being multiplied
            scale = count.reciprocal().expand(n)
        else:
            scale = torch.ones((), dtype=acc, device=logits.device).expand(n)
        before = logits._version
        loss_rows, stats = torch.ops.fmcore.cross_entropy_fwd_bwd_(logits, target, scale, ignore_index,
                                                                   label_smoothing, z_loss)
        _count_own_writes(logits, before)
        loss = loss_rows.sum() / count if mean else loss_rows.sum()  # 0/0 = nan when all ignored, as torch
        ctx.grad = logits  # holds the gradient now (an attribute, not saved: it was written)
        # ... so autograd's version check does not cover it: an in-place edit of the logits (or of
        # the tensor they view) between here and the backward would be scaled and returned as the
        # gradient, silently. Checked by hand in the backward.
        ctx.version = _others_writes(logits)
        ctx.counted = counted
        ctx.used = False
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)  # no (N, 2) zeros for the stats' gradient, which is ignored
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        if grad_loss is None:
            return (None,) * 6
        if ctx.used:
            raise RuntimeError("cross_entropy(inplace_backward=True)'s backward can run once per forward: the "
                               "gradient lives in the logits buffer and is scaled in place")
        if _others_writes(ctx.grad) != ctx.version:
            raise RuntimeError("cross_entropy(inplace_backward=True): the logits were modified in place after the "
                               "forward, which wrote the gradient over them (the logits are not to be used after "
                               "the call); edit a copy, or use inplace_backward=False")
        ctx.used = True

        def grads():
            # Ignored rows hold zeros and keep them whatever grad_loss is (0 * nan would be nan; torch gives 0).
            factor = torch.where(ctx.counted, grad_loss, torch.zeros_like(grad_loss))
            before = ctx.grad._version
            torch.ops.fmcore.cross_entropy_scale_(ctx.grad, factor)
            _count_own_writes(ctx.grad, before)
            return (ctx.grad,)

        (grad,) = first_order_only("cross_entropy", grads, grad_loss, ctx.grad)
        return grad, None, None, None, None, None


def _root(t: torch.Tensor) -> torch.Tensor:
    return t if t._base is None else t._base


def _count_own_writes(t: torch.Tensor, before: int) -> None:
    """Counts _FusedInplace's own in-place writes to t (its forward's gradient, its backward's scaling) on the
    tensor t views, whose version counter t and all its views share: the loss computed in chunks, slices of
    one logits buffer each in its own call, bumped the version every other chunk's backward checks."""
    root = _root(t)
    root._fmcore_ce_writes = getattr(root, "_fmcore_ce_writes", 0) + t._version - before


def _others_writes(t: torch.Tensor) -> int:
    """The in-place writes to t's memory (or its base's) other than _FusedInplace's own."""
    return t._version - getattr(_root(t), "_fmcore_ce_writes", 0)


@register_fake("cross_entropy_scale_")
def _cross_entropy_scale_fake(grad, factor):
    return None


@register_fake("cross_entropy_fwd")
def _cross_entropy_fwd_fake(logits, target, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                            inplace_backward=False):
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.new_empty((logits.shape[0],), dtype=acc), logits.new_empty((logits.shape[0], 2), dtype=acc)


@register_fake("cross_entropy_bwd")
def _cross_entropy_bwd_fake(logits, target, stats, grad_loss, ignore_index=-100, label_smoothing=0.0,
                            z_loss=0.0):
    return logits.new_empty(logits.shape)


@register_fake("cross_entropy_bwd_")
def _cross_entropy_bwd_inplace_fake(logits, target, stats, grad_loss, ignore_index=-100,
                                    label_smoothing=0.0, z_loss=0.0):
    return None


@register_fake("cross_entropy_fwd_bwd_")
def _cross_entropy_fwd_bwd_fake(logits, target, grad_scale, ignore_index=-100, label_smoothing=0.0,
                                z_loss=0.0):
    return _cross_entropy_fwd_fake(logits, target)


def _setup_context(ctx, inputs, output):
    logits, target, ignore_index, label_smoothing, z_loss, inplace_backward = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.options = (ignore_index, label_smoothing, z_loss)
    ctx.inplace_backward = inplace_backward
    ctx.used = False
    ctx.set_materialize_grads(False)  # the stats get no gradient: no (N, 2) zeros for the backward


def _backward(ctx, grad_loss, grad_stats):
    # grad_stats is ignored: the public function returns lse detached.
    if grad_loss is None:
        return None, None, None, None, None, None
    if ctx.inplace_backward and ctx.used:
        # The gradient is written over the saved logits. A second backward (retain_graph) would read
        # it as the logits: the version check raises a message about an inplace operation the caller
        # did not write, and under saved-tensor hooks (save_on_cpu, CPU offloading), which skip that
        # check, the second gradient came out wrong, silently.
        raise RuntimeError("cross_entropy(inplace_backward=True)'s backward can run once per forward: the "
                           "gradient is written over the saved logits")
    logits, target, stats = ctx.saved_tensors
    ctx.used = ctx.inplace_backward

    def grads():
        if ctx.inplace_backward:
            torch.ops.fmcore.cross_entropy_bwd_(logits, target, stats, grad_loss, *ctx.options)
            return (logits,)
        return (torch.ops.fmcore.cross_entropy_bwd(logits, target, stats, grad_loss, *ctx.options),)

    (grad,) = first_order_only("cross_entropy", grads, grad_loss, logits)
    return grad, None, None, None, None, None


torch.library.register_autograd("fmcore::cross_entropy_fwd", _backward, setup_context=_setup_context)
_cross_entropy_fwd_func = func_transformable(torch.ops.fmcore.cross_entropy_fwd, _setup_context, _backward)
