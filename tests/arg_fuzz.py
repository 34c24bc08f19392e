"""Argument fuzzing for every fmcore op: a valid call of each, then the same call with one argument
changed at a time (another dtype, shape, layout, device, value range; None; out-of-range scalars).

An op given a bad argument must raise a Python exception (never crash, never fault on the device,
never trip an internal assertion), and an op that accepts a changed argument must not write into its
read-only inputs. Used on the ops' CPU and CUDA implementations (tests/ops/test_argument_fuzz.py) and
on the CUDA bindings run by the simulator (tests/cudasim/test_argument_fuzz_on_cpu.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# What a rejected argument may raise: the ops' checks raise ValueError / TypeError /
# NotImplementedError (TORCH_CHECK_VALUE / _TYPE / _NOT_IMPLEMENTED), the dispatcher RuntimeError
# (a wrong argument type, a dispatch key with no kernel).
ALLOWED = (ValueError, TypeError, NotImplementedError, RuntimeError)
# Messages that mean a check was missing, whatever the exception type.
FORBIDDEN = ("INTERNAL ASSERT FAILED", "CUDA error", "illegal memory access", "device-side assert",
             "misaligned address", "fmsim")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.bool,
          torch.uint8, torch.complex64]


@dataclass
class Call:
    name: str
    op: object  # a torch.ops OpOverload
    args: list

    def mutable(self, i: int) -> bool:
        return self.op._schema.arguments[i].is_write


def seed_calls(ops, device, attention_dtype=torch.float32, with_lce: bool = True) -> list[Call]:
    """One valid call of each op of the namespace `ops` (torch.ops.fmcore, or the simulator's), with
    small awkward shapes; attention in attention_dtype (its CUDA kernels take bf16/fp16 only)."""
    dev = dict(device=device)
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype=dtype, **dev)

    calls = []
    q, k, v = rand(2, 5, 4, 16), rand(2, 5, 2, 16), rand(2, 5, 2, 16)
    cos, sin = rand(5, 8), rand(5, 8)
    calls += [Call("rope", ops.rope.default, [q, k, cos, sin, False, False, 1]),
              Call("rope_", ops.rope_.default, [q, k, cos, sin, True, False, 1])]
    logits = rand(6, 11)
    target = torch.randint(0, 11, (6,), generator=g).to(**dev)
    target[2] = -100
    _, stats = ops.cross_entropy_fwd(logits, target, -100, 0.1, 1e-3, False)
    ones = torch.ones(6, **dev)
    calls += [Call("ce_fwd", ops.cross_entropy_fwd.default, [logits, target, -100, 0.1, 1e-3, False]),
              Call("ce_bwd", ops.cross_entropy_bwd.default, [logits, target, stats, ones, -100, 0.1, 1e-3]),
              Call("ce_bwd_", ops.cross_entropy_bwd_.default, [logits, target, stats, ones, -100, 0.1, 1e-3]),
              Call("ce_fwd_bwd_", ops.cross_entropy_fwd_bwd_.default, [logits, target, ones, -100, 0.0, 0.0]),
              Call("ce_scale_", ops.cross_entropy_scale_.default, [logits, ones * 2])]
    if with_lce:
        h, w, b = rand(6, 8), rand(11, 8), rand(11)
        calls += [Call("lce", ops.linear_cross_entropy.default,
                       [h, w, target, b, None, -100, 0.1, 1e-3, 1, 0, True, True, True]),
                  Call("lce_rows", ops.linear_cross_entropy.default,
                       [h, w, target, b, ones, -100, 0.0, 0.0, 0, 4, True, True, True])]
    params, grads = [rand(3, 4), rand(5)], [rand(3, 4), rand(5)]
    zeros = lambda: [torch.zeros_like(p) for p in params]  # noqa: E731
    steps = [torch.zeros(1, **dev), torch.zeros(1, **dev)]
    calls += [Call("grad_norm_", ops.grad_norm_.default,
                   [grads, torch.zeros(1, **dev), torch.zeros(1, dtype=torch.int64, **dev)]),
              Call("adamw", ops.adamw_step_.default,
                   [params, grads, zeros(), zeros(), [], steps, None, 1e-3, 0.9, 0.999, 1e-8, 0.01,
                    torch.ones(1, **dev), 1.0, True])]
    bf = rand(3, 4, dtype=torch.bfloat16)
    calls.append(Call("adamw_master", ops.adamw_step_.default,
                      [[bf], [rand(3, 4, dtype=torch.bfloat16)], [torch.zeros(3, 4, **dev)], [torch.zeros(3, 4, **dev)],
                       [bf.float()], [torch.zeros(1, **dev)], torch.full((1,), 1e-3, **dev), 1e-3, 0.9, 0.999, 1e-8,
                       0.01, None, None, False]))
    adt = attention_dtype
    q, k, v = rand(2, 5, 4, 64, dtype=adt), rand(2, 5, 2, 64, dtype=adt), rand(2, 5, 2, 64, dtype=adt)
    out, lse = ops.flash_attn_fwd(q, k, v, None, None, 0, 0, True, 0.125, False, 0)
    dout = rand(*out.shape, dtype=adt)
    calls += [Call("attn_fwd", ops.flash_attn_fwd.default, [q, k, v, None, None, 0, 0, True, 0.125, False, 0]),
              Call("attn_bwd", ops.flash_attn_bwd.default,
                   [dout, q, k, v, out, lse, torch.zeros_like(lse), None, None, 0, 0, True, 0.125, False, 0])]
    qv, kv, vv = rand(7, 4, 64, dtype=adt), rand(7, 2, 64, dtype=adt), rand(7, 2, 64, dtype=adt)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, **dev)
    outv, lsev = ops.flash_attn_fwd(qv, kv, vv, cu, cu, 4, 4, True, 0.125, False, 0)
    calls += [Call("attn_fwd_varlen", ops.flash_attn_fwd.default, [qv, kv, vv, cu, cu, 4, 4, True, 0.125, False, 0]),
              Call("attn_bwd_varlen", ops.flash_attn_bwd.default,
                   [rand(*outv.shape, dtype=adt), qv, kv, vv, outv, lsev, None, cu, cu, 4, 4, False, 0.125, False,
                    0])]
    qkv = rand(2, 5, 3, 4, 64, dtype=adt)
    o2, l2 = ops.flash_attn_fwd(*qkv.unbind(2), None, None, 0, 0, True, 0.125, False, 0)
    calls.append(Call("attn_qkv_bwd", ops.flash_attn_qkvpacked_bwd.default,
                      [rand(*o2.shape, dtype=adt), qkv, o2, l2, None, None, 0, True, 0.125, False, 0]))
    x, r, wt, bs = rand(2, 3, 8), rand(2, 3, 8), rand(8), rand(8)
    f32 = torch.float32
    o, s, mean, rstd = ops.add_norm_fwd(x, r, wt, bs, 1e-5, False, f32)
    calls += [Call("norm_fwd", ops.add_norm_fwd.default, [x, r, wt, bs, 1e-5, False, f32]),
              Call("norm_bwd", ops.add_norm_bwd.default,
                   [rand(2, 3, 8), rand(2, 3, 8), s, wt, mean, rstd, False, True, True, f32, f32, True, True])]
    _, _, _, rstd = ops.add_norm_fwd(x, None, wt, None, 1e-5, True, torch.bfloat16)
    calls += [Call("rms_bwd", ops.add_norm_bwd.default,
                   [rand(2, 3, 8, dtype=torch.bfloat16), None, x, wt, torch.zeros(0, **dev), rstd, True, False, False,
                    f32, None, True, True]),
              Call("gelu", ops.bias_gelu.default, [x, bs, True]),
              Call("gelu_bwd", ops.bias_gelu_bwd.default, [rand(2, 3, 8), x, bs, True, True]),
              Call("swiglu", ops.swiglu.default, [x, r]),
              Call("swiglu_packed", ops.swiglu.default, [x, None]),
              Call("swiglu_bwd", ops.swiglu_bwd.default, [rand(2, 3, 4), x, None])]
    return calls


def _other_device(device) -> str:
    return "cpu" if torch.device(device).type != "cpu" else "meta"


def tensor_variants(t: torch.Tensor):
    """(name, replacement) pairs for a tensor argument: None, other dtypes, shapes and layouts."""
    yield "None", None
    for d in DTYPES:
        if d != t.dtype:
            yield f"dtype {d}", t.to(d)
    yield "0-dim", t.reshape(-1)[:1].reshape(()) if t.numel() else torch.zeros((), dtype=t.dtype, device=t.device)
    yield "extra leading dim", t.unsqueeze(0)
    yield "extra trailing dim", t.unsqueeze(-1)
    yield f"another device ({_other_device(t.device)})", t.to(_other_device(t.device))
    yield "sparse", t.to_sparse() if t.dim() and not t.is_complex() else t
    if t.is_floating_point():
        yield "requires grad", t.detach().clone().requires_grad_()
        yield "nan", torch.full_like(t, float("nan"))
    else:
        yield "negative", torch.full_like(t, -1000)
        yield "huge", torch.full_like(t, 2**30)
    if t.dim() == 0:
        return
    yield "flattened", t.reshape(-1)
    for d in range(t.dim()):
        n = t.shape[d]
        grown = torch.cat([t, t.narrow(d, 0, 1)], d) if n else t.new_zeros(t.shape[:d] + (1,) + t.shape[d + 1:])
        yield f"dim {d} + 1", grown
        yield f"dim {d} doubled + 33", t.new_zeros(t.shape[:d] + (2 * n + 33,) + t.shape[d + 1:])
        if n > 1:
            yield f"dim {d} - 1", t.narrow(d, 0, n - 1)
        yield f"dim {d} empty", t.narrow(d, 0, 0)
    if t.dim() >= 2:
        yield "last two dims swapped", t.transpose(-1, -2)
    yield "expanded (stride 0)", t.reshape(-1)[:1].expand(t.shape) if t.numel() else t
    yield from layouts(t)


def layouts(t: torch.Tensor):
    """(name, the same values in another memory layout): a strided last dim, padded rows, a
    misaligned start, the first two dims' strides swapped."""
    if t.dim() == 0 or t.numel() == 0:
        return
    strided = t.new_empty(t.shape[:-1] + (2 * t.shape[-1],))[..., ::2]
    yield "strided last dim", strided.copy_(t)
    padded = t.new_empty(t.shape[:-1] + (t.shape[-1] + 3,))[..., : t.shape[-1]]
    yield "padded rows", padded.copy_(t)
    yield "misaligned start", t.new_empty(t.numel() + 1)[1:].view(t.shape).copy_(t)
    if t.dim() >= 2:
        yield "first two dims' strides swapped", t.transpose(0, 1).contiguous().transpose(0, 1)


def scalar_variants(a):
    if isinstance(a, bool):
        yield "flipped", not a
    elif isinstance(a, int):
        for value in (-1, 0, 1, 3, 2**31, -(2**31), 2**62):
            yield f"{value}", value
    elif isinstance(a, float):
        for value in (float("nan"), float("inf"), float("-inf"), -1.0, 0.0, 2.0, 1e30):
            yield f"{value}", value
    elif isinstance(a, torch.dtype):
        for d in DTYPES:
            yield f"{d}", d
    elif a is None:
        yield "a tensor", torch.ones(3)


def each_tensor(call: Call, make):
    """(index, description, replacement) for every tensor argument of call and every tensor in a list
    argument, from make(tensor) -> (description, replacement) pairs (no None inside a list)."""
    for i, a in enumerate(call.args):
        if isinstance(a, torch.Tensor):
            for what, b in make(a):
                yield i, what, b
        elif isinstance(a, list):
            for j, t in enumerate(a):
                for what, b in make(t):
                    if b is not None:
                        yield i, f"[{j}] {what}", a[:j] + [b] + a[j + 1:]


def variants(call: Call):
    """(index, description, replacement) for every argument of call."""
    yield from each_tensor(call, tensor_variants)
    for i, a in enumerate(call.args):
        if isinstance(a, list):
            yield i, "empty list", []
            if a:
                yield i, "one tensor fewer", a[:-1]
                yield i, "one tensor more", a + a[:1]
        elif not isinstance(a, torch.Tensor):
            for what, b in scalar_variants(a):
                yield i, what, b


def changed(call: Call, changes):
    """For each (index, description, replacement) of changes: (index, description, call's arguments
    with that one replaced, a label naming the op and the argument)."""
    for i, what, b in changes:
        label = f"{call.name} with {call.op._schema.arguments[i].name}: {what}"
        yield i, what, call.args[:i] + [b] + call.args[i + 1:], label


def fresh(a):
    """A copy of an argument the op may write: new storage, the same offset, shape and strides."""
    if isinstance(a, list):
        return [fresh(t) for t in a]
    if not isinstance(a, torch.Tensor) or a.layout != torch.strided or a.device.type == "meta":
        return a
    copy = torch.empty(0, dtype=a.dtype, device=a.device)
    with torch.no_grad():
        copy.set_(a.untyped_storage().clone(), a.storage_offset(), a.shape, a.stride())
    return copy.requires_grad_(a.requires_grad)


def run(call: Call, args: list, sync, label: str) -> tuple[object, Exception | None]:
    """Calls the op on fresh copies of its writable arguments: (outputs and the written arguments,
    None) or (None, the exception it raised), after checking the outcome is one of those two."""
    args = [fresh(a) if call.mutable(i) else a for i, a in enumerate(args)]
    read_only = [(i, [t.detach().clone() for t in tensors_in(a)]) for i, a in enumerate(args)
                 if not call.mutable(i) and all(t.layout == torch.strided and t.device.type != "meta"
                                                for t in tensors_in(a))]
    error = None
    try:
        out = call.op(*args)
    except ALLOWED as e:
        error = e
    sync()  # a device fault surfaces here, and fails the test
    if error is not None:
        message = str(error)
        assert not any(f in message for f in FORBIDDEN), f"{label}: a check is missing: {message[:500]}"
        return None, error
    for i, before in read_only:
        for t, b in zip(tensors_in(args[i]), before):
            name = call.op._schema.arguments[i].name
            assert _same(t.detach(), b), f"{label}: wrote into its read-only argument {name}"
    return (out, [a for i, a in enumerate(args) if call.mutable(i)]), None


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def tensors_in(a) -> list[torch.Tensor]:
    """The tensors in an argument, an op's outputs, or a list or tuple of those, in order."""
    if isinstance(a, torch.Tensor):
        return [a]
    if isinstance(a, (list, tuple)):
        return [t for item in a for t in tensors_in(item)]
    return []
