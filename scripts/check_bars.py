"""Each open issue's performance bar against benchmark results: one row per bar with fmcore's figure,
the peer's from the same run, and whether the bar is met. scripts/gpu_check.sh prints this last;
render_readme.py puts it in the README.

    python scripts/check_bars.py RESULTS.json [RESULTS.json ...]

Results come from `python -m fmcore.bench --json` (several files from one GPU session are merged as
scripts/merge_results.py does). A bar whose rows are missing is "not measured", never passed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import bench_report


class Results:
    def __init__(self, rows):
        self.rows = rows

    def get(self, bench: str, case: str, system: str, metric: str) -> float | None:
        """The value of the row whose case matches the regex `case` (fully)."""
        for r in self.rows:
            if r.bench == bench and r.system == system and r.metric == metric and re.fullmatch(case, r.case):
                return float(r.value)
        return None

    def cases(self, bench: str, case: str) -> list[str]:
        return list(dict.fromkeys(r.case for r in self.rows if r.bench == bench and re.fullmatch(case, r.case)))

    def best_tiles(self, bench: str, case: str, metric: str) -> tuple[float, int]:
        """(value, t) of the fastest fmcore-tiles<t> system measured on the case; (0.0, 0) if none."""
        best = (0.0, 0)
        for r in self.rows:
            m = re.fullmatch(r"fmcore-tiles(\d+)", r.system)
            if m and r.bench == bench and r.metric == metric and re.fullmatch(case, r.case):
                best = max(best, (float(r.value), int(m[1])))
        return best


def _fmt(x: float | None, unit: str) -> str:
    return "-" if x is None else f"{x:.4g} {unit}"


def _bar(issue, bar, case, ours, peer, unit, met, note=""):
    verdict = "not measured" if met is None else ("met" if met else "NOT met")
    return {"issue": issue, "bar": bar, "case": case, "fmcore": _fmt(ours, unit), "peer": _fmt(peer, unit),
            "verdict": verdict, "note": note}


def _cmp(ours, peer, ok):
    return None if ours is None or peer is None else ok(ours, peer)


def bars(rows) -> list[dict]:
    res, out = Results(rows), []

    # Issue 2: RoPE
    for phase in ("fwd", "bwd"):
        case = rf"q\(8,2048,32,128\) k\(8,2048,8,128\) bfloat16 {phase}"
        pct = res.get("rope", case, "fmcore", "roofline%")
        out.append(_bar(2, ">= 85% of copy bandwidth", f"rope {phase}", pct, 85.0, "%",
                        None if pct is None else pct >= 85.0))
        ms, comp = res.get("rope", case, "fmcore", "ms"), res.get("rope", case, "torch-compile", "ms")
        out.append(_bar(2, "as fast as torch.compile (peer)", f"rope {phase}", ms and ms * 1e3,
                        comp and comp * 1e3, "us", _cmp(ms, comp, lambda a, b: a <= b)))
    us = res.get("rope", r"per-call overhead q\(1,1,1,64\) fwd no-grad", "fmcore", "ms")  # apply_rotary
    one_op = res.get("rope", r"per-call overhead q\(1,1,1,64\) one op \(neg\) no-grad", "torch-eager", "ms")
    out.append(_bar(2, "aim: < 15 us Python overhead per call", "apply_rotary, tiny", us and us * 1e3, 15.0, "us",
                    None if us is None else us * 1e3 < 15.0,
                    "" if one_op is None else f"one torch op (neg): {one_op * 1e3:.3g} us"))

    # Issue 3: cross-entropy and linear cross-entropy
    case = r"logits \(16384, 50304\) bfloat16"
    ms = res.get("cross_entropy", case, "fmcore", "ms")
    out.append(_bar(3, "<= 2.0 ms in place", "CE (16384, 50304) bf16", ms, 2.0, "ms",
                    None if ms is None else ms <= 2.0))
    mib = res.get("cross_entropy", case, "fmcore", "MiB")
    out.append(_bar(3, "0 extra memory (<= 1 MiB)", "CE (16384, 50304) bf16", mib, 1.0, "MiB",
                    None if mib is None else mib <= 1.0))
    for case in res.cases("linear_cross_entropy", r"N\d+ D\d+ V\d+ bfloat16") or ["(not run)"]:
        ms, comp = (res.get("linear_cross_entropy", re.escape(case), s, "ms") for s in ("fmcore", "torch-compile"))
        out.append(_bar(3, "faster than torch.compile (peer)", f"LCE {case}", ms, comp, "ms",
                        _cmp(ms, comp, lambda a, b: a < b)))
        mib, cap = (res.get("linear_cross_entropy", re.escape(case), s, "MiB") for s in ("fmcore", "bar"))
        out.append(_bar(3, "memory <= grads + 128 MiB (peer: the cap)", f"LCE {case}", mib, cap, "MiB",
                        _cmp(mib, cap, lambda a, b: a <= b)))

    # Issue 4: AdamW
    for model in ("gpt2-124M", "gpt2-1.56B"):
        base = rf"{re.escape(model)} \(.*\) fp32"
        ms, fused = res.get("adamw", base, "fmcore", "ms"), res.get("adamw", base, "torch-fused", "ms")
        out.append(_bar(4, "no clip: as fast as torch fused (peer)", f"AdamW {model} fp32", ms, fused, "ms",
                        _cmp(ms, fused, lambda a, b: a <= b)))
        ms, fused = (res.get("adamw", base + r" \+clip", s, "ms") for s in ("fmcore", "torch-fused"))
        out.append(_bar(4, ">= 1.3x torch fused + clip_grad_norm_ (peer)", f"AdamW {model} fp32 +clip", ms, fused,
                        "ms", _cmp(ms, fused, lambda a, b: b / a >= 1.3),
                        "" if ms is None or fused is None else f"{fused / ms:.2f}x"))

    # Issue 5: attention, forward and backward against SDPA's FA2 on each case; cuDNN beside
    for case in res.cases("attention", r"B\d+ H\d+ S\d+ D\d+ (causal|full) bf16 (fwd|bwd)") or ["(not run)"]:
        c = re.escape(case)
        ours, fa2 = res.get("attention", c, "fmcore", "TFLOP/s"), res.get("attention", c, "sdpa-flash", "TFLOP/s")
        cudnn = res.get("attention", c, "sdpa-cudnn", "TFLOP/s")
        best = res.best_tiles("attention", c, "TFLOP/s")
        notes = [f"{ours / cudnn:.2f}x cuDNN" if ours and cudnn else "",
                 f"tiles={best[1]}: {best[0]:.4g}" if ours and best[0] > ours else ""]
        out.append(_bar(5, ">= SDPA flash (FA2) (peer)", f"attention {case}", ours, fa2, "TFLOP/s",
                        _cmp(ours, fa2, lambda a, b: a >= b), "; ".join(n for n in notes if n)))

    # Issue 6: loader
    ours = res.get("loader", r"random B=64 T=1024 threads=16", "fmcore", "tok/s")
    nano = res.get("loader", r"random B=64 T=1024 threads=1", "nanogpt-get-batch", "tok/s")
    out.append(_bar(6, ">= 10x nanoGPT get_batch (peer)", "loader random B=64 T=1024 threads=16",
                    ours and ours / 1e6, nano and nano / 1e6, "Mtok/s", _cmp(ours, nano, lambda a, b: a >= 10 * b),
                    "" if not ours or not nano else f"{ours / nano:.1f}x"))

    # Issue 7: trainer, GPT-2 124M B16 T1024 against the same model in plain PyTorch under torch.compile
    case = r"gpt2-124m B16 T1024 bf16"
    comp = res.get("train", case, "torch-compile", "tok/s")
    for system, factor, bar in (("fmcore", 1.0, "eager >= torch.compile (peer)"),
                                ("fmcore-compile", 1.25, "compiled >= 1.25x torch.compile (peer)")):
        ours = res.get("train", case, system, "tok/s")
        notes = ["" if not ours or not comp else f"{ours / comp:.2f}x"]
        if system == "fmcore":  # the wgmma attention kernels, measured in the trainer before they are the default
            best = res.best_tiles("train", case, "tok/s")
            notes.append(f"tiles={best[1]}: {best[0] / 1e3:.4g}" if ours and best[0] > ours else "")
            bf16 = res.get("train", case, "fmcore-bf16", "tok/s")  # bf16 weights + fp32 master weights
            notes.append(f"bf16 weights: {bf16 / 1e3:.4g}" if bf16 else "")
        out.append(_bar(7, bar, f"train 124M {system}", ours and ours / 1e3, comp and comp / 1e3, "ktok/s",
                        _cmp(ours, comp, lambda a, b, f=factor: a >= f * b), "; ".join(n for n in notes if n)))
    return out


def table(rows) -> str:
    lines = ["| issue | bar | case | fmcore | peer or target | verdict | note |", "|---|---|---|---|---|---|---|"]
    for b in bars(rows):
        lines.append(f"| {b['issue']} | {b['bar']} | {b['case']} | {b['fmcore']} | {b['peer']} | {b['verdict']} "
                     f"| {b['note']} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    head, rows = bench_report.load().merge([Path(p) for p in argv])
    if head["device"].startswith("cpu"):
        print(f"Results from {head['device']}: the bars are GPU figures, so none is judged.")
        return 0
    print(f"### Bars: {head['device']}, {head['date']}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
