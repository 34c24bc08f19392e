"""Learning-rate schedules: a pure function of the step, so resuming needs only the step counter.

lr_at(step, ...) for step = 0 .. total-1 (the lr used by the step-th optimizer step):
- warmup: linear from peak/warmup to peak over the first ``warmup`` steps (step 0 does not get lr 0,
  which would waste a step);
- cosine: half a cosine from peak down to min_lr at the last step;
- linear: a straight line from peak down to min_lr at the last step;
- wsd: warmup-stable-decay: peak until the last ``decay_fraction`` of the steps, then linear to min_lr;
- constant: peak after warmup.
"""

from __future__ import annotations

import math

from fmcore.train.config import ScheduleConfig


def lr_at(step: int, total: int, peak: float, cfg: ScheduleConfig) -> float:
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    min_lr = peak * cfg.min_lr_ratio
    if cfg.kind == "constant":
        return peak
    if cfg.kind == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total))
        start = max(cfg.warmup_steps, total - decay_steps)
        if step < start:
            return peak
        return peak + (min_lr - peak) * _progress(step, start, total)
    progress = _progress(step, cfg.warmup_steps, total)
    if cfg.kind == "linear":
        return peak + (min_lr - peak) * progress
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))


def _progress(step: int, start: int, total: int) -> float:
    """0 at step start, 1 at the last step (total - 1): a decay of a single step is that last step,
    which must end at min_lr too."""
    last = total - 1
    return 1.0 if last <= start else min(1.0, (step - start) / (last - start))
