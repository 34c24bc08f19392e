"""The CUDA bindings and kernels, run by the simulator, called with one argument changed at a time
(tests/arg_fuzz.py): a bad argument raises a Python exception, never a simulated fault (an
out-of-bounds access under FMCORE_SIM_SANITIZE=address, a misaligned vector access, a bad launch)."""

import torch

from tests.arg_fuzz import run, seed_calls, variants


def test_changed_arguments_raise_or_run(sim):
    calls = seed_calls(sim, "cpu", torch.bfloat16)
    for call in calls:
        _, error = run(call, call.args, lambda: None, f"{call.name} (valid)")
        assert error is None, f"{call.name}: the valid call raised {error!r}"
        for i, what, b in variants(call):
            run(call, call.args[:i] + [b] + call.args[i + 1:], lambda: None,
                f"{call.name} with {call.op._schema.arguments[i].name}: {what}")
