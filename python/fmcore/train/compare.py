"""Compare the loss curves of two or more runs: ``python -m fmcore.train.compare RUN_A RUN_B [--plot out.png]``.

For the ops A/B check (the same config, data and seed with model.ops="fmcore" and "torch"): prints, per
run, the relative difference of its training loss from the first run's at every step both logged
(max, mean, and at the last step) and the largest absolute difference (what to read where the first
run's loss is 0: the relative one is inf there), and plots the curves together.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from fmcore.train.metrics import read_metrics


def losses(run: Path) -> dict[int, float]:
    """Training loss per logged step; a non-finite one (written as null) is nan."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run} holds no metrics.jsonl: pass run directories written by `fmcore train`")
    return {r["step"]: math.nan if r["loss"] is None else r["loss"] for r in read_metrics(path) if "loss" in r}


def relative_differences(base: dict[int, float], other: dict[int, float]) -> dict[int, float]:
    """|other - base| / |base| at each step both runs logged; inf where only one of them is finite
    (a diverged step must not vanish from max() as a nan would) and where base is 0 and other is not
    (a ZeroDivisionError there ended the comparison with a traceback)."""
    return _differences(base, other, relative=True)


def absolute_differences(base: dict[int, float], other: dict[int, float]) -> dict[int, float]:
    """|other - base| at each step both runs logged; inf where only one of them is finite."""
    return _differences(base, other, relative=False)


def _differences(base: dict[int, float], other: dict[int, float], relative: bool) -> dict[int, float]:
    out = {}
    for s in sorted(base.keys() & other.keys()):
        a, b = base[s], other[s]
        if (math.isnan(a) and math.isnan(b)) or a == b:
            out[s] = 0.0
        elif math.isfinite(a) and math.isfinite(b) and (a != 0 or not relative):
            out[s] = abs(b - a) / (abs(a) if relative else 1.0)
        else:
            out[s] = math.inf
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fmcore.train.compare", description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (the first is the reference)")
    parser.add_argument("--plot", type=Path, help="write the curves to this PNG")
    args = parser.parse_args(argv)
    try:
        curves = {run: losses(run) for run in args.runs}
    except FileNotFoundError as e:
        print(f"python -m fmcore.train.compare: {e}", file=sys.stderr)
        return 2
    base = curves[args.runs[0]]
    for run in args.runs[1:]:
        rel = relative_differences(base, curves[run])
        if not rel:
            print(f"{run}: no step in common with {args.runs[0]}")
            continue
        last = max(rel)
        diff = absolute_differences(base, curves[run])
        print(f"{run} vs {args.runs[0]}: {len(rel)} common steps, max |rel diff| {100 * max(rel.values()):.3f}% "
              f"(step {max(rel, key=rel.get)}), mean {100 * sum(rel.values()) / len(rel):.3f}%, "
              f"at step {last}: {100 * rel[last]:.3f}% ({base[last]:.4f} vs {curves[run][last]:.4f}), "
              f"max |diff| {max(diff.values()):.4g} (step {max(diff, key=diff.get)})")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for run, curve in curves.items():
            ax.plot(list(curve), list(curve.values()), label=run.name, lw=1.0)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
