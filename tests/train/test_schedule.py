"""Learning-rate schedules: warmup, then cosine / linear / WSD / constant shapes and end points."""

import math

import pytest

from fmcore.train.config import ScheduleConfig
from fmcore.train.schedule import lr_at

PEAK, TOTAL = 1.0, 100


def curve(kind, warmup=10, **kw):
    cfg = ScheduleConfig(kind=kind, warmup_steps=warmup, min_lr_ratio=0.1, **kw)
    return [lr_at(s, TOTAL, PEAK, cfg) for s in range(TOTAL)]


@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd", "constant"])
def test_warmup_is_linear_and_reaches_peak(kind):
    lrs = curve(kind)
    assert lrs[0] == pytest.approx(0.1) and lrs[0] > 0  # step 0 is not wasted at lr 0
    assert all(b - a == pytest.approx(0.1) for a, b in zip(lrs[:9], lrs[1:10]))
    assert lrs[9] == pytest.approx(PEAK) and lrs[10] == pytest.approx(PEAK)


def test_cosine_decays_monotonically_to_min_with_half_at_midpoint():
    lrs = curve("cosine")
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1)
    mid = 10 + (TOTAL - 1 - 10) / 2  # halfway through the decay: halfway between peak and min
    assert lr_at(int(mid), TOTAL, PEAK, ScheduleConfig(warmup_steps=10, min_lr_ratio=0.1)) == pytest.approx(
        0.1 + 0.45 * (1 + math.cos(math.pi * (int(mid) - 10) / 89)))


def test_linear_is_a_straight_line():
    lrs = curve("linear")
    diffs = [b - a for a, b in zip(lrs[10:], lrs[11:])]
    assert all(d == pytest.approx(diffs[0]) for d in diffs) and diffs[0] < 0
    assert lrs[-1] == pytest.approx(0.1)


def test_wsd_is_flat_then_decays_over_the_last_fraction():
    lrs = curve("wsd", decay_fraction=0.2)
    assert all(lr == pytest.approx(PEAK) for lr in lrs[10:80])
    assert all(b < a for a, b in zip(lrs[80:], lrs[81:]))
    assert lrs[-1] == pytest.approx(0.1)


def test_constant_and_no_warmup():
    assert all(lr == PEAK for lr in curve("constant")[10:])
    assert curve("cosine", warmup=0)[0] == pytest.approx(PEAK)


@pytest.mark.parametrize("kind, warmup, extra", [("wsd", 0, {"decay_fraction": 0.01}), ("cosine", TOTAL - 1, {}),
                                                 ("linear", TOTAL - 1, {})])
def test_a_decay_of_one_step_still_ends_at_min_lr(kind, warmup, extra):
    # The decay's only step is the last one: it must be min_lr, as the docstring says (it was the peak).
    lrs = curve(kind, warmup=warmup, **extra)
    assert lrs[-2] == pytest.approx(PEAK) and lrs[-1] == pytest.approx(0.1)
