"""Linear cross-entropy: ``F.cross_entropy(hidden @ weight.T + bias, target)`` without the logits.

The lm-head matmul and the loss run chunk by chunk over the tokens (csrc/ops/linear_cross_entropy.cpp):
no more than one (chunk, V) block of logits exists at a time, and its gradient is computed in place
by fmcore's cross-entropy kernel during the forward, then folded into grad_hidden, grad_weight and
grad_bias with two matmuls per chunk. The backward only multiplies those by grad_output, so the
logits matmul is never recomputed (except for reduction="none", whose per-row factors only the
backward knows: there the backward runs the chunk loop again).
"""

from __future__ import annotations

import torch

from fmcore.ops._common import (autocast_dtype, expect_tensors, first_order_only, func_transformable,
                                grad_transform_active, is_batched, refuse_tangents, register_fake, unwrap_batched)
from fmcore.ops.cross_entropy import _check_common

_REDUCTION_CODE = {"none": 0, "mean": 1, "sum": 2}


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    z_loss: float = 0.0,
    chunk_size: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``hidden @ weight.T + bias`` against target, never holding all the logits.

    Args:
        hidden: (N, D) or (B, S, D), float32/bfloat16/float16 (float64 too on the CPU).
        weight: (V, D), hidden's dtype and device; may be shared with an input embedding (tied):
            autograd adds this op's gradient to the embedding's.
        target: (N,) or (B, S), int64 or int32, in [0, V) or ignore_index.
        bias: optional (V,), hidden's dtype.
        ignore_index, label_smoothing, reduction, z_loss: as ``fmcore.ops.cross_entropy``.
        chunk_size: rows of logits per chunk. Default: as many rows as fit in 112 MiB of logits
            (rows = 112 MiB // (V * element size)), so the peak memory above the inputs is the
            gradients this op returns plus under 128 MiB; on the CPU, rows for ~16 MiB of logits
            but at least D / 2 (faster there; csrc/ops/linear_cross_entropy.cpp has the numbers).
            Rounded down to a multiple of 64 when > 128, at most N. Larger chunks: fewer, larger
            matmuls and fewer roundings of grad_weight (which is read and written once per chunk).
        return_lse: also return the per-row log-sum-exp (fp32, float64 for float64 hidden; detached,
            0 at ignored rows).

    Under torch.autocast, hidden, weight and bias are cast to the autocast dtype first (as
    F.linear's inputs would be; their gradients flow back through the casts) and the loss is
    float32 (as autocast's F.cross_entropy); float64 inputs are left alone, as autocast does.

    Gradients: with reduction "mean" or "sum" and any input requiring grad, the forward computes
    them (grad_weight accumulates across chunks in weight's dtype) and the backward scales them by
    grad_output; the backward can therefore run once per forward (no retain_graph). With nothing
    requiring grad (or under no_grad) the forward does the matmul and the loss only. The target
    check costs what fmcore.ops.cross_entropy's does, once per call: queued before the first chunk
    and waited for after the last one is queued, so the host's wait never empties the GPU's queue.
    """
    expect_tensors(hidden=hidden, weight=weight, **({} if bias is None else {"bias": bias}))
    refuse_tangents("linear_cross_entropy", hidden, weight, bias)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"expected hidden of shape (N, D) or (B, S, D), got {tuple(hidden.shape)}")
    _check_common(target, reduction, hidden.shape[:-1], "hidden")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"expected chunk_size to be a positive int or None, got {chunk_size!r}")
    out_dtype = hidden.dtype
    # What F.linear would do: the matmuls in the autocast dtype (float64 stays float64).
    dtype = autocast_dtype(hidden)
    if dtype is not None:
        out_dtype = torch.float32  # autocast's cross_entropy is fp32
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    grad = torch.is_grad_enabled()
    need = (grad and _requires_grad(hidden), grad and _requires_grad(weight),
            grad and bias is not None and _requires_grad(bias))
    op = _linear_cross_entropy_func if grad_transform_active() else torch.ops.fmcore.linear_cross_entropy
    loss, lse, _, _, _ = op(
        hidden.reshape(-1, hidden.shape[-1]), weight, target.reshape(-1), bias, None, ignore_index,
        label_smoothing, z_loss, _REDUCTION_CODE[reduction], chunk_size or 0, *need)
    loss = (loss.view(target.shape) if reduction == "none" else loss).to(out_dtype)
    if return_lse:
        return loss, lse.detach().view(target.shape)
    return loss


def _requires_grad(t: torch.Tensor) -> bool:
    """t.requires_grad, looking through torch.func.vmap's wrappers: a BatchedTensor reports False even
    when the tensor it wraps requires grad (autograd runs below vmap, on each slice), and the forward
    would compute no gradient for it (it came out None, silently)."""
    if is_batched(t) and torch.compiler.is_compiling():
        return True  # dynamo cannot trace get_unwrapped; an unneeded gradient only costs time
    return unwrap_batched(t).requires_grad


@register_fake("linear_cross_entropy")
def _linear_cross_entropy_fake(hidden, weight, target, bias=None, grad_rows=None, ignore_index=-100,
                               label_smoothing=0.0, z_loss=0.0, reduction=1, chunk_size=0,
                               grad_hidden=False, grad_weight=False, grad_bias=False):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    n = hidden.shape[0]
    if reduction == 0 and grad_rows is None:  # as the op: the forward of "none" computes no gradient
        grad_hidden = grad_weight = grad_bias = False
    loss = hidden.new_empty((n,) if reduction == 0 else (), dtype=acc)
    lse = hidden.new_empty((n,), dtype=acc)
    grad_bias = grad_bias and bias is not None
    return (loss, lse, hidden.new_empty(hidden.shape if grad_hidden else (0,)),
            hidden.new_empty(weight.shape if grad_weight else (0,)),
            hidden.new_empty((weight.shape[0],) if grad_bias else (0,)))


def _setup_context(ctx, inputs, output):
    hidden, weight, target, bias, _, ignore_index, label_smoothing, z_loss, reduction, chunk_size, *need = inputs
    # The outputs other than the loss never receive a gradient; autograd would otherwise hand the
    # backward zeros of their shapes, a second grad_hidden and grad_weight allocated while the first
    # are alive (the 2x-gradients peak of the N8192 V128256 benchmark).
    ctx.set_materialize_grads(False)
    ctx.reduction, ctx.need = reduction, tuple(need)
    if reduction == 0:  # the backward recomputes with its per-row factors
        ctx.save_for_backward(hidden, weight, target, bias)
        ctx.options = (ignore_index, label_smoothing, z_loss, reduction, chunk_size)
    else:
        ctx.save_for_backward(*output[2:])
        ctx.used = False


def _scale_(grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """grad *= factor (a 0-dim tensor) in place, by the cross-entropy scale kernel, which reads the
    factor on the device and moves no data when it is 1 (after loss.backward()): a plain mul_ read
    and wrote every gradient (198 us a step at N16384 D768 V50304 on the H200, ~0.6 ms at V128256
    D4096)."""
    rows = grad.view(-1, grad.shape[-1])
    torch.ops.fmcore.cross_entropy_scale_(rows, factor.expand(rows.shape[0]))
    return grad


def _backward(ctx, grad_loss, *unused):
    # Only the loss is differentiable: lse and the gradient outputs are internal.
    nh, nw, nb = ctx.need
    if grad_loss is None:
        return (None,) * 13
    # hidden, weight, target, bias lead; traced (torch.compile) contexts list no trailing non-tensors.
    needs = (*ctx.needs_input_grad[:2], len(ctx.needs_input_grad) > 3 and ctx.needs_input_grad[3])
    if (needs[0] and not nh) or (needs[1] and not nw) or (needs[2] and not nb):
        # A None here would be taken for a zero gradient: refuse rather than drop it silently.
        raise RuntimeError("linear_cross_entropy: autograd needs a gradient the forward did not compute "
                           f"(the forward saw requires_grad hidden={nh}, weight={nw}, bias={nb}; autograd "
                           f"needs hidden={needs[0]}, weight={needs[1]}, bias={needs[2]})")
    if ctx.reduction == 0:
        hidden, weight, target, bias = ctx.saved_tensors
        depends_on = (grad_loss, hidden, weight, bias)

        def grads():
            return torch.ops.fmcore.linear_cross_entropy(hidden, weight, target, bias, grad_loss, *ctx.options,
                                                         nh, nw, nb)[2:]
    else:
        if ctx.used:
            raise RuntimeError("linear_cross_entropy's backward can run once per forward: its gradients "
                               "were computed in the forward and are consumed (use retain_graph=False, "
                               "or reduction='none')")
        ctx.used = True
        # The saved gradients are outputs of this op: they link the raising node to its inputs, which
        # are not saved (the hidden states' memory stays free until the backward). Unpacked once:
        # torch.utils.checkpoint (non-reentrant) refuses a second unpack of a recomputed tensor.
        saved = ctx.saved_tensors
        depends_on = (grad_loss, *saved)

        def grads():
            # The forward computed d(loss)/d(inputs); the chain rule multiplies by grad_output, in place
            # in eager (these buffers are ours and die with the graph). A traced backward (torch.compile,
            # opcheck) must not mutate its saved inputs: there it multiplies out of place, and inductor
            # may reuse the dead buffer itself. So does one under torch.func's transforms, whose
            # wrapped tensors the in-place scale kernel cannot take (no batching rule).
            traced = (torch.compiler.is_compiling() or type(grad_loss) is not torch.Tensor
                      or any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in depends_on if t is not None))
            return tuple(g * grad_loss if traced else _scale_(g, grad_loss) if needed else g
                         for g, needed in zip(saved, ctx.need))

    gh, gw, gb = first_order_only("linear_cross_entropy", grads, *depends_on)
    return (gh if nh else None, gw if nw else None, None, gb if nb else None) + (None,) * 9


torch.library.register_autograd("fmcore::linear_cross_entropy", _backward, setup_context=_setup_context)
# Under torch.func's gradient transforms: the same op and autograd in the form they accept.
_linear_cross_entropy_func = func_transformable(torch.ops.fmcore.linear_cross_entropy, _setup_context, _backward)
