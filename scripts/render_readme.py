"""Regenerate README.md's performance section from the newest committed GPU results.

    python scripts/render_readme.py          # rewrite README.md in place
    python scripts/render_readme.py --check  # exit 1 if README.md is stale (used by the tests)

Results files are benchmarks/results/<gpu>-<yyyy-mm-dd>.json as written by `python -m fmcore.bench
--json`. The table is never typed by hand: numbers reach the README only through this script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import bench_report
import check_bars

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- perf:begin (scripts/render_readme.py) -->", "<!-- perf:end -->"
# The metrics the README shows, one table each (the results file has every metric): all of
# KEPT_METRICS unless a bench is listed here. Attention's TFLOP/s say what its ms and roofline% do.
KEPT_METRICS = ("ms", "TFLOP/s", "roofline%", "MiB", "tok/s", "MFU%")
BENCH_METRICS = {"attention": ("TFLOP/s",), "linear_cross_entropy": ("ms", "TFLOP/s", "MiB")}


def newest_results(results_dir: Path) -> Path | None:
    files = sorted(results_dir.glob("*-????-??-??.json"), key=lambda p: p.stem[-10:])
    return files[-1] if files else None


def render(results_dir: Path) -> str:
    report = bench_report.load()
    load_json, markdown = report.load_json, report.markdown

    path = newest_results(results_dir)
    if path is None:
        return ("No GPU results are committed yet: the benchmarks have only run on the CPU build machines, "
                "whose numbers prove the code paths, not the speed. Run the bench stages of `scripts/gpu_check.sh` on an "
                "H100 and commit their merged results as `benchmarks/results/<gpu>-<date>.json`.")
    head, rows = load_json(path)
    keep = [r for r in rows if r.metric in BENCH_METRICS.get(r.bench, KEPT_METRICS)]
    intro = (f"From `{path.relative_to(ROOT)}`: {head['device']}, {head['date']}, torch {head['torch']}, "
             f"CUDA {head['cuda']}; ceilings measured in the same run: copy {head['copy_gbps']:.0f} GB/s, "
             f"matmul {head['matmul_tflops']:.0f} TFLOP/s. Medians of CUDA-event timings, random inputs.\n\n")
    if head["device"].startswith("cpu"):
        return intro + markdown(keep, by_metric=True)
    bars = "\n\n### Targets\n\nEach issue's bar against the same run's peer (`scripts/check_bars.py`):\n\n"
    return intro + markdown(keep, by_metric=True) + bars + check_bars.table(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    new = text[:start] + "\n" + render(ROOT / "benchmarks" / "results") + "\n" + text[stop:]
    if args.check:
        if new != text:
            print("README.md performance section is stale: run python scripts/render_readme.py")
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
