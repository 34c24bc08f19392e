"""Multi-tensor ops behind ``fmcore.optim.FusedAdamW``: the global gradient norm and the fused update.

``grad_norm(tensors)`` is ``torch.nn.utils.get_total_norm(tensors)`` (the L2 norm of all elements of
all tensors) in one or a few launches, computed and kept on the device, deterministic (fixed
partial sums, summed in a fixed order). The update op, ``torch.ops.fmcore.adamw_step_``, is called by
the optimizer; its schema is documented in csrc/ops/registration.cpp. Both mutate their outputs in
place, so their fake (meta) implementations do nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fmcore.ops._common import expect_tensors, register_fake


def grad_norm(
    tensors: Sequence[torch.Tensor],
    *,
    out: torch.Tensor | None = None,
    nonfinite_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """The L2 norm of every element of ``tensors`` (fp32/bf16/fp16, contiguous, one device).

    Args:
        tensors: at least one tensor (or one tensor alone); any count and sizes.
        out: a one-element float32 tensor to write into (a fixed address, for CUDA graphs);
            allocated on the tensors' device when None.
        nonfinite_count: optional one-element int64 tensor, incremented on the device when the norm is
            inf or nan.
    Returns:
        ``out``: the norm as a 0-dim float32 tensor, never read back to the host.
    """
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]  # as torch.nn.utils.get_total_norm
    try:
        tensors = list(tensors)
    except TypeError:
        raise TypeError(f"expected tensors to be an iterable of Tensors, got {type(tensors).__name__}") from None
    if out is None:
        if not tensors:
            raise ValueError("expected at least one tensor (or an out tensor) for grad_norm")
        expect_tensors(**{"tensors[0]": tensors[0]})  # (the op's own error names a non-tensor among the rest)
        out = torch.empty((), dtype=torch.float32, device=tensors[0].device)
    torch.ops.fmcore.grad_norm_(tensors, out, nonfinite_count)
    return out


@register_fake("grad_norm_")
def _grad_norm_fake(tensors, norm, nonfinite_count=None):
    return None


@register_fake("adamw_step_")
def _adamw_step_fake(params, grads, exp_avgs, exp_avg_sqs, master_params, steps, lr_tensor, lr, beta1,
                     beta2, eps, weight_decay, grad_norm=None, max_grad_norm=None, skip_nonfinite=False):
    return None
