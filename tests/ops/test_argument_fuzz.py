"""Every op, called with one argument changed at a time (tests/arg_fuzz.py): a bad argument raises a
Python exception, never a crash, a device fault or an internal assertion; an accepted one leaves the
read-only inputs alone; the same values in another memory layout give the same results."""

import pytest
import torch

import fmcore  # noqa: F401  (registers the ops)
from tests.arg_fuzz import Call, changed, each_tensor, layouts, run, seed_calls, tensors_in, variants


def _setup(device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    attention_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return seed_calls(torch.ops.fmcore, device, attention_dtype), sync


def test_changed_arguments_raise_or_run(device):
    calls, sync = _setup(device)
    outcomes = {"ran": 0, "raised": 0}
    for call in calls:
        _, error = run(call, call.args, sync, f"{call.name} (valid)")
        assert error is None, f"{call.name}: the valid call raised {error!r}"
        for i, what, args, label in changed(call, variants(call)):
            _, error = run(call, args, sync, label)
            # A tensor on another device than the rest must be refused: with a meta one among real
            # ones, the call would reach the fake kernel and return uninitialized real tensors.
            others = tensors_in(call.args[:i] + call.args[i + 1:])
            mixed = "another device" in what and any(t.device == device for t in others)
            assert error is not None or not mixed, f"{label}: accepted"
            outcomes["raised" if error else "ran"] += 1
    # (both outcomes occur: the variants reach the ops' checks, and some are valid)
    assert outcomes["raised"] > 1000 and outcomes["ran"] > 100, outcomes


def test_other_layouts_give_the_same_results(device):
    calls, sync = _setup(device)
    compared = 0
    for call in calls:
        want, _ = run(call, call.args, sync, call.name)
        for _, _, args, label in changed(call, each_tensor(call, layouts)):
            got, error = run(call, args, sync, label)
            if error is not None:
                continue  # refused (e.g. a kernel that needs a contiguous last dim): the other test checks how
            for g, w in zip(tensors_in(got), tensors_in(want), strict=True):
                torch.testing.assert_close(g, w, equal_nan=True, msg=lambda m: f"{label}: {m}")
            compared += 1
    assert compared > 50, compared


def test_the_checks_can_fail():
    """run() flags an op that writes into an argument its schema says it only reads, and one whose
    error is an internal assertion."""
    lib = torch.library.Library("fmcore_fuzz_selftest", "DEF")
    lib.define("writes(Tensor x) -> Tensor")
    lib.define("asserts(Tensor x) -> Tensor")
    lib.impl("writes", lambda x: x.add_(1).clone(), "CPU")

    def asserts(x):
        raise RuntimeError("INTERNAL ASSERT FAILED at somewhere.cpp")

    lib.impl("asserts", asserts, "CPU")
    ops = torch.ops.fmcore_fuzz_selftest
    with pytest.raises(AssertionError, match="wrote into its read-only argument x"):
        run(Call("writes", ops.writes.default, []), [torch.zeros(3)], lambda: None, "writes")
    with pytest.raises(AssertionError, match="a check is missing"):
        run(Call("asserts", ops.asserts.default, []), [torch.zeros(3)], lambda: None, "asserts")


def _public_calls(device):
    """(function, its arguments) for the public functions, all valid."""
    from fmcore import ops

    t = lambda *s, dtype=torch.float32: torch.randn(*s, device=device).to(dtype)  # noqa: E731
    adt = torch.bfloat16 if device.type == "cuda" else torch.float32
    cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
    target = torch.randint(0, 11, (6,), device=device)
    return [
        (ops.apply_rotary, dict(q=t(2, 5, 4, 16), k=t(2, 5, 2, 16), cos=t(5, 8), sin=t(5, 8))),
        (ops.flash_attention, dict(q=t(2, 5, 4, 64, dtype=adt), k=t(2, 5, 2, 64, dtype=adt),
                                   v=t(2, 5, 2, 64, dtype=adt))),
        (ops.flash_attention_varlen, dict(q=t(5, 4, 64, dtype=adt), k=t(5, 2, 64, dtype=adt), v=t(5, 2, 64, dtype=adt),
                                          cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=3, max_seqlen_k=3)),
        (ops.flash_attention_qkvpacked, dict(qkv=t(2, 5, 3, 4, 64, dtype=adt))),
        (ops.cross_entropy, dict(logits=t(6, 11), target=target)),
        (ops.linear_cross_entropy, dict(hidden=t(6, 8), weight=t(11, 8), target=target)),
        (ops.add_norm, dict(x=t(6, 8), residual=None, weight=t(8), bias=None)),
        (ops.bias_gelu, dict(x=t(6, 8))),
        (ops.swiglu, dict(gate=t(6, 8))),
        (ops.grad_norm, dict(tensors=[t(6, 8)])),
    ]


def test_public_functions_name_an_argument_that_is_not_a_tensor(device):
    for fn, kwargs in _public_calls(device):
        fn(**kwargs)
        for name, value in kwargs.items():
            if not isinstance(value, torch.Tensor):
                continue
            for bad in (None, value.tolist()):
                with pytest.raises(TypeError, match=f"expected {name} to be a Tensor, got"):
                    fn(**{**kwargs, name: bad})
