"""The CUDA bindings and kernels, run by the simulator, called with one argument changed at a time
(tests/arg_fuzz.py): a bad argument raises a Python exception, never a simulated fault (an
out-of-bounds access under FMCORE_SIM_SANITIZE=address, a misaligned vector access, a bad launch)."""

import torch

from tests.arg_fuzz import changed, run, seed_calls, variants


def test_changed_arguments_raise_or_run(sim):
    calls = seed_calls(sim, "cpu", torch.bfloat16)
    for call in calls:
        _, error = run(call, call.args, lambda: None, f"{call.name} (valid)")
        assert error is None, f"{call.name}: the valid call raised {error!r}"
        for _, _, args, label in changed(call, variants(call)):
            run(call, args, lambda: None, label)
