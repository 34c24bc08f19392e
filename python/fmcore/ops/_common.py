"""Helpers shared by the Python side of fmcore's ops."""

from __future__ import annotations

import functools

import torch
from torch.autograd import forward_ad


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype torch.autocast runs an op on t in, or None: autocast is off on t's device, or t is
    not what autocast casts (it leaves float64 and non-float tensors alone). The ops with no autocast
    rule of their own ask it to do what the torch calls they replace do under autocast.
    (torch.is_autocast_enabled refuses device types other than these, "meta" among them.)"""
    device_type = t.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type) if t.is_floating_point() and t.dtype != torch.float64 else None


def register_fake(name: str):
    """torch.library.register_fake for fmcore::<name>, refusing a mix of meta and real tensors.

    A real meta tensor among real CPU or CUDA ones sends the call to the Meta key, whose kernel is
    the fake one: it would return uninitialized tensors on the real device (a rotary table left on
    meta after a model built on the meta device, then materialized without its non-persistent
    buffers, would give garbage, silently). torch's own meta kernels raise there; so do these.
    Fake tensors (torch.compile, FakeTensorMode) carry their real device and pass.
    """
    def register(fn):
        names = [a.name for a in getattr(torch.ops.fmcore, name).default._schema.arguments]

        @functools.wraps(fn)
        def checked(*args, **kwargs):
            devices = {}
            for arg_name, value in (*zip(names, args), *kwargs.items()):
                for t in value if isinstance(value, (list, tuple)) else (value,):
                    if isinstance(t, torch.Tensor):
                        devices.setdefault(t.device.type == "meta", (arg_name, t.device))
            if len(devices) == 2:
                (a, da), (b, db) = devices[True], devices[False]
                raise ValueError(f"expected all tensors on one device, got {a} on {da} and {b} on {db}")
            return fn(*args, **kwargs)

        torch.library.register_fake(f"fmcore::{name}")(checked)
        return fn

    return register


def expect_tensors(**named) -> None:
    """TypeError naming the first of the keyword arguments that is not a Tensor. The dispatcher's
    own errors for these name no argument ("tensor does not have a device" for a None, "There were
    no tensor arguments to this function"), and Python code reading .dim() first raises an
    AttributeError; wrappers whose per-call cost matters call this only once the op has failed."""
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"expected {name} to be a Tensor, got {type(value).__name__}")


def refuse_tangents(op: str, *inputs: torch.Tensor | None) -> None:
    """NotImplementedError when an input carries a forward-mode tangent (torch.func.jvp, forward_ad
    dual tensors). The ops registered with torch.library.register_autograd have no jvp, and when no
    input requires grad torch skips their autograd.Function (whose missing jvp would raise), so the
    tangent would be dropped silently. The C++ ops raise through the same gate
    (csrc/ops/autograd_gate.h). ~0.3 us per input; skipped while torch.compile traces."""
    if torch.compiler.is_compiling():
        return
    for t in inputs:
        if t is not None and forward_ad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(f"fmcore {op} has no forward-mode derivative (jvp): an input carries a "
                                      f"tangent (torch.func.jvp or forward_ad), which would otherwise be dropped")


def is_batched(t: torch.Tensor) -> bool:
    """Whether t is a torch.func.vmap BatchedTensor (dynamo traces the query: vmap under torch.compile too)."""
    return torch._C._functorch.is_batchedtensor(t)


def unwrap_batched(t: torch.Tensor) -> torch.Tensor:
    """The tensor below torch.func.vmap's wrappers, which autograd runs on (a BatchedTensor reports
    requires_grad False even when the tensor it wraps requires grad). Eager only: dynamo cannot trace
    get_unwrapped."""
    while is_batched(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def grad_transform_active() -> bool:
    """Whether a torch.func gradient transform (grad, vjp, jacrev, ...) is active: calls under one go
    through the op's ``func_transformable`` form. ~0.1 us when no transform is; False while
    torch.compile traces (dynamo runs the transforms itself)."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is None:
        return False
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() == torch._C._functorch.TransformType.Grad for i in retrieve_all_functorch_interpreters())


def func_transformable(op, setup_context, backward):
    """op with its autograd (the setup_context and backward registered for it with
    torch.library.register_autograd) as the apply of an autograd.Function in the split form, whose
    forward takes no ctx. torch.func's gradient transforms refuse the Function torch generates for a
    registered op (it has the combined forward(ctx, ...) form) with an error about setup_context
    that the caller cannot act on; this one they run, with the same setup_context and backward."""

    class OpFunction(torch.autograd.Function):
        generate_vmap_rule = True  # vmap over grad: per-sample gradients

        @staticmethod
        def forward(*args):
            return op(*args)

    OpFunction.setup_context = staticmethod(setup_context)
    OpFunction.backward = staticmethod(backward)
    return OpFunction.apply


def dense_last_dim(t: torch.Tensor) -> torch.Tensor:
    """t with a contiguous last dim. Autograd can hand backward expanded (stride-0) gradients."""
    return t if t.stride(-1) == 1 or t.size(-1) <= 1 else t.contiguous()


class _FirstOrderOnly(torch.autograd.Function):
    """Returns its first n arguments (gradients) under a node whose backward raises; the other
    arguments (what the gradients depend on) connect that node to the graph."""

    generate_vmap_rule = True  # a backward run under torch.func.vmap (per-sample gradients) calls it

    # forward and setup_context apart (not forward(ctx, ...)): torch.func.grad and vjp refuse the
    # combined form, with an error about overriding setup_context that the caller cannot act on.
    @staticmethod
    def forward(op, n, *args):
        return tuple(g.view_as(g) for g in args[:n])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op = inputs[0]

    @staticmethod
    def backward(ctx, *unused):
        raise NotImplementedError(
            f"fmcore {ctx.op} supports first-order gradients only: its backward has no derivative, so double "
            f"backward (differentiating a gradient taken with create_graph=True) through {ctx.op} is not implemented")


def first_order_only(op: str, backward, *inputs: torch.Tensor | None) -> tuple:
    """backward() (an op's gradient formula: a tuple of gradients, None where there is none) as the
    backward of an op with first-order gradients only; inputs: the tensors the gradients depend on.

    Under create_graph=True autograd would record the formula's own ops, and an fmcore backward op
    (which has no derivative) as a node that fails: a second derivative would come out wrong or fail
    obscurely. So the formula runs without recording, and when some input requires grad the gradients
    come out attached to a node that raises if differentiated, as the C++ autograd of the other ops
    does (csrc/ops/autograd_gate.h).
    """
    if not torch.is_grad_enabled():
        return backward()
    with torch.no_grad():
        grads = backward()
    linked = [t for t in inputs if t is not None and t.requires_grad]
    if not linked:
        return grads
    present = [i for i, g in enumerate(grads) if g is not None]
    wrapped = _FirstOrderOnly.apply(op, len(present), *(grads[i] for i in present), *linked)
    out = list(grads)
    for i, g in zip(present, wrapped):
        out[i] = g
    return tuple(out)
